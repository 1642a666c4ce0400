"""TinySDPipeline: a diffusers StableDiffusionPipeline that decodes on the VAE's own device
(the CPU in the low-VRAM layout) and can run the two CFG halves one after the other."""

import contextlib

import torch
from diffusers import StableDiffusionPipeline
from diffusers.hooks.hooks import HookRegistry, ModelHook
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput

SEQUENTIAL_CFG_HOOK = "tinykern_sequential_cfg"
# Tiles for GPU decoding: 256-pixel tiles keep the decoder's activations near a quarter of
# what a 512x512 image needs at once.
TILE_SAMPLE, TILE_LATENT = 256, 32


def stage(name):
    """tinykern.profile.stage(name) when the profiler is there, else nothing."""
    try:
        from tinykern import profile
    except ImportError:
        return contextlib.nullcontext()
    return profile.stage(name) if hasattr(profile, "stage") else contextlib.nullcontext()


class _SequentialBatch(ModelHook):
    """Runs the UNet once per half of its batch (unconditional, then conditional) instead of
    on both at once: same result, about half the activation memory."""

    def new_forward(self, module, *args, **kwargs):
        sample = args[0] if args else kwargs["sample"]
        batch = sample.shape[0]
        if batch < 2 or batch % 2:
            return self.fn_ref.original_forward(*args, **kwargs)
        outputs = [self.fn_ref.original_forward(*_half(args, batch, h), **_half(kwargs, batch, h)) for h in (0, 1)]
        if isinstance(outputs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outputs))
        return type(outputs[0])(sample=torch.cat([o.sample for o in outputs]))


def _half(value, batch, h):
    """Half h of every tensor (nested in tuples/lists/dicts) whose first dimension is `batch`."""
    if isinstance(value, torch.Tensor):
        return value.chunk(2)[h] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _half(v, batch, h) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_half(v, batch, h) for v in value)
    return value


class TinySDPipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline whose VAE may live on another device than the UNet (latents are
    moved to it for decoding) and whose UNet may run the CFG halves sequentially.

    Build it with tinykern.pipelines.sd.load_pipeline; call it as a StableDiffusionPipeline.
    """

    @property
    def sequential_cfg(self):
        return HookRegistry.check_if_exists_or_initialize(self.unet).get_hook(SEQUENTIAL_CFG_HOOK) is not None

    def enable_sequential_cfg(self, enabled=True):
        """Run the unconditional and conditional UNet passes one after the other."""
        registry = HookRegistry.check_if_exists_or_initialize(self.unet)
        if enabled and registry.get_hook(SEQUENTIAL_CFG_HOOK) is None:
            registry.register_hook(_SequentialBatch(), SEQUENTIAL_CFG_HOOK)
        elif not enabled:
            registry.remove_hook(SEQUENTIAL_CFG_HOOK, recurse=False)

    def enable_vae_tiling(self):
        """Decode in overlapping 256-pixel tiles (for a VAE on the GPU)."""
        self.vae.enable_tiling()
        self.vae.tile_sample_min_size, self.vae.tile_latent_min_size = TILE_SAMPLE, TILE_LATENT

    @property
    def slicing(self):
        """The feature slicing in use (tinykern.pipelines.sd.slicing.Slicing), or None."""
        return getattr(self, "_tinykern_slicing", None)

    def enable_slicing(self, slicing=True):
        """Run the UNet's and VAE decoder's blocks slice by slice (True: default slice sizes; a
        Slicing; None/False: off). Same results up to float rounding, a fraction of the
        activation memory: see tinykern.pipelines.sd.slicing."""
        from tinykern.pipelines.sd import slicing as sliced

        value = sliced.Slicing() if slicing is True else (slicing or None)
        sliced.enable(self.unet, self.vae, value)
        self._tinykern_slicing = value

    @property
    def rehash(self):
        """The step-rehash interval (a full UNet step every N), or None."""
        hook = getattr(self.unet, "_tinykern_rehash", None)
        return hook.interval if hook is not None else None

    def enable_rehash(self, interval, layers=None):
        """Step rehash: a full UNet step every `interval` steps, only the outer blocks on the
        steps between (None: off); layers=k recomputes only the last k resnets of the last up
        block (cheaper, coarser). See tinykern.pipelines.sd.rehash."""
        from tinykern.pipelines.sd import rehash

        rehash.enable(self.unet, interval, layers)

    @property
    def loras(self):
        """The LoRAs loaded with load_lora, in order."""
        if not hasattr(self, "_tinykern_loras"):
            self._tinykern_loras = []
        return self._tinykern_loras

    def load_lora(self, source, scale=1.0, merge=False, name=None, factor_format=None):
        """Apply a LoRA file (`~` expanded) or state dict to the UNet and text encoder, its
        factors in the pipeline's dtype; returns its handle (set_scale, remove). merge=True
        re-quantizes packed weights, which changes the LoRA's effect by about the format's
        error over the LoRA's relative size (see tinykern.pipelines.sd.lora). factor_format="q8_0"
        holds unmerged factors in Q8_0 (about half the bytes)."""
        from tinykern.pipelines.sd.lora import load_lora

        lora = load_lora({"unet": self.unet, "text_encoder": self.text_encoder}, source, scale, merge, name,
                         factor_format=factor_format)
        self.loras.append(lora)
        return lora

    def remove_loras(self):
        """Remove every unmerged LoRA."""
        for lora in self.loras:
            if not lora.merged:
                lora.remove()
        self.loras[:] = [lora for lora in self.loras if lora.merged]

    @property
    def _execution_device(self):
        # The UNet's device: the VAE (maybe on the CPU) must not decide where latents live.
        return self.unet.device

    def __call__(self, *args, output_type="pil", return_dict=True, **kwargs):
        if getattr(self.unet, "_tinykern_rehash", None) is not None:
            self.unet._tinykern_rehash.reset()
        with stage("sd.denoise"):
            latents = super().__call__(*args, output_type="latent", return_dict=False, **kwargs)[0]
        if output_type == "latent":
            image = latents
        else:
            with stage("sd.decode"):
                image = self.image_processor.postprocess(self.decode(latents), output_type=output_type)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=None) if return_dict else (image, None)

    @torch.no_grad()
    def decode(self, latents):
        """Latents (any device) -> images in [-1, 1] on the VAE's device."""
        vae_param = next(self.vae.decoder.parameters())
        latents = latents.to(device=vae_param.device, dtype=vae_param.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents, return_dict=False)[0]
