"""LoRA on quantized (or dense) SD1.x UNets and CLIP text encoders.

Reads kohya/A1111 (`lora_unet_..._lora_down/up/alpha`, `lora_te_...`), diffusers
(`unet.<path>.lora.down/up`, attention-processor `..._lora.down/up`) and PEFT
(`lora_A/lora_B`, `unet.`/`text_encoder.`/`base_model.model.` prefixes) key layouts, with module
paths in diffusers or LDM naming, for Linear and Conv2d layers (down: the layer's own kernel,
stride and padding; up: 1x1).

Unmerged (default), each LoRA is a forward hook adding scale * up(down(x)) to its layer's
output, with down/up kept in the model's dtype (float32 factors in a float32 pipeline, float16
in a float16 one): several LoRAs stack, each scale can change, and remove() restores the model.

merge=True adds the product into the weight instead: no runtime cost, but not removable. A
dense weight takes W + delta exactly. A packed weight (Q4_K, Q8_0) is dequantized, added to and
re-quantized, so the LoRA's effect becomes Q(W + delta) - Q(W) instead of delta: off by one more
rounding the size of the format's error on W (Q4_K: about 5% of ||W|| for Gaussian weights),
which is large beside a delta that is small beside W. Roughly, the effect is off by (the
format's relative error) / (||delta|| / ||W||): on a 512x512 Q4_K layer with a rank-8 LoRA
(tests/test_sd_lora.py::test_merge_into_q4k_changes_the_loras_effect), 29% when ||delta|| is
20% of ||W||, 55% at 10%, 88% at 5%; unmerged, the effect is exact to float32 rounding (about
5e-7). Merge into packed weights only when that is acceptable; keep the LoRA unmerged to apply
it as trained.
"""

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tinykern.formats.common import quantize_rows
from tinykern.nn import QuantConv2d, QuantLinear
from tinykern.pipelines.sd import ldm

_TARGETS = (nn.Linear, nn.Conv2d, QuantLinear, QuantConv2d)
_CONVS = (nn.Conv2d, QuantConv2d)
# (key suffix, role); longer, more specific suffixes first.
_SUFFIXES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # attention processors: processor.to_q_lora
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".alpha", "alpha"),
)
# (key prefix, components to look in); kohya's module paths use "_" for ".".
_PREFIXES = (
    ("lora_unet_", ("unet",)),
    ("lora_te_", ("text_encoder",)),
    ("unet.", ("unet",)),
    ("text_encoder.", ("text_encoder",)),
    ("model.diffusion_model.", ("unet",)),
    ("cond_stage_model.transformer.", ("text_encoder",)),
    ("base_model.model.", ("unet", "text_encoder")),
    ("", ("unet", "text_encoder")),
)


class LoRABranch(nn.Module):
    """scale * up(down(x)) for one layer; down/up stored in `dtype`, computed in the input's dtype."""

    def __init__(self, target, down, up, scale, dtype=torch.float16):
        super().__init__()
        self.conv = isinstance(target, _CONVS)
        if self.conv:
            if target.groups != 1:
                raise ValueError("LoRA on grouped convs is not supported")
            down = down if down.dim() == 4 else down[:, :, None, None]
            up = up if up.dim() == 4 else up[:, :, None, None]
            self.stride, self.padding, self.dilation = target.stride, target.padding, target.dilation
        else:
            down, up = down.flatten(1), up.flatten(1)  # a 1x1-conv LoRA on a Linear layer
        self.register_buffer("down", down.to(dtype))
        self.register_buffer("up", up.to(dtype))
        self.scale = float(scale)

    # False: the branch's output and the layer's output plus it are new tensors. True (factors()
    # makes fresh copies): each factor copy is dropped once used, and both are formed in place.
    in_place = False

    def factors(self, dtype):
        """(down, up) in `dtype`, shaped like the layer's kernel (down) and a 1x1 kernel (up)."""
        return self.down.to(dtype), self.up.to(dtype)

    def forward(self, x):
        down, up = self.factors(x.dtype)
        hidden = F.conv2d(x, down, None, self.stride, self.padding, self.dilation) if self.conv else F.linear(x, down)
        if self.in_place:
            del down
        out = F.conv2d(hidden, up) if self.conv else F.linear(hidden, up)
        del hidden
        return out.mul_(self.scale) if self.in_place else out * self.scale

    def delta(self):
        """The dense weight update, float32, shaped like the layer's weight."""
        down, up = self.factors(torch.float32)
        product = up.flatten(1) @ down.flatten(1)
        return self.scale * (product.reshape(up.shape[0], *down.shape[1:]) if self.conv else product)

    def hook(self, module, args, output):
        if self.down.device != output.device:
            self.to(output.device)  # once: the pipeline moved after the LoRA was loaded
        return output.add_(self(args[0])) if self.in_place else output + self(args[0])


class LoRA:
    """One loaded LoRA: its branches (by "component.module" name), scale and hooks."""

    def __init__(self, name, branches, factors, scale, merged):
        self.name, self.branches, self._factors, self.merged = name, branches, factors, merged
        self._handles = []
        self._scale = scale

    @property
    def scale(self):
        return self._scale

    def set_scale(self, scale):
        if self.merged:
            raise ValueError(f"LoRA {self.name!r} is merged into the weights; its scale is fixed")
        self._scale = float(scale)
        for key, branch in self.branches.items():
            branch.scale = self._scale * self._factors[key]

    def remove(self):
        if self.merged:
            raise ValueError(f"LoRA {self.name!r} is merged into the weights and cannot be removed; reload the model")
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __repr__(self):
        return f"LoRA({self.name!r}, layers={len(self.branches)}, scale={self._scale}, merged={self.merged})"


def load_lora(components, source, scale=1.0, merge=False, name=None, dtype=None, factor_format=None):
    """Apply a LoRA file (`~` expanded) or state dict to {"unet": ..., "text_encoder": ...} modules.

    scale multiplies every layer's alpha/rank factor (1 where the file has no alpha). dtype:
    the unmerged factors' dtype (default: each component's, that is the dtype of its first
    floating-point parameter). merge: see the module docstring for what merging into packed
    weights costs. factor_format "q8_0" holds the unmerged factors in Q8_0 (see
    tinykern.pipelines.sd.lora_q8). Raises ValueError listing the keys that fit no known layout
    or no layer of the model.
    """
    if factor_format not in (None, "q8_0"):
        raise ValueError(f"LoRA factor_format must be None (the model's dtype) or 'q8_0', got {factor_format!r}")
    branch_type = LoRABranch
    if factor_format == "q8_0" and not merge:
        from tinykern.pipelines.sd.lora_q8 import Q8LoRABranch as branch_type
    state, name = _read(source, name)
    pairs, unmatched = parse_lora(state, components)
    if unmatched:
        shown = "\n  ".join(unmatched[:20])
        more = f"\n  ... and {len(unmatched) - 20} more" if len(unmatched) > 20 else ""
        raise ValueError(f"LoRA {name!r}: {len(unmatched)} of {len(state)} keys match no known LoRA layout "
                         f"(kohya, diffusers, PEFT) or no layer of this model:\n  {shown}{more}")
    branches, factors = {}, {}
    for (component, module_name), parts in pairs.items():
        target = components[component].get_submodule(module_name)
        rank = parts["down"].shape[0]
        factor = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
        key = f"{component}.{module_name}"
        _check_shapes(key, target, parts["down"], parts["up"])
        factors[key] = factor
        branches[key] = branch_type(target, parts["down"], parts["up"], scale * factor,
                                   dtype=dtype or _dtype_of(components[component]))
    lora = LoRA(name, branches, factors, float(scale), merged=merge)
    for key, branch in branches.items():
        component, _, module_name = key.partition(".")
        target = components[component].get_submodule(module_name)
        if merge:
            _merge(target, branch)
        else:
            branch.to(_weight_of(target).device)
            lora._handles.append(target.register_forward_hook(branch.hook))
    return lora


def parse_lora(state, components):
    """({(component, module name): {"down", "up"[, "alpha"]}}, [unmatched keys])."""
    tables = {c: _aliases(c, m) for c, m in components.items() if m is not None}
    pairs, unmatched = {}, []
    for key, value in state.items():
        found = next(((key[: -len(s)], role) for s, role in _SUFFIXES if key.endswith(s)), None)
        target = _resolve(found[0], tables) if found else None
        if target is None:
            unmatched.append(key)
        else:
            pairs.setdefault(target, {})[found[1]] = value
    for target, parts in pairs.items():
        if "down" not in parts or "up" not in parts:
            unmatched.append(f"{'.'.join(target)} (has {sorted(parts)}, needs down and up)")
    return {t: p for t, p in pairs.items() if "down" in p and "up" in p}, unmatched


def _read(source, name):
    if isinstance(source, dict):
        return source, name or "state_dict"
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist")
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path)), name or path.stem
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors LoRA file ({e})") from e


def _aliases(component, module):
    """{every name a LoRA may use for a layer: its diffusers module path}."""
    table = {}
    config = getattr(module, "config", None)
    for name, sub in module.named_modules():
        if not isinstance(sub, _TARGETS):
            continue
        names = [name]
        if component == "unet":
            ldm_name = ldm.diffusers_to_ldm(name, config)
            if ldm_name:
                names.append(ldm_name)
        else:  # with and without the text_model. level (transformers 5 dropped it)
            names.append(name.removeprefix("text_model.") if name.startswith("text_model.") else "text_model." + name)
        for n in names:
            table[n] = name
            table[n.replace(".", "_")] = name
    return table


def _resolve(module_path, tables):
    for prefix, components in _PREFIXES:
        if not module_path.startswith(prefix):
            continue
        rest = module_path[len(prefix):]
        if ".processor." in rest:  # diffusers attention processors: attn1.processor.to_q_lora -> attn1.to_q
            rest = rest.replace(".processor.", ".")
            rest += ".0" if rest.endswith(".to_out") else ""
        for component in components:
            if component in tables and rest in tables[component]:
                return component, tables[component][rest]
        return None
    return None


def _check_shapes(key, target, down, up):
    out_features, in_features = _features(target)
    kernel = tuple(target.kernel_size) if isinstance(target, _CONVS) else (1, 1)
    down_kernel = tuple(down.shape[2:]) if down.dim() == 4 else (1, 1)
    down_in = down.shape[1] if down_kernel == kernel else None
    if down_in != in_features or up.shape[0] != out_features or up.shape[1] != down.shape[0]:
        raise ValueError(f"LoRA layer {key}: down {list(down.shape)} / up {list(up.shape)} do not fit a layer "
                         f"with {in_features} inputs, {out_features} outputs and kernel {list(kernel)}")


def _features(module):
    if isinstance(module, _CONVS):
        return module.out_channels, module.in_channels
    return module.out_features, module.in_features


def _dtype_of(model):
    """The dtype a model runs in: that of its first floating-point parameter (packed layers'
    bytes are not floating point)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _weight_of(module):
    return module.qweight if hasattr(module, "qweight") else module.weight


def _merge(target, branch):
    """Add the branch's product into the layer's weight, re-quantizing packed weights once."""
    weight = _weight_of(target)
    delta = branch.delta().to(weight.device)
    if not hasattr(target, "qweight"):
        target.weight.data += delta.to(target.weight.dtype)
        return
    rows = (target.dequantize(torch.float32) + delta).reshape(target.qweight.shape[0], -1)
    target.qweight.copy_(quantize_rows(target.format, rows, f"{type(target).__name__} + LoRA"))
