"""Q4Linear and Q8Linear: nn.Linear with its weight stored in packed GGUF blocks."""

import torch
from torch import nn

from tinykern import backends, ops
from tinykern.formats import q4k, q8_0
from tinykern.formats.common import check_finite, quantize_rows


class _BlockLinear(nn.Module):
    """y = x @ W.T + b with W held as `qweight`, uint8 [out_features, nb*block_bytes]: each row
    zero-padded to a whole number of blocks (the padding never meets the input)."""

    FORMAT = None  # the tinykern.formats module
    FORMAT_NAME = ""

    def __init__(self, in_features, out_features, bias=True, device=None, bias_dtype=torch.float32):
        super().__init__()
        backends.preload()  # before any torch.compile of the model (see backends.preload)
        self.in_features = in_features
        self.out_features = out_features
        blocks = -(-in_features // self.FORMAT.BLOCK)
        self.register_buffer(
            "qweight", torch.empty(out_features, blocks * self.FORMAT.BLOCK_BYTES, dtype=torch.uint8, device=device)
        )
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear, name="linear"):
        """Quantize an nn.Linear (on its own device). `name`, the layer's path, labels errors
        ("{name}.weight", "{name}.bias"): a weight the format cannot hold (NaN, Inf, out of its
        range) or a NaN/Inf bias raises ValueError."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
                     bias_dtype=_bias_dtype(linear.bias))
        if linear.weight.is_meta:
            return module
        check_bias(linear.bias, name)
        module.qweight.copy_(quantize_rows(module.FORMAT, linear.weight.detach(), f"{name}.weight"))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    @classmethod
    def from_packed(cls, qweight, in_features, bias=None):
        """Adopt existing blocks (e.g. a GGUF tensor) and bias (float32 or float16) as they are,
        without re-quantizing or converting."""
        module = cls(in_features, qweight.shape[0], bias is not None, device="meta")
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
        return self._matmul(x, self.qweight, self.bias)

    def dequantize(self, dtype=torch.float32):
        """The dense weight [out_features, in_features], for inspection."""
        return self.FORMAT.dequantize(self.qweight, dtype)[:, : self.in_features]

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.FORMAT_NAME}, bytes={self.qweight.numel()}")


class Q4Linear(_BlockLinear):
    """nn.Linear with a Q4_K weight (4.5 bits per weight)."""

    FORMAT = q4k
    FORMAT_NAME = "q4_k"
    _matmul = staticmethod(ops.q4k_matmul)


class Q8Linear(_BlockLinear):
    """nn.Linear with a Q8_0 weight (8.5 bits per weight)."""

    FORMAT = q8_0
    FORMAT_NAME = "q8_0"
    _matmul = staticmethod(ops.q8_0_matmul)


BIAS_DTYPES = (torch.float32, torch.float16)  # the bias dtypes the quantized modules' kernels take


def _bias_dtype(bias):
    # Biases stay in fp16 or fp32 as they came; bf16 and others become fp32.
    return bias.dtype if bias is not None and bias.dtype in BIAS_DTYPES else torch.float32


def check_bias(bias, name):
    """Raise ValueError naming "{name}.bias" if a layer's bias holds NaN or Inf."""
    if bias is not None:
        check_finite(bias, f"{name}.bias", "cannot keep a bias")
