"""Conv2d with Q4_K weights in Triton (implicit GEMM): the "triton" q4k_conv2d.

The GEMM is out[(b, ho, wo), o] = sum_k x_col[(b, ho, wo), k] * W[o, k] with k = (c, i, j) in
F.unfold order. No im2col tensor exists: each [BLOCK_M, 64] activation tile is gathered from x
with addresses computed from (b, ho, wo) and (c, i, j), padding handled by masks, and x's
strides make NCHW and channels_last inputs work alike (the output takes x's format). The
weight side is the wide q4k_matmul's: each K step of 64 dequantizes a [64, BLOCK_N] tile in
registers for tl.dot. Only groups == 1 runs here: ops.q4k_conv2d sends grouped convs to the
q4k_conv2d_grouped op, which this backend does not implement.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from tinykern import backends
from tinykern.kernels.triton.q4k_decode import chunk_scales, dequant_chunk
from tinykern.kernels.triton.q4k_matmul import dot_precision, kernel_input, wide_configs
from tinykern.kernels.triton.tiles import grouped_tile


@triton.jit
def _x_tile(x_win, h0, w0, m_mask, k0, K, H, W, sxc, sxh, sxw, DH, DW, KH: tl.constexpr, KW: tl.constexpr):
    """x_col[rows, k0 .. k0+63] gathered from x. x_win points at each row's window corner
    (h0, w0), which may lie in the padding: the address splits into a row part and a k part,
    and only the bounds test needs both."""
    k = k0 + tl.arange(0, 64)
    r = k % (KH * KW)
    dh = r // KW * DH
    dw = r % KW * DW
    h = h0[:, None] + dh[None, :]
    w = w0[:, None] + dw[None, :]
    ok = m_mask[:, None] & (k < K)[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    return tl.load(x_win[:, None] + (k // (KH * KW) * sxc + dh * sxh + dw * sxw)[None, :], mask=ok, other=0)


@triton.autotune(configs=wide_configs(), key=["M", "N", "K"])
@triton.jit
def _conv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, H, W, Ho, Wo,
                 sxb, sxc, sxh, sxw, stride_wn, sob, soc, soh, sow,
                 SH, SW, PH, PW, DH, DW,
                 KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
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
    w_row = w_ptr + rn * stride_wn
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # The gathered x tile is too irregular for the compiler's asynchronous copies: the next
    # step's tile is loaded by hand, into registers, while this step's dot runs.
    a_next = _x_tile(x_win, h0, w0, m_mask, 0, K, H, W, sxc, sxh, sxw, DH, DW, KH, KW)
    for i in range(0, tl.cdiv(K, 64)):
        a = a_next
        a_next = _x_tile(x_win, h0, w0, m_mask, 64 * i + 64, K, H, W, sxc, sxh, sxw, DH, DW, KH, KW)
        s0, o0, s1, o1 = chunk_scales(w_row, i, n_mask)
        b = dequant_chunk(w_row, i, n_mask, s0, o0, s1, o1, dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0).to(tl.float32)[None, :]
    out = out_ptr + (img * sob + ho * soh + wo * sow)[:, None] + (rn * soc)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def conv_output(op, x, w, kernel_size, stride, padding, dilation, groups):
    """The empty output of `op`: [B, out, Ho, Wo], channels_last when x is."""
    if groups != 1:
        raise ValueError(f"{op}: the triton backend supports groups=1 only, got groups={groups} "
                         "(the torch backend runs grouped convs)")
    B, _, H, W = x.shape
    Ho, Wo = ((size + 2 * p - d * (k - 1) - 1) // s + 1
              for size, k, s, p, d in zip((H, W), kernel_size, stride, padding, dilation))
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"{op}: input {list(x.shape)} is smaller than the {tuple(kernel_size)} kernel "
                         f"(padding {tuple(padding)}, dilation {tuple(dilation)})")
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((B, w.shape[0], Ho, Wo), dtype=x.dtype, device=x.device, memory_format=fmt)


@torch.library.custom_op("tinykern::q4k_conv2d_triton", mutates_args=())
def q4k_conv2d_triton(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], kernel_size: list[int],
                      stride: list[int], padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    """conv2d(x [B, C, H, W], dequant(w [out, nb*144]) as [out, C, kh, kw]) (+ bias [out])."""
    x_in = x
    x = kernel_input(x)
    out = conv_output("q4k_conv2d", x, w, kernel_size, stride, padding, dilation, groups)
    if out.numel() == 0:
        return out.to(x_in.dtype)
    B, C, H, W = x.shape
    _, N, Ho, Wo = out.shape
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = kernel_size, stride, padding, dilation
    w = w.contiguous()
    M = B * Ho * Wo
    has_bias = bias is not None
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    with torch.cuda.device(x.device.index if x.is_cuda else -1):
        _conv_kernel[grid](
            x, w, bias if has_bias else x, out, M, N, C * KH * KW, H, W, Ho, Wo,
            *x.stride(), w.stride(0), *out.stride(), SH, SW, PH, PW, DH, DW,
            KH=KH, KW=KW, HAS_BIAS=has_bias, PRECISION=dot_precision(x.dtype))
    return out.to(x_in.dtype)


@q4k_conv2d_triton.register_fake
def _(x, w, bias, kernel_size, stride, padding, dilation, groups):
    return conv_output("q4k_conv2d", x, w, kernel_size, stride, padding, dilation, groups)


backends.register("q4k_conv2d", "triton")(q4k_conv2d_triton)
