"""Q4_K ops in plain torch: dequantize the whole weight, then matmul (what diffusers'
GGUFLinear does on every forward). The oracle of the kernels and the last-resort backend."""

import torch.nn.functional as F

from tinykern import backends
from tinykern.formats import q4k


@backends.register("q4k_dequantize", "torch")
def q4k_dequantize(blocks, dtype):
    return q4k.dequantize(blocks, dtype)


@backends.register("q4k_matmul", "torch")
def q4k_matmul(x, w, bias):
    weight = q4k.dequantize(w, x.dtype)[:, : x.shape[-1]]
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


@backends.register("q4k_conv2d", "torch")
@backends.register("q4k_conv2d_grouped", "torch")
def q4k_conv2d(x, w, bias, kernel_size, stride, padding, dilation, groups):
    out_channels = w.shape[0]
    per_group = x.shape[1] // groups
    weight = q4k.dequantize(w, x.dtype)[:, : per_group * kernel_size[0] * kernel_size[1]]
    weight = weight.reshape(out_channels, per_group, *kernel_size)
    return F.conv2d(x, weight, None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)
