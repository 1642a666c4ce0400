"""Step rehash (Streamlined Inference's speed technique) for the SD UNet: every `interval`-th
denoising step runs the whole UNet and keeps its deep features (the input of the last up
block); the steps in between run only the outer blocks (time embedding, conv_in, the first
down block, the last up block, the output layers) on those kept features.

Adjacent steps' deep features change little (the observation DeepCache and Streamlined
Inference build on), so the outer blocks, which see the new latent, correct most of the
difference; the result is an approximation whose error is measured in bench/bench_sd.py.
interval 1 is the plain UNet, bit for bit.

Steps are told apart by the timestep object the pipeline passes (one per step, the same for
both CFG halves when they run one after the other); the pipeline resets the count at the start
of each run (TinySDPipeline.__call__).
"""

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook

HOOK = "tinykern_rehash"


class StepRehash(ModelHook):
    """The UNet hook; `full_steps` and `partial_steps` count what ran since the last reset()."""

    def __init__(self, interval, layers=None):
        super().__init__()
        if int(interval) != interval or interval < 1:
            raise ValueError(f"rehash interval must be an integer >= 1, got {interval!r}")
        if layers is not None and layers < 1:
            raise ValueError(f"rehash layers must be >= 1 (or None: the whole last up block), got {layers!r}")
        self.interval, self.layers = int(interval), layers
        self._handle = None
        self.reset()

    def reset(self):
        self.step, self.full_steps, self.partial_steps = -1, 0, 0
        self._timestep, self._slot, self._full = None, 0, True
        self.cache, self._captured = {}, None

    def initialize_hook(self, module):
        last = module.up_blocks[-1]
        k = min(self.layers or len(last.resnets), len(last.resnets))
        self._keep = None
        if k == len(last.resnets):
            self._handle = last.register_forward_pre_hook(self._capture, with_kwargs=True)
        else:  # the input of resnet L-k holds the features and a skip, concatenated: keep the features
            self._keep = last.resnets[len(last.resnets) - k - 1].out_channels
            self._handle = last.resnets[len(last.resnets) - k].register_forward_pre_hook(self._capture, with_kwargs=True)
        return module

    def deinitalize_hook(self, module):  # diffusers' spelling
        self.remove()
        return module

    def remove(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _capture(self, module, args, kwargs):
        if self._captured is not None:
            features = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))
            self._captured.append(features if self._keep is None else features[:, :self._keep].clone())

    def new_forward(self, module, sample, timestep, encoder_hidden_states, *args, **kwargs):
        if timestep is not self._timestep:
            self._timestep, self._slot = timestep, 0
            self.step += 1
            self._full = self.step % self.interval == 0
            if self._full:
                self.cache = {}
        else:
            self._slot += 1
        plain = (bool(args) or any(v is not None for k, v in kwargs.items() if k not in ("cross_attention_kwargs", "return_dict"))
                 or not _supported(module))
        deep = self.cache.get(self._slot)
        if self.interval == 1 or self._full or plain or deep is None:
            self._captured = [] if self.interval > 1 and not plain else None
            try:
                out = self.fn_ref.original_forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
            finally:
                if self._captured:
                    self.cache[self._slot] = self._captured
                self._captured = None
            self.full_steps += self._slot == 0
            return out
        self.partial_steps += self._slot == 0
        attention = kwargs.get("cross_attention_kwargs")
        if len(deep) == 1:
            out = outer_forward(module, sample, timestep, encoder_hidden_states, deep[0], attention, self.layers)
        else:  # the CFG halves ran one after the other (sequential CFG): so do they here
            from tinykern.pipelines.sd.pipeline import _half

            batch = sample.shape[0]
            out = torch.cat([outer_forward(module, _half(sample, batch, h), _half(timestep, batch, h),
                                           _half(encoder_hidden_states, batch, h), part, attention, self.layers)
                             for h, part in enumerate(deep)])
        if kwargs.get("return_dict", True):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)


def _supported(unet):
    c = unet.config
    return (unet.class_embedding is None and c.addition_embed_type is None and unet.encoder_hid_proj is None
            and not c.center_input_sample and len(unet.down_blocks) >= 2 and getattr(unet.up_blocks[-1], "s1", None) is None)


def outer_forward(unet, sample, timestep, encoder_hidden_states, deep, cross_attention_kwargs=None, layers=None):
    """The UNet's output from `sample` with the deep features given: `deep` is the input of the
    last up block (layers None), or of its last `layers` resnets (without their skip). Runs the
    time embedding, conv_in, the first down block's layers whose skips those resnets take, those
    resnets (and their attentions) and the output layers."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    hidden = unet.conv_in(sample)
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    count = len(last.resnets)
    k = min(layers or count, count)
    cross = dict(encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs)
    # The last up block takes the first skips (conv_in's, then the first down block's layers').
    skips = [hidden]
    if k == count:
        if getattr(first, "has_cross_attention", False):
            _, res = first(hidden_states=hidden, temb=emb, **cross)
        else:
            _, res = first(hidden_states=hidden, temb=emb)
        skips += list(res)
        del hidden, res
        if getattr(last, "has_cross_attention", False):
            sample = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=tuple(skips[:count]), upsample_size=None,
                          **cross)
        else:
            sample = last(hidden_states=deep, temb=emb, res_hidden_states_tuple=tuple(skips[:count]), upsample_size=None)
    else:
        attentions = getattr(first, "attentions", None)
        for i in range(k - 1):
            hidden = first.resnets[i](hidden, emb)
            if attentions is not None:
                hidden = attentions[i](hidden, return_dict=False, **cross)[0]
            skips.append(hidden)
        del hidden
        sample = deep
        attentions = getattr(last, "attentions", None)
        for j in range(count - k, count):  # resnet j takes skip count-1-j
            sample = last.resnets[j](torch.cat([sample, skips[count - 1 - j]], dim=1), emb)
            if attentions is not None:
                sample = attentions[j](sample, return_dict=False, **cross)[0]
    del skips
    if unet.conv_norm_out:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


def enable(unet, interval, layers=None):
    """Step rehash with a full step every `interval` (None or 0: off), recomputing the whole last
    up block (layers None) or only its last `layers` resnets. Returns the hook."""
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    if registry.get_hook(HOOK) is not None:
        registry.remove_hook(HOOK, recurse=False)
    unet._tinykern_rehash = None
    if not interval:
        return None
    hook = StepRehash(interval, layers)
    registry.register_hook(hook, HOOK)
    unet._tinykern_rehash = hook
    return hook


def unet_flops(unet, sample, timestep, encoder_hidden_states, deep=None, layers=None):
    """FLOPs of one UNet call (torch.utils.flop_counter; run it on the meta device), the whole
    UNet or, with `deep`, the outer blocks only."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if deep is None:
            unet(sample, timestep, encoder_hidden_states=encoder_hidden_states)
        else:
            outer_forward(unet, sample, timestep, encoder_hidden_states, deep, layers=layers)
    return counter.get_total_flops()
