"""Conv2d for any GGML block format in Triton (implicit GEMM), the format's decoder
(tinykern.kernels.triton.decode) a tl.constexpr: the "triton" conv2d of every format but Q4_K,
which keeps its tuned kernel (q4k_conv2d.py).

The GEMM is out[(b, ho, wo), o] = sum_k x_col[(b, ho, wo), k] * W[o, k] with k = (c, i, j) in
F.unfold order, as in q4k_conv2d.py: each [BLOCK_M, 64] activation tile is gathered from x by
address (padding by masks, any strides, so NCHW and channels_last alike; the output takes x's
format), and each K step of 64 decodes a [64, BLOCK_N] weight tile in registers as
block_matmul's wide kernel does (runs of min(64, block) weights inside one block, one header
load per row and run), rounded to x's dtype for one tl.dot with fp32 accumulation.

Weights at k >= K (row padding) are never read. Only groups == 1 runs here, as for Q4_K:
grouped convs are the conv2d_grouped op, which this backend does not implement.
"""

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from tinykern import backends
from tinykern.kernels.triton.block_matmul import decoder, op_name
from tinykern.kernels.triton.decode import DECODERS
from tinykern.kernels.triton.q4k_conv2d import _x_tile, conv_output
from tinykern.kernels.triton.q4k_matmul import dot_precision, kernel_input, wide_configs
from tinykern.kernels.triton.tiles import grouped_tile

# Weights per K step: one tl.dot of K 64 (the width _x_tile gathers); a kernel argument, as
# a plain global is invisible to the compiled (not interpreted) kernel.
BLOCK_K = 64
# Formats whose conv2d op stays a tuned kernel.
TUNED = ("q4_k",)


# BLOCK_BYTES (unique per format) keys the tuning: one format's best tile is not another's.
@triton.autotune(configs=wide_configs(), key=["M", "N", "K", "BLOCK_BYTES"])
@triton.jit
def _conv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, H, W, Ho, Wo,
                 sxb, sxc, sxh, sxw, stride_wn, sob, soc, soh, sow,
                 SH, SW, PH, PW, DH, DW,
                 KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                 DECODE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_BYTES: tl.constexpr, BLOCK_K: tl.constexpr,
                 NBS: tl.constexpr, SUB: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    img = (rm // (Ho * Wo)).to(tl.int64)
    ho = rm % (Ho * Wo) // Wo
    wo = rm % Wo
    h0 = ho * SH - PH
    w0 = wo * SW - PW
    x_win = x_ptr + img * sxb + h0 * sxh + w0 * sxw
    # [run, weight, row] decode tiles, reshaped to [BLOCK_K, BLOCK_N] for tl.dot.
    w_row3 = (w_ptr + rn.to(tl.int64) * stride_wn)[None, None, :]
    n_mask3 = n_mask[None, None, :]
    run = tl.arange(0, NBS) * SUB
    kr = run[:, None] + tl.arange(0, SUB)[None, :]
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # The gathered x tile is too irregular for the compiler's asynchronous copies: the next
    # step's tile is loaded by hand, into registers, while this step's dot runs.
    a_next = _x_tile(x_win, h0, w0, m_mask, 0, K, H, W, sxc, sxh, sxw, DH, DW, KH, KW)
    for i in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_next
        a_next = _x_tile(x_win, h0, w0, m_mask, BLOCK_K * i + BLOCK_K, K, H, W, sxc, sxh, sxw, DH, DW, KH, KW)
        k0 = i * BLOCK_K
        # j as the full index vector mod BLOCK: the alignment analysis then sees runs of
        # adjacent code bytes (as in block_matmul).
        k3 = (k0 + kr)[:, :, None]
        start = (k0 + run)[:, None, None]
        b = DECODE(w_row3, start // BLOCK, k3 % BLOCK, n_mask3 & (start < K), n_mask3 & (k3 < K))
        b = tl.reshape(b, (BLOCK_K, BLOCK_N))
        acc = tl.dot(a, b.to(dtype), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0).to(tl.float32)[None, :]
    out = out_ptr + (img * sob + ho * soh + wo * sow)[:, None] + (rn * soc)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@torch.library.custom_op("tinykern::block_conv2d_triton", mutates_args=())
def _conv2d_op(fmt: str, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], kernel_size: list[int],
               stride: list[int], padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    dec = decoder(fmt)[1]
    x_in = x
    x = kernel_input(x)
    out = conv_output(op_name(fmt, "conv2d"), x, w, kernel_size, stride, padding, dilation, groups)
    if out.numel() == 0:
        return out.to(x_in.dtype)
    B, C, H, W = x.shape
    _, N, Ho, Wo = out.shape
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = kernel_size, stride, padding, dilation
    w = w.contiguous()
    M = B * Ho * Wo
    has_bias = bias is not None
    sub = min(BLOCK_K, dec.block)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    with torch.cuda.device(x.device.index if x.is_cuda else -1):
        _conv_kernel[grid](
            x, w, bias if has_bias else x, out, M, N, C * KH * KW, H, W, Ho, Wo,
            *x.stride(), w.stride(0), *out.stride(), SH, SW, PH, PW, DH, DW,
            KH=KH, KW=KW, HAS_BIAS=has_bias, PRECISION=dot_precision(x.dtype),
            DECODE=dec.fn, BLOCK=dec.block, BLOCK_BYTES=dec.block_bytes, BLOCK_K=BLOCK_K,
            NBS=BLOCK_K // sub, SUB=sub)
    return out.to(x_in.dtype)


@_conv2d_op.register_fake
def _(fmt, x, w, bias, kernel_size, stride, padding, dilation, groups):
    decoder(fmt)
    return conv_output(op_name(fmt, "conv2d"), x, w, kernel_size, stride, padding, dilation, groups)


def block_conv2d_triton(fmt, x, w, bias, kernel_size, stride, padding, dilation, groups):
    """conv2d(x [B, C, H, W], dequant(w [out, nb*block_bytes]) as [out, C, kh, kw]) (+ bias
    [out]) in x.dtype; fmt a DECODERS name or a tinykern.formats record."""
    name = fmt if isinstance(fmt, str) else fmt.name
    return _conv2d_op(name, x, w, bias, list(kernel_size), list(stride), list(padding), list(dilation), groups)


for _name in DECODERS:
    if _name not in TUNED:
        backends.register(op_name(_name, "conv2d"), "triton")(functools.partial(block_conv2d_triton, _name))
