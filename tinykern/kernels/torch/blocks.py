"""The block formats' ops in plain torch, for every format in tinykern.formats.FORMATS:
dequantize the whole weight, then the dense op (what diffusers' GGUFLinear does on every
forward). The oracle of the kernels and the last-resort backend."""

import functools

import torch.nn.functional as F

from tinykern import backends
from tinykern.formats import FORMATS


def dequantize(fmt, blocks, dtype):
    return fmt.dequantize(blocks, dtype)


def matmul(fmt, x, w, bias):
    weight = fmt.dequantize(w, x.dtype)[:, : x.shape[-1]]
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def conv2d(fmt, x, w, bias, kernel_size, stride, padding, dilation, groups):
    per_group = x.shape[1] // groups
    weight = fmt.dequantize(w, x.dtype)[:, : per_group * kernel_size[0] * kernel_size[1]]
    weight = weight.reshape(w.shape[0], per_group, *kernel_size)
    return F.conv2d(x, weight, None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)


for _fmt in FORMATS.values():
    backends.register(_fmt.op("dequantize"), "torch")(functools.partial(dequantize, _fmt))
    backends.register(_fmt.op("matmul"), "torch")(functools.partial(matmul, _fmt))
    for _kind in ("conv2d", "conv2d_grouped"):
        backends.register(_fmt.op(_kind), "torch")(functools.partial(conv2d, _fmt))
