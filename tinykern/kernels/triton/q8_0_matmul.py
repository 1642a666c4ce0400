"""x @ dequant(w).T + bias with Q8_0 weights in Triton: the "triton" q8_0_matmul.

Q8_0 blocks are 34 bytes: fp16 d, then 32 int8 codes; w = d * q. The same two regimes as
q4k_matmul, by the number of rows M of x:

- skinny (M <= SKINNY_MAX_M): GEMV over [BLOCK_N rows, GROUP blocks, 32] code tiles, each
  block's contribution d * sum(x*q) in fp32, split-K when row groups are too few.
- wide: tiled GEMM; each K step of 64 dequantizes two blocks as a [64, BLOCK_N] tile in x's
  dtype for tl.dot with fp32 accumulation (3xTF32 for fp32 x).

34-byte blocks are only 2-byte aligned: too narrow for the compiler's asynchronous copies
(4 bytes at least). The skinny kernel loads its next step's weights by hand, in registers,
while the current step computes; the wide kernel reads codes in 2-byte pairs and relies on
its other warps to hide the loads.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from tinykern import backends
from tinykern.formats import q8_0
from tinykern.kernels.triton.q4k_matmul import matmul_launch, wide_configs
from tinykern.kernels.triton.tiles import grouped_tile

# Q8_0 geometry for the kernels (Triton reads only constexpr globals).
BLOCK = tl.constexpr(32)
BLOCK_BYTES = tl.constexpr(34)
BLOCK_HALVES = tl.constexpr(17)
# Blocks a skinny program reads per step (its next step waits in registers meanwhile).
GROUP_BLOCKS = 4


@triton.jit
def _load_group(w_row, grp, nb, n_mask, GROUP: tl.constexpr):
    """Raw codes [BLOCK_N, GROUP, 32] (uint8) and d [BLOCK_N, GROUP] (fp16) of block group grp."""
    blk = grp * GROUP + tl.arange(0, GROUP)
    ok = n_mask[:, None] & (blk < nb)[None, :]
    base = w_row[:, None] + (blk * BLOCK_BYTES)[None, :]
    d = tl.load(base.to(tl.pointer_type(tl.float16)), mask=ok, other=0)
    q = tl.load(base[:, :, None] + 2 + tl.arange(0, 32)[None, None, :], mask=ok[:, :, None], other=0)
    return q, d


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, N, K, nb, groups_per_split,
                   stride_xm, stride_wn, stride_os, stride_om,
                   HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   GROUP: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    w_row = w_ptr + rn.to(tl.int64) * stride_wn
    lane = tl.arange(0, 32)
    rows = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    first = pid_s * groups_per_split
    last = tl.minimum(first + groups_per_split, tl.cdiv(nb, GROUP))
    q_next, d_next = _load_group(w_row, first, nb, n_mask, GROUP)
    for grp in range(first, last):
        q = q_next.to(tl.int8, bitcast=True).to(tl.float32)
        d = d_next.to(tl.float32)
        q_next, d_next = _load_group(w_row, grp + 1, nb, n_mask & (grp + 1 < last), GROUP)
        k = (grp * GROUP + tl.arange(0, GROUP))[:, None] * BLOCK + lane[None, :]
        for m in tl.static_range(ROWS):
            xv = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0).to(tl.float32)
            y = tl.sum(d * tl.sum(q * xv[None, :, :], axis=2), axis=1)
            acc += tl.where(rows[:, None] == m, y[None, :], 0.0)
    if HAS_BIAS:
        if pid_s == 0:
            acc += tl.load(bias_ptr + rn, mask=n_mask, other=0).to(tl.float32)[None, :]
    out = out_ptr + pid_s * stride_os + rows[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < ROWS) & n_mask[None, :])


@triton.jit
def _load_pair(w_row, i, K, n_mask):
    """Codes [64, BLOCK_N] (int16 holding int8 values, transposed for tl.dot) and the two d
    [BLOCK_N] (fp16) of blocks 2i and 2i+1 of the rows at byte pointers w_row; nothing is read
    at k >= K. Codes are read two at a time, as the 16 halves after each block's d (the
    widest load a 2-byte-aligned block allows), then split into bytes in K order."""
    halves = (w_row + 2 * i * BLOCK_BYTES).to(tl.pointer_type(tl.int16))
    j = tl.arange(0, 32)
    ok = (64 * i + 2 * j < K)[:, None] & n_mask[None, :]
    pairs = tl.load(halves[None, :] + (j // 16 * BLOCK_HALVES + 1 + j % 16)[:, None], mask=ok, other=0)
    low = (pairs << 8) >> 8  # codes 2j, sign-extended
    q = tl.reshape(tl.permute(tl.join(low, pairs >> 8), (0, 2, 1)), (64, low.shape[1]))
    d = halves.to(tl.pointer_type(tl.float16))
    d0 = tl.load(d, mask=n_mask & (64 * i < K), other=0)
    d1 = tl.load(d + BLOCK_HALVES, mask=n_mask & (64 * i + BLOCK < K), other=0)
    return q, d0, d1


@triton.autotune(configs=wide_configs(num_warps=8), key=["M", "N", "K"])
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
    high = (kk >= BLOCK)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for i in range(0, tl.cdiv(K, 64)):
        q, d0, d1 = _load_pair(w_row, i, K, n_mask)
        d = tl.where(high, d1.to(tl.float32)[None, :], d0.to(tl.float32)[None, :])
        b = (q.to(tl.float32) * d).to(dtype)
        k = 64 * i + kk
        a = tl.load(x_row + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0).to(tl.float32)[None, :]
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@torch.library.custom_op("tinykern::q8_0_matmul_triton", mutates_args=())
def q8_0_matmul_triton(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [M, K] @ dequant(w [N, nb*34]).T (+ bias [N]) -> [M, N] in x.dtype."""
    nb = w.shape[1] // q8_0.BLOCK_BYTES
    return matmul_launch(_skinny_kernel, _wide_kernel, x, w, bias, nb, triton.cdiv(nb, GROUP_BLOCKS),
                         GROUP=GROUP_BLOCKS)


@q8_0_matmul_triton.register_fake
def _(x, w, bias):
    return x.new_empty((x.shape[0], w.shape[0]))


backends.register("q8_0_matmul", "triton")(q8_0_matmul_triton)
