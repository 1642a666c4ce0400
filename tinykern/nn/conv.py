"""Q4Conv2d: nn.Conv2d with its weight stored in Q4_K blocks."""

import torch
import torch.nn.functional as F
from torch import nn

from tinykern import backends, ops
from tinykern.formats import q4k
from tinykern.nn.linear import _bias_dtype, check_bias
from tinykern.ops import _conv_padding, _pair


class Q4Conv2d(nn.Module):
    """Conv2d whose weight is held as `qweight`, uint8 [out_channels, nb*144]: row o holds the
    (in_channels/groups)*kh*kw weights of output channel o in F.unfold order, zero-padded to a
    multiple of 256."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, device=None, bias_dtype=torch.float32):
        super().__init__()
        backends.preload()  # before any torch.compile of the model (see backends.preload)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Q4Conv2d: groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.padding = _conv_padding("Q4Conv2d", padding, self.kernel_size, self.stride, self.dilation)
        self.groups = groups
        row = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        blocks = -(-row // q4k.BLOCK)
        self.register_buffer("qweight", torch.empty(out_channels, blocks * q4k.BLOCK_BYTES, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_channels, dtype=bias_dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_conv(cls, conv, name="conv"):
        """Quantize an nn.Conv2d (zero padding mode, symmetric padding) on its own device.
        `name`, the layer's path, labels errors as in Q4Linear.from_linear."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"{name}: Q4Conv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        padding = _conv_padding(name, conv.padding, conv.kernel_size, conv.stride, conv.dilation)
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding,
                     conv.dilation, conv.groups, conv.bias is not None, device=conv.weight.device,
                     bias_dtype=_bias_dtype(conv.bias))
        if conv.weight.is_meta:
            return module
        check_bias(conv.bias, name)
        rows = conv.weight.detach().float().reshape(conv.out_channels, -1)
        padded = module.qweight.shape[1] // q4k.BLOCK_BYTES * q4k.BLOCK
        module.qweight.copy_(q4k.quantize(F.pad(rows, (0, padded - rows.shape[1])), name=f"{name}.weight"))
        if conv.bias is not None:
            module.bias.data.copy_(conv.bias.detach())
        return module

    def forward(self, x):
        return ops.q4k_conv2d(x, self.qweight, self.bias, self.in_channels, self.kernel_size, self.stride,
                              self.padding, self.dilation, self.groups)

    def dequantize(self, dtype=torch.float32):
        """The dense weight [out_channels, in_channels/groups, kh, kw], for inspection."""
        row = self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        weight = q4k.dequantize(self.qweight, dtype)[:, :row]
        return weight.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
                f"format=q4_k, bytes={self.qweight.numel()}")

