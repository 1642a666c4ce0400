"""The low-VRAM layout of SD1.x: which layers get which format, and quantizing on a device."""

import dataclasses
import logging

import torch

from tinykern.quantize import DENSE, QuantConfig, QuantReport, quantize_

log = logging.getLogger("tinykern.sd")

# The time-embedding MLP, conv_in and conv_out stay dense: tiny (about 2.5M weights in all) and
# the first/last layers and the timestep path are where 4-bit error shows most. Norms are not
# Linear/Conv2d, so quantize_ never touches them.
UNET_KEEP_DENSE = ("time_embedding.*", "conv_in", "conv_out")


@dataclasses.dataclass
class SDQuantConfig:
    """Formats of the SD pipeline's parts.

    unet: a format of tinykern.formats.FORMATS ("q4_k", "q5_k", "q8_0", ...) or None (dense)
        for the UNet's Linear and Conv2d layers.
    text_encoder: a format or None for the CLIP text encoder's Linear layers.
    keep_dense: UNet module globs left dense.
    unet_overrides: {UNet module glob: format | "fp16"}, the first match winning over `unet`
        (a mixed layout: QuantConfig.overrides).
    min_features: layers with shorter rows stay dense (see QuantConfig); SD1.5's shortest row
        is 320, so the default only matters for small test models.
    """

    unet: str | None = "q4_k"
    text_encoder: str | None = "q8_0"
    keep_dense: tuple = UNET_KEEP_DENSE
    min_features: int = 128
    unet_overrides: dict = dataclasses.field(default_factory=dict)

    def unet_config(self):
        if self.unet is None:
            return None
        # keep_dense as "fp16" overrides after the user's: the first match wins, so an override
        # naming a kept-dense layer (time_embedding.*=q8_0) quantizes it.
        overrides = {**self.unet_overrides, **{p: DENSE for p in self.keep_dense if p not in self.unet_overrides}}
        return QuantConfig(weight=self.unet, overrides=overrides, min_features=self.min_features, convs=True)

    def text_encoder_config(self):
        # Conv-free; the token and position embeddings are not Linear and stay dense.
        return None if self.text_encoder is None else QuantConfig(weight=self.text_encoder,
                                                                  min_features=self.min_features, convs=False)

    @classmethod
    def of(cls, quantize):
        """The config a loader's `quantize` argument names: True (the low-VRAM layout), False
        (dense) or an SDQuantConfig (returned as is)."""
        return cls() if quantize is True else (cls(None, None) if quantize is False else quantize)


def quantize_on(model, config, device, dtype):
    """Move `model` to `device`/`dtype` and quantize it there, one top-level child at a time,
    so that a GPU holds at most one full-precision block beside the quantized ones (GPU
    quantization is two orders of magnitude faster than the CPU reference)."""
    if config is None:
        return move(model, device, dtype), QuantReport()
    report = QuantReport()
    children = [name for name, _ in model.named_children()]
    for name in children:
        move(getattr(model, name), device, dtype)
        others = [p for other in children if other != name for p in (other, other + ".*")]
        part = quantize_(model, dataclasses.replace(config, skip=[*config.skip, *others]))
        report.extend(r for r in part if r.name == name or r.name.startswith(name + "."))
    move(model, device, dtype)  # parameters held by the model itself, if any
    return model, report


def move(module, device, dtype):
    """module.to(device, dtype), through nn.Module: diffusers' ModelMixin.to warns about
    float32 modules on every dtype cast, even when it has none."""
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def warn_if_slow(model, config, device):
    """Say when quantizing a large model will take minutes (the CPU reference quantizer)."""
    if config is None or torch.device(device).type != "cpu":
        return
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    if weights > 50_000_000:
        log.warning("quantizing %.0fM weights on the CPU takes several minutes; run `tinykern sd quantize` once "
                    "and load the folder it writes to skip this", weights / 1e6)
