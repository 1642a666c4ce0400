"""tinykern.quantize_: swap a model's nn.Linear and nn.Conv2d layers for quantized ones in place."""

import dataclasses
import fnmatch

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from tinykern.formats import FORMATS
from tinykern.nn import QuantConv2d, QuantLinear

DENSE = "fp16"  # an override that keeps a layer dense, in whatever dtype the model has


@dataclasses.dataclass
class QuantConfig:
    """Which layers quantize_ converts, and to what.

    weight: the format of every selected layer, a key of tinykern.formats.FORMATS ("q4_k",
        "q8_0", "q5_k", ...) whose record has a quantizer.
    skip: glob patterns of module names left dense.
    overrides: {glob pattern: a format | "fp16"}; the first matching pattern wins and "fp16"
        keeps the layer dense.
    min_features: layers whose row (in_features, or in_channels/groups*kh*kw) is shorter stay
        dense: their packed rows would be mostly padding.
    convs: also convert nn.Conv2d (depthwise convs, one input channel per group, stay dense).
    """

    weight: str = "q4_k"
    skip: list = dataclasses.field(default_factory=list)
    overrides: dict = dataclasses.field(default_factory=dict)
    min_features: int = 128
    convs: bool = True

    def __post_init__(self):
        # A bare string would be matched character by character: "*" alone skips everything.
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise ValueError(f"QuantConfig: skip must be a list of glob patterns, got {self.skip!r}")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"QuantConfig: overrides must be a dict {{pattern: format}}, got {self.overrides!r}")
        writable = [name for name, fmt in FORMATS.items() if fmt.quantize is not None]
        for fmt in [self.weight, *self.overrides.values()]:
            if fmt not in (*writable, DENSE):
                raise ValueError(f"QuantConfig: unknown format {fmt!r}; expected one of {[*writable, DENSE]}")

    def format_for(self, name, module):
        """The format `module` (at path `name`) gets, or None with the reason it stays dense."""
        if any(fnmatch.fnmatchcase(name, p) for p in self.skip):
            return None, "skipped by config"
        fmt = next((f for p, f in self.overrides.items() if fnmatch.fnmatchcase(name, p)), self.weight)
        if fmt == DENSE:
            return None, "kept dense by override"
        if isinstance(module, nn.Conv2d):
            if not self.convs:
                return None, "convs not selected"
            if module.in_channels == module.groups:
                return None, "depthwise conv"
            if module.padding_mode != "zeros":
                return None, f"padding_mode={module.padding_mode!r}"
            if module.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
                return None, "asymmetric padding='same'"
            row = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            row = module.in_features
        if row < self.min_features:
            return None, f"row of {row} < min_features={self.min_features}"
        return fmt, None


@dataclasses.dataclass
class LayerReport:
    name: str
    kind: str
    format: str  # a key of tinykern.formats.FORMATS, or "dense"
    bytes_before: int
    bytes_after: int
    rel_error: float | None  # ||W - dequant(W)|| / ||W||; None on the meta device or when dense
    note: str = ""


class QuantReport(list):
    """The LayerReport of every Linear/Conv2d that quantize_ looked at; str() is a table."""

    def totals(self):
        return sum(r.bytes_before for r in self), sum(r.bytes_after for r in self)

    def __str__(self):
        rows = [f"{'layer':<48} {'kind':<7} {'format':<6} {'before':>11} {'after':>11} {'rel err':>8}"]
        for r in self:
            err = "" if r.rel_error is None else f"{r.rel_error:.4f}"
            rows.append(f"{r.name[-48:]:<48} {r.kind:<7} {r.format:<6} {r.bytes_before:>11,} {r.bytes_after:>11,} {err:>8} {r.note}")
        before, after = self.totals()
        rows.append(f"{'total':<48} {'':<7} {'':<6} {before:>11,} {after:>11,}")
        return "\n".join(rows)


def quantize_(model, config=None):
    """Replace, in place, every nn.Linear and nn.Conv2d of `model` that `config` selects with
    QuantLinear / QuantConv2d (Q4Linear, Q8Linear, Q4Conv2d for their formats), and return a QuantReport. All or nothing: every layer is
    quantized before any is swapped, so a refused weight or bias (ValueError naming it) leaves
    the model as it was, and a swap that fails puts back the layers already swapped and raises
    ValueError naming the layer. Subclasses of nn.Linear / nn.Conv2d stay dense (their forward
    may do more than the base class's) and are reported so; a lazy layer not yet initialized
    (nn.LazyLinear before its first call) is reported as dense with 0 bytes. On the meta device the modules are
    built empty (fill them with load_quantized)."""
    config = config or QuantConfig()
    report = QuantReport()
    new = {}  # id(layer) -> its replacement: a layer shared by several paths is quantized once
    swaps = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if id(module) in new:
            if new[id(module)] is not module:
                swaps.append((name, new[id(module)]))
            continue
        kind = "Conv2d" if isinstance(module, nn.Conv2d) else "Linear"
        lazy = is_lazy(module.weight)  # nn.LazyLinear / LazyConv2d before its first call: no weight yet
        if lazy:
            fmt, why = None, "lazy, not initialized"
        elif type(module) in (nn.Linear, nn.Conv2d):
            fmt, why = config.format_for(name, module)
        else:
            fmt, why = None, f"subclass {type(module).__name__} of nn.{kind}: its forward may do more than nn.{kind}'s"
        before = 0 if lazy else module.weight.numel() * module.weight.element_size()
        if fmt is None:
            new[id(module)] = module
            report.append(LayerReport(name, kind, "dense", before, before, None, why))
            continue
        if not name:
            raise ValueError("quantize_ replaces layers inside a model; wrap a bare layer in a container")
        record = FORMATS[fmt]
        if kind == "Conv2d":
            layer = record.conv_class.from_conv(module, name, format=fmt)
        else:
            layer = record.linear_class.from_linear(module, name, format=fmt)
        new[id(module)] = layer
        swaps.append((name, layer))
        report.append(LayerReport(name, kind, fmt, before, layer.qweight.numel(), _rel_error(module.weight, layer)))
    _swap_all(model, swaps)
    return report


def _swap_all(model, swaps):
    """Make every (name, layer) swap, or none: a failure puts the swapped layers back."""
    done = []
    for name, layer in swaps:
        try:
            old = model.get_submodule(name)
            _replace(model, name, layer)
        except Exception as e:
            for done_name, done_old in reversed(done):
                _replace(model, done_name, done_old)
            raise ValueError(f"quantize_: could not replace {name} ({type(e).__name__}: {e}); "
                             "the model is left as it was") from e
        done.append((name, old))


def quantized_modules(model):
    """(name, module) of every tinykern quantized module in `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]


def _replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _rel_error(weight, module):
    if weight.is_meta:
        return None
    w = weight.detach().float()
    return ((module.dequantize().reshape(w.shape) - w).norm() / w.norm().clamp(min=torch.finfo(torch.float32).tiny)).item()
