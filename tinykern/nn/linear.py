"""QuantLinear (any block format) and the names people use for its two common formats,
Q4Linear and Q8Linear: nn.Linear with its weight stored in packed GGUF blocks."""

import torch
from torch import nn

from tinykern import backends, formats, ops
from tinykern.formats.common import check_finite, quantize_rows


def resolve_format(cls, format):
    """The Format record a quantized module class holds: `format` (a FORMATS key or record) for
    the generic classes, the class's own FORMAT (and `format` None or that) for the named ones."""
    if cls.FORMAT is None:
        if format is None:
            raise ValueError(f"{cls.__name__}: needs format=, one of {list(formats.FORMATS)}")
        return formats.get(format, cls.__name__)
    fixed = formats.FORMATS[cls.FORMAT]
    if format is not None and formats.get(format, cls.__name__) is not fixed:
        raise ValueError(f"{cls.__name__} holds {fixed.name} only, got format={format!r}; use the generic class")
    return fixed


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W held as `qweight`, uint8 [out_features, nb*block_bytes] of
    `format` (a key of tinykern.formats.FORMATS): each row zero-padded to a whole number of
    blocks (the padding never meets the input)."""

    FORMAT = None  # the format's name, for the classes that hold one format only

    def __init__(self, in_features, out_features, bias=True, device=None, bias_dtype=torch.float32, format=None):
        super().__init__()
        backends.preload()  # before any torch.compile of the model (see backends.preload)
        self.format = resolve_format(type(self), format)
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "qweight", torch.empty(out_features, self.format.row_bytes(in_features), dtype=torch.uint8, device=device)
        )
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear, name="linear", format=None):
        """Quantize an nn.Linear (on its own device). `name`, the layer's path, labels errors
        ("{name}.weight", "{name}.bias"): a weight the format cannot hold (NaN, Inf, out of its
        range) or a NaN/Inf bias raises ValueError."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
                     bias_dtype=_bias_dtype(linear.bias), format=format)
        if linear.weight.is_meta:
            return module
        check_bias(linear.bias, name)
        module.qweight.copy_(quantize_rows(module.format, linear.weight.detach(), f"{name}.weight"))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    @classmethod
    def from_packed(cls, qweight, in_features, bias=None, format=None):
        """Adopt existing blocks (e.g. a GGUF tensor) and bias (float32 or float16) as they are,
        without re-quantizing or converting."""
        module = cls(in_features, qweight.shape[0], bias is not None, device="meta", format=format)
        expected = tuple(module.qweight.shape)
        if qweight.dtype != torch.uint8 or tuple(qweight.shape) != expected:
            raise ValueError(
                f"{cls.__name__}: packed weight must be uint8 {list(expected)} for in_features={in_features}, "
                f"got {qweight.dtype} {list(qweight.shape)}"
            )
        if bias is not None and (bias.dtype not in BIAS_DTYPES or tuple(bias.shape) != expected[:1]):
            raise ValueError(f"{cls.__name__}: bias must be float32 or float16 [{expected[0]}], "
                             f"got {bias.dtype} {list(bias.shape)}")
        module.qweight = qweight
        module.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        return module

    def forward(self, x):
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: expected x [..., {self.in_features}], got {list(x.shape)}")
        return ops.matmul(x, self.qweight, self.format, self.bias)

    def dequantize(self, dtype=torch.float32):
        """The dense weight [out_features, in_features], for inspection."""
        return self.format.dequantize(self.qweight, dtype)[:, : self.in_features]

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format.name}, bytes={self.qweight.numel()}")


class Q4Linear(QuantLinear):
    """QuantLinear holding Q4_K (4.5 bits per weight)."""

    FORMAT = "q4_k"


class Q8Linear(QuantLinear):
    """QuantLinear holding Q8_0 (8.5 bits per weight)."""

    FORMAT = "q8_0"


BIAS_DTYPES = (torch.float32, torch.float16)  # the bias dtypes the quantized modules' kernels take


def _bias_dtype(bias):
    # Biases stay in fp16 or fp32 as they came; bf16 and others become fp32.
    return bias.dtype if bias is not None and bias.dtype in BIAS_DTYPES else torch.float32


def check_bias(bias, name):
    """Raise ValueError naming "{name}.bias" if a layer's bias holds NaN or Inf."""
    if bias is not None:
        check_finite(bias, f"{name}.bias", "cannot keep a bias")
