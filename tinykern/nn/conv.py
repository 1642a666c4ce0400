"""QuantConv2d (any block format) and Q4Conv2d (Q4_K): nn.Conv2d with its weight stored in
packed GGUF blocks."""

import torch
from torch import nn

from tinykern import backends, ops
from tinykern.formats.common import quantize_rows
from tinykern.nn.linear import _bias_dtype, check_bias, resolve_format
from tinykern.ops import _conv_padding, _pair


class QuantConv2d(nn.Module):
    """Conv2d whose weight is held as `qweight`, uint8 [out_channels, nb*block_bytes] of
    `format` (a key of tinykern.formats.FORMATS): row o holds the (in_channels/groups)*kh*kw
    weights of output channel o in F.unfold order, zero-padded to whole blocks."""

    FORMAT = None  # the format's name, for the classes that hold one format only

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, device=None, bias_dtype=torch.float32, format=None):
        super().__init__()
        backends.preload()  # before any torch.compile of the model (see backends.preload)
        self.format = resolve_format(type(self), format)
        where = type(self).__name__
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{where}: groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.padding = _conv_padding(where, padding, self.kernel_size, self.stride, self.dilation)
        self.groups = groups
        self.register_buffer("qweight", torch.empty(out_channels, self.format.row_bytes(self._row()), dtype=torch.uint8,
                                                    device=device))
        self.bias = nn.Parameter(torch.empty(out_channels, dtype=bias_dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_conv(cls, conv, name="conv", format=None):
        """Quantize an nn.Conv2d (zero padding mode, symmetric padding) on its own device.
        `name`, the layer's path, labels errors as in QuantLinear.from_linear."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"{name}: {cls.__name__} supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        padding = _conv_padding(name, conv.padding, conv.kernel_size, conv.stride, conv.dilation)
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding,
                     conv.dilation, conv.groups, conv.bias is not None, device=conv.weight.device,
                     bias_dtype=_bias_dtype(conv.bias), format=format)
        if conv.weight.is_meta:
            return module
        check_bias(conv.bias, name)
        rows = conv.weight.detach().reshape(conv.out_channels, -1)
        module.qweight.copy_(quantize_rows(module.format, rows, f"{name}.weight"))
        if conv.bias is not None:
            module.bias.data.copy_(conv.bias.detach())
        return module

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: x must be [B, {self.in_channels}, H, W], got {list(x.shape)}")
        return ops.conv2d(x, self.qweight, self.format, self.kernel_size, self.bias, self.stride, self.padding,
                          self.dilation, self.groups)

    def dequantize(self, dtype=torch.float32):
        """The dense weight [out_channels, in_channels/groups, kh, kw], for inspection."""
        weight = self.format.dequantize(self.qweight, dtype)[:, : self._row()]
        return weight.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
                f"format={self.format.name}, bytes={self.qweight.numel()}")

    def _row(self):
        """Weights per output channel: (in_channels/groups) * kh * kw."""
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]


class Q4Conv2d(QuantConv2d):
    """QuantConv2d holding Q4_K (4.5 bits per weight)."""

    FORMAT = "q4_k"
