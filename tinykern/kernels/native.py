"""The compiled kernels of tinykern._C as the "cpu" and "cuda" backends.

Importing this module gives each native op a fake kernel (output shapes and dtypes, so that
torch.compile and opcheck can trace it) and registers the op under both backend names: a
torch.ops.tinykern op dispatches on its tensors' device by itself. q4k_conv2d (grouped or not) is
composed here from the native ops. When _C is not built nothing is registered, and the backends
say why.
"""

import torch
import torch.nn.functional as F

from tinykern import _ext, backends

NATIVE_OPS = ("q4k_dequantize", "q4k_matmul", "q8_0_dequantize", "q8_0_matmul", "rvq_encode", "rvq_decode")
# (weights, bytes) per block of each format.
_BLOCKS = {"q4k": (256, 144), "q8_0": (32, 34)}


def q4k_conv2d_cpu(x, w, bias, kernel_size, stride, padding, dilation, groups):
    """im2col (F.unfold) then the native q4k_matmul per group, bias added in fp32 inside it;
    the output in x's memory format."""
    batch, channels, height, width = x.shape
    kh, kw = kernel_size
    per_group = channels // groups * kh * kw
    out_per_group = w.shape[0] // groups
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)  # [B, C*kh*kw, L]
    outs = []
    for g in range(groups):
        xg = cols[:, g * per_group:(g + 1) * per_group].transpose(1, 2).reshape(-1, per_group).contiguous()
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        outs.append(torch.ops.tinykern.q4k_matmul(xg, w[rows], None if bias is None else bias[rows]))
    y = outs[0] if groups == 1 else torch.cat(outs, dim=1)  # [B*L, out]
    h_out = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    # y is NHWC in memory: a channels_last view for free, or one copy to NCHW, as F.conv2d
    # would lay the output out for this x.
    y = y.reshape(batch, h_out, w_out, w.shape[0]).permute(0, 3, 1, 2)
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return y.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)


def q4k_conv2d_cuda(x, w, bias, kernel_size, stride, padding, dilation, groups):
    """The native dequantize to x.dtype, then cuDNN: at conv sizes the GEMM is compute-bound."""
    per_group = x.shape[1] // groups
    kh, kw = kernel_size
    weight = torch.ops.tinykern.q4k_dequantize(w, x.dtype)[:, : per_group * kh * kw]
    weight = weight.reshape(w.shape[0], per_group, kh, kw)
    return F.conv2d(x, weight, None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)


def _register_fakes():
    def dequantize_fake(fmt):
        weights, nbytes = _BLOCKS[fmt]

        def fake(blocks, dtype):
            return blocks.new_empty((*blocks.shape[:-1], blocks.shape[-1] // nbytes * weights), dtype=dtype)

        return fake

    def matmul_fake(x, w, bias):
        return x.new_empty((x.shape[0], w.shape[0]))

    for fmt in _BLOCKS:
        torch.library.register_fake(f"tinykern::{fmt}_dequantize")(dequantize_fake(fmt))
        torch.library.register_fake(f"tinykern::{fmt}_matmul")(matmul_fake)

    @torch.library.register_fake("tinykern::rvq_encode")
    def _(x, codebooks):
        n, levels = x.shape[0], codebooks.shape[0]
        return x.new_empty((n, levels), dtype=torch.int64), x.new_empty((n, x.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("tinykern::rvq_decode")
    def _(codes, codebooks):
        return codebooks.new_empty((codes.shape[0], codebooks.shape[2]))


def _register():
    _register_fakes()
    for op in NATIVE_OPS:
        for backend in ("cpu", "cuda"):
            backends.register(op, backend)(getattr(torch.ops.tinykern, op))
    # Both composites handle any groups, so they serve the grouped op too.
    for op in ("q4k_conv2d", "q4k_conv2d_grouped"):
        backends.register(op, "cpu")(q4k_conv2d_cpu)
        backends.register(op, "cuda")(q4k_conv2d_cuda)


if _ext.available():
    _register()
