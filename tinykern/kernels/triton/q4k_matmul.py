"""x @ dequant(w).T + bias with Q4_K weights in Triton: the "triton" q4k_matmul.

Two regimes, by the number of rows M of x:

- skinny (M <= SKINNY_MAX_M): memory-bound GEMV. A program owns SKINNY_BLOCK_N weight rows
  and a slab of their super-blocks (split-K when there are too few row groups to fill the GPU),
  reads each 144-byte block once (16-byte loads, SKINNY_STAGES blocks in flight) and never
  materializes weights: per 32-weight sub-block it uses
  sum(x * (d*sc*q - dmin*m)) = d*sc*sum(x*q) - dmin*m*sum(x), in fp32.
- wide (M > SKINNY_MAX_M): tiled tensor-core GEMM. Each K step of 64 dequantizes a
  [64, BLOCK_N] weight tile in registers (q4k_decode.dequant_chunk) to x's dtype for one
  tl.dot with fp32 accumulation; fp32 x uses 3xTF32 so its error stays near fp32's.

Weight columns past K (row padding) meet masked x loads (zeros); x is never read past K.
"""

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from tinykern import backends
from tinykern.formats import q4k
from tinykern.kernels.triton.q4k_decode import BLOCK, BLOCK_BYTES, block_scales, chunk_scales, dequant_chunk, scale_min
from tinykern.kernels.triton.tiles import grouped_tile

SKINNY_MAX_M = 16
# Weight rows per skinny program: 16 rows x 128 code bytes is one 16-byte load per thread.
SKINNY_BLOCK_N = 16
# Blocks in flight per skinny program (the compiler's asynchronous copies).
SKINNY_STAGES = tl.constexpr(4)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, N, K, nb, blocks_per_split,
                   stride_xm, stride_wn, stride_os, stride_om,
                   HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    w_row = w_ptr + rn.to(tl.int64) * stride_wn
    # A block as [chunk c, lane l]: byte 16+32c+l holds weight 64c+l (low nibble, sub-block 2c)
    # and weight 64c+32+l (high nibble, sub-block 2c+1).
    c = tl.arange(0, 4)
    lane = (32 * c)[:, None] + tl.arange(0, 32)[None, :]
    k_lo = 32 * c[:, None] + lane
    rows = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    b_start = pid_s * blocks_per_split
    for b in tl.range(b_start, tl.minimum(b_start + blocks_per_split, nb), num_stages=SKINNY_STAGES):
        blk = w_row + b * BLOCK_BYTES
        q = tl.load(blk[:, None, None] + 16 + lane[None, :, :], mask=n_mask[:, None, None], other=0)
        q_lo = (q & 15).to(tl.float32)
        q_hi = (q >> 4).to(tl.float32)
        d, dmin, s1, s2, s3 = block_scales(blk, n_mask)
        d, dmin, s1, s2, s3 = d[:, None], dmin[:, None], s1[:, None], s2[:, None], s3[:, None]
        sc_lo, m_lo = scale_min(s1, s2, s3, 2 * c[None, :])
        sc_hi, m_hi = scale_min(s1, s2, s3, 2 * c[None, :] + 1)
        ds_lo, dm_lo = d * sc_lo, dmin * m_lo
        ds_hi, dm_hi = d * sc_hi, dmin * m_hi
        k = b * BLOCK + k_lo
        for m in tl.static_range(ROWS):
            x_m = x_ptr + m * stride_xm
            x_lo = tl.load(x_m + k, mask=k < K, other=0).to(tl.float32)
            x_hi = tl.load(x_m + k + 32, mask=k + 32 < K, other=0).to(tl.float32)
            part = (ds_lo * tl.sum(q_lo * x_lo[None, :, :], axis=2) - dm_lo * tl.sum(x_lo, axis=1)[None, :]
                    + ds_hi * tl.sum(q_hi * x_hi[None, :, :], axis=2) - dm_hi * tl.sum(x_hi, axis=1)[None, :])
            acc += tl.where(rows[:, None] == m, tl.sum(part, axis=1)[None, :], 0.0)
    if HAS_BIAS:
        if pid_s == 0:
            acc += tl.load(bias_ptr + rn, mask=n_mask, other=0).to(tl.float32)[None, :]
    out = out_ptr + pid_s * stride_os + rows[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < ROWS) & n_mask[None, :])


def wide_configs(num_warps=None):
    """Tiles of the dequantize-in-the-loop GEMMs (matmul and conv alike); num_warps overrides
    every config's (Q8_0 spreads its 2-byte weight loads over more threads)."""
    if INTERPRET:
        # The interpreter gains nothing from tuning; one small tile keeps tests fast.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4})]
    tiles = [(128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (32, 128, 4, 4), (16, 128, 4, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=num_warps or warps, num_stages=stages)
            for bm, bn, warps, stages in tiles]


@triton.autotune(configs=wide_configs(), key=["M", "N", "K"])
@triton.jit
def _wide_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K,
                 stride_xm, stride_wn, stride_om,
                 HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    x_row = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_row = w_ptr + rn * stride_wn
    dtype = x_ptr.dtype.element_ty
    kk = tl.arange(0, 64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # Only the 64-weight chunks that hold some k < K: whole chunks of row padding are skipped.
    for i in range(0, tl.cdiv(K, 64)):
        s0, o0, s1, o1 = chunk_scales(w_row, i, n_mask)
        b = dequant_chunk(w_row, i, n_mask, s0, o0, s1, o1, dtype)
        k = i * 64 + kk
        a = tl.load(x_row + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0).to(tl.float32)[None, :]
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@functools.lru_cache(maxsize=None)
def _programs_wanted(device):
    """Skinny programs that keep every SM streaming: four per SM on a GPU (each keeps a few
    blocks in flight), a few on the interpreter (enough that the tests' small shapes still take
    the split-K path)."""
    if device.type != "cuda":
        return 8
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def skinny_split(n_groups, n_steps, device):
    """(splits, steps per split) for a GEMV whose rows take n_steps K steps in n_groups row
    groups: K is split only when the row groups alone would leave SMs idle."""
    splits = max(1, min(_programs_wanted(device) // n_groups, n_steps))
    per = triton.cdiv(n_steps, splits)
    return triton.cdiv(n_steps, per), per


def dot_precision(dtype):
    # 3xTF32 keeps fp32 inputs near fp32 accuracy on tensor cores; fp16/bf16 ignore it.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def kernel_input(x):
    """x as the kernels take it. Under the interpreter (CPU tensors) bf16 runs as fp32, which
    holds it exactly: the interpreter keeps bf16 as raw uint16 bits, so its tl.dot would
    multiply the bits, and its fp32->bf16 casts truncate. The caller rounds the result once."""
    return x.float() if x.dtype == torch.bfloat16 and not x.is_cuda else x


def matmul_launch(skinny_kernel, wide_kernel, x, w, bias, nb, skinny_steps, **skinny_meta):
    """Run x [M, K] @ dequant(w).T (+ bias) -> [M, N] in x.dtype with the regime M picks.

    skinny_steps: the skinny kernel's K steps per row (it splits them across programs when
    the row groups are too few), skinny_meta: its format-specific constexprs."""
    M, K = x.shape
    N = w.shape[0]
    if M == 0 or N == 0:
        return x.new_empty((M, N))
    x_in = x
    x = kernel_input(x)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    w = w.contiguous()
    bias_arg = bias if bias is not None else x  # never read when HAS_BIAS is False
    with torch.cuda.device(x.device.index if x.is_cuda else -1):
        if M <= SKINNY_MAX_M:
            groups = triton.cdiv(N, SKINNY_BLOCK_N)
            splits, per = skinny_split(groups, skinny_steps, x.device)
            # Split K: fp32 partial sums per split (bias added once, by split 0), summed after.
            dst = out if splits == 1 else torch.empty((splits, M, N), dtype=torch.float32, device=x.device)
            skinny_kernel[(groups, splits)](
                x, w, bias_arg, dst, N, K, nb, per,
                x.stride(0), w.stride(0), dst.stride(0) if splits > 1 else 0, dst.stride(-2),
                HAS_BIAS=bias is not None, ROWS=M, BLOCK_M=triton.next_power_of_2(M), BLOCK_N=SKINNY_BLOCK_N,
                num_warps=4, **skinny_meta)
            if splits > 1:
                out.copy_(dst.sum(0))
        else:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
            wide_kernel[grid](
                x, w, bias_arg, out, M, N, K, x.stride(0), w.stride(0), out.stride(0),
                HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype))
    return out.to(x_in.dtype)


@torch.library.custom_op("tinykern::q4k_matmul_triton", mutates_args=())
def q4k_matmul_triton(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] @ dequant(w [N, nb*144]).T (+ bias [N]) -> [M, N] in x.dtype."""
    nb = w.shape[1] // q4k.BLOCK_BYTES
    return matmul_launch(_skinny_kernel, _wide_kernel, x, w, bias, nb, nb)


@q4k_matmul_triton.register_fake
def _(x, w, bias):
    return x.new_empty((x.shape[0], w.shape[0]))


backends.register("q4k_matmul", "triton")(q4k_matmul_triton)
