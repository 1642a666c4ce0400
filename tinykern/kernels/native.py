"""The compiled kernels of tinykern._C as the "cpu" and "cuda" backends.

Importing this module gives each native op a fake kernel (output shapes and dtypes, so that
torch.compile and opcheck can trace it) and registers the ops of every format in
tinykern.formats.FORMATS under both backend names: a torch.ops.tinykern op dispatches on its
tensors' device by itself. Q4_K and Q8_0 run their own ops (q4k_matmul, q8_0_matmul: hand-written
small-M kernels), every other format the generic block_* ops by GGML type id. The convs (grouped
or not) are composed here from the native ops. When _C is not built nothing is registered, and
the backends say why.
"""

import functools

import torch
import torch.nn.functional as F

from tinykern import _ext, backends
from tinykern.formats import BY_GGML_TYPE, FORMATS

# The formats with ops of their own in _C; the rest go through block_dequantize / block_matmul.
NAMED = ("q4_k", "q8_0")
_RVQ_OPS = ("rvq_encode", "rvq_decode")


def conv2d(dequantize, x, w, bias, kernel_size, stride, padding, dilation, groups):
    """The native dequantize, then the vendor conv (cuDNN, oneDNN), in x.dtype; on a CPU with bf16
    hardware (AMX-BF16 or AVX512-BF16) in bf16 for fp32 and bf16 x (fp32 accumulation, relative
    error about 3e-3 against float64) unless `tinykern.backend(..., exact=True)`. At conv sizes the GEMM is
    compute-bound, and an unfold into the matmul would also build the [N*H*W, C*kh*kw] patch
    matrix (no measured comparison is kept in bench/results/)."""
    compute = torch.bfloat16 if _bf16_conv(x) else x.dtype
    per_group = x.shape[1] // groups
    kh, kw = kernel_size
    weight = dequantize(w, compute)[:, : per_group * kh * kw]
    weight = weight.reshape(w.shape[0], per_group, kh, kw)
    out = F.conv2d(x.to(compute), weight, None if bias is None else bias.to(compute), stride, padding, dilation, groups)
    return out.to(x.dtype)


def _bf16_conv(x):
    """Whether q4k_conv2d runs x in bf16: the CPU kernels' rule for wide matmuls (the conv
    dequantizes its whole weight either way, and bf16 halves that)."""
    return x.device.type == "cpu" and x.dtype != torch.float16 and not backends.exact() and _bf16_gemm()


@torch.compiler.assume_constant_result
def _bf16_gemm():
    # torch.compile takes the answer at trace time (TINYKERN_CPU_SIMD is read on each eager call).
    return _ext.runtime_info()["bf16_gemm"]


def _register_fakes():
    def dequantize_fake(block, block_bytes):
        def fake(blocks, dtype):
            return blocks.new_empty((*blocks.shape[:-1], blocks.shape[-1] // block_bytes * block), dtype=dtype)

        return fake

    def quantize_fake(block, block_bytes):
        def fake(x):
            return x.new_empty((*x.shape[:-1], x.shape[-1] // block * block_bytes), dtype=torch.uint8)

        return fake

    def matmul_fake(x, w, bias, exact=True):
        return x.new_empty((x.shape[0], w.shape[0]))

    for name in NAMED:
        fmt = FORMATS[name]
        torch.library.register_fake(f"tinykern::{fmt.op('quantize')}")(quantize_fake(fmt.block, fmt.block_bytes))
        torch.library.register_fake(f"tinykern::{fmt.op('dequantize')}")(dequantize_fake(fmt.block, fmt.block_bytes))
        torch.library.register_fake(f"tinykern::{fmt.op('matmul')}")(matmul_fake)

    @torch.library.register_fake("tinykern::block_dequantize")
    def _(blocks, ggml_type, dtype):
        fmt = BY_GGML_TYPE[ggml_type]
        return dequantize_fake(fmt.block, fmt.block_bytes)(blocks, dtype)

    @torch.library.register_fake("tinykern::block_quantize")
    def _(x, ggml_type):
        fmt = BY_GGML_TYPE[ggml_type]
        return quantize_fake(fmt.block, fmt.block_bytes)(x)

    @torch.library.register_fake("tinykern::block_matmul")
    def _(x, w, bias, ggml_type, exact=True):
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("tinykern::rvq_encode")
    def _(x, codebooks):
        n, levels = x.shape[0], codebooks.shape[0]
        return x.new_empty((n, levels), dtype=torch.int64), x.new_empty((n, x.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("tinykern::rvq_decode")
    def _(codes, codebooks):
        return codebooks.new_empty((codes.shape[0], codebooks.shape[2]))


def native_ops(fmt):
    """(dequantize(blocks, dtype), matmul(x, w, bias, exact)) of _C for format `fmt`."""
    if fmt.name in NAMED:
        return getattr(torch.ops.tinykern, fmt.op("dequantize")), getattr(torch.ops.tinykern, fmt.op("matmul"))
    dequantize = torch.ops.tinykern.block_dequantize
    matmul = torch.ops.tinykern.block_matmul
    return (lambda blocks, dtype: dequantize(blocks, fmt.ggml_type, dtype),
            lambda x, w, bias, exact: matmul(x, w, bias, fmt.ggml_type, exact))


def _exact_from_context(op):
    """The matmul op with its `exact` flag taken from tinykern.backend(..., exact=...)."""

    def matmul(x, w, bias):
        return op(x, w, bias, backends.exact())

    return matmul


def _register():
    _register_fakes()
    for fmt in FORMATS.values():
        dequantize, matmul = native_ops(fmt)
        impls = {"dequantize": dequantize, "matmul": _exact_from_context(matmul),
                 # Both composites handle any groups, so they serve the grouped op too.
                 "conv2d": functools.partial(conv2d, dequantize),
                 "conv2d_grouped": functools.partial(conv2d, dequantize)}
        for kind, impl in impls.items():
            for backend in ("cpu", "cuda"):
                backends.register(fmt.op(kind), backend)(impl)
    for op in _RVQ_OPS:
        for backend in ("cpu", "cuda"):
            backends.register(op, backend)(getattr(torch.ops.tinykern, op))


if _ext.available():
    _register()
