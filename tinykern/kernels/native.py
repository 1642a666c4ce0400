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


def q4k_conv2d(x, w, bias, kernel_size, stride, padding, dilation, groups):
    """The native dequantize, then the vendor conv (cuDNN, oneDNN), in x.dtype; on a CPU with
    AMX-BF16 in bf16 for fp32 and bf16 x (fp32 accumulation, relative error about 3e-3 against
    float64) unless `tinykern.backend(..., exact=True)`. At conv sizes the GEMM is
    compute-bound, and an unfold into q4k_matmul would also build the [N*H*W, C*kh*kw] patch
    matrix (no measured comparison is kept in bench/results/)."""
    compute = torch.bfloat16 if _bf16_conv(x) else x.dtype
    per_group = x.shape[1] // groups
    kh, kw = kernel_size
    weight = torch.ops.tinykern.q4k_dequantize(w, compute)[:, : per_group * kh * kw]
    weight = weight.reshape(w.shape[0], per_group, kh, kw)
    out = F.conv2d(x.to(compute), weight, None if bias is None else bias.to(compute), stride, padding, dilation, groups)
    return out.to(x.dtype)


def _bf16_conv(x):
    """Whether q4k_conv2d runs x in bf16: the CPU kernels' rule for wide matmuls (the conv
    dequantizes its whole weight either way, and bf16 halves that)."""
    return x.device.type == "cpu" and x.dtype != torch.float16 and not backends.exact() and _amx_bf16()


@torch.compiler.assume_constant_result
def _amx_bf16():
    # torch.compile takes the answer at trace time (TINYKERN_CPU_SIMD is read on each eager call).
    return _ext.runtime_info()["simd"] == "avx512+amx"


def _register_fakes():
    def dequantize_fake(fmt):
        weights, nbytes = _BLOCKS[fmt]

        def fake(blocks, dtype):
            return blocks.new_empty((*blocks.shape[:-1], blocks.shape[-1] // nbytes * weights), dtype=dtype)

        return fake

    def matmul_fake(x, w, bias, exact=True):
        return x.new_empty((x.shape[0], w.shape[0]))

    def quantize_fake(fmt):
        weights, nbytes = _BLOCKS[fmt]

        def fake(x):
            return x.new_empty((*x.shape[:-1], x.shape[-1] // weights * nbytes), dtype=torch.uint8)

        return fake

    for fmt in _BLOCKS:
        torch.library.register_fake(f"tinykern::{fmt}_quantize")(quantize_fake(fmt))
        torch.library.register_fake(f"tinykern::{fmt}_dequantize")(dequantize_fake(fmt))
        torch.library.register_fake(f"tinykern::{fmt}_matmul")(matmul_fake)

    @torch.library.register_fake("tinykern::rvq_encode")
    def _(x, codebooks):
        n, levels = x.shape[0], codebooks.shape[0]
        return x.new_empty((n, levels), dtype=torch.int64), x.new_empty((n, x.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("tinykern::rvq_decode")
    def _(codes, codebooks):
        return codebooks.new_empty((codes.shape[0], codebooks.shape[2]))


def _exact_from_context(op):
    """The matmul op with its `exact` flag taken from tinykern.backend(..., exact=...)."""

    def matmul(x, w, bias):
        return op(x, w, bias, backends.exact())

    return matmul


def _register():
    _register_fakes()
    for op in NATIVE_OPS:
        impl = getattr(torch.ops.tinykern, op)
        if op.endswith("_matmul"):
            impl = _exact_from_context(impl)
        for backend in ("cpu", "cuda"):
            backends.register(op, backend)(impl)
    # Both composites handle any groups, so they serve the grouped op too.
    for op in ("q4k_conv2d", "q4k_conv2d_grouped"):
        backends.register(op, "cpu")(q4k_conv2d)
        backends.register(op, "cuda")(q4k_conv2d)


if _ext.available():
    _register()
