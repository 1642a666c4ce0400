"""Matmul and dequantize for any GGML block format in Triton, the format's decoder
(tinykern.kernels.triton.decode) a tl.constexpr of one kernel per regime.

Two regimes, by the number of rows M of x (the split of q4k_matmul.matmul_launch):

- skinny (M <= 16): GEMV. A program owns SKINNY_BLOCK_N weight rows and a slab of K (split-K
  when the row groups are too few to fill the GPU); each step of 256/BLOCK_M weights (16 at
  least) decodes a fp32 tile and adds x * w into an accumulator of the tile's shape times
  BLOCK_M, reduced once after the loop (no cross-thread reduction inside it).
- wide (M > 16): tiled GEMM. Each K step of BLOCK_K decodes a [BLOCK_K, BLOCK_N] tile in
  registers, rounds it to x's dtype for one tl.dot with fp32 accumulation (3xTF32 for fp32 x).

Steps are cut into runs of min(step, block) weights, each inside one block, so the decoder
reads a block's header once per row and run, not once per weight.

Weights at k >= K are never read (masked decodes), so row padding never meets x, whatever
it holds. Q4_K and Q8_0 keep their tuned kernels as the registered ops; these kernels serve
them too (tests compare) so that they could switch.
"""

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from tinykern import backends
from tinykern.formats import FORMATS
from tinykern.kernels.triton.decode import DECODERS
from tinykern.kernels.triton.q4k_matmul import matmul_launch, wide_configs
from tinykern.kernels.triton.tiles import grouped_tile

# Weights per wide K step: one tl.dot of K 64.
WIDE_BLOCK_K = 64
# Weights per dequantize program, at least (whole blocks).
DEQUANT_WEIGHTS = 1024
# Formats whose registered ops stay their tuned kernels (q4k_matmul.py, q8_0_matmul.py).
TUNED = ("q4_k", "q8_0")


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, N, K, n_steps, steps_per_split,
                   stride_xm, stride_wn, stride_os, stride_om,
                   HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   DECODE: tl.constexpr, BLOCK: tl.constexpr, NBS: tl.constexpr, SUB: tl.constexpr):
    # A step is NBS runs of SUB weights, each run inside one block (SUB divides BLOCK; NBS > 1
    # only when SUB == BLOCK): as [run, weight] tiles, each run's header is read once per row.
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    w_row = (w_ptr + rn.to(tl.int64) * stride_wn)[:, None, None]
    rows = tl.arange(0, BLOCK_M)
    x_row = (x_ptr + rows * stride_xm)[:, None, None]
    m_mask = (rows < ROWS)[:, None, None]
    run = tl.arange(0, NBS) * SUB
    kk = run[:, None] + tl.arange(0, SUB)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N, NBS, SUB], tl.float32)
    first = pid_s * steps_per_split
    for s in range(first, tl.minimum(first + steps_per_split, n_steps)):
        k0 = s * NBS * SUB
        k = (k0 + kk)[None, :, :]
        k_ok = k < K
        # j is taken from the full index vector, as k % BLOCK: Triton's alignment analysis then
        # sees runs of adjacent code bytes and widens loads.
        start = (k0 + run)[None, :, None]
        w = DECODE(w_row, start // BLOCK, k % BLOCK, n_mask[:, None, None] & (start < K),
                   n_mask[:, None, None] & k_ok)
        xv = tl.load(x_row + k, mask=m_mask & k_ok, other=0).to(tl.float32)
        acc += xv[:, None, :, :] * w[None, :, :, :]
    y = tl.sum(tl.sum(acc, axis=3), axis=2)
    if HAS_BIAS:
        if pid_s == 0:
            y += tl.load(bias_ptr + rn, mask=n_mask, other=0).to(tl.float32)[None, :]
    out = out_ptr + pid_s * stride_os + rows[:, None] * stride_om + rn[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=(rows < ROWS)[:, None] & n_mask[None, :])


# BLOCK_BYTES (unique per format) keys the tuning too: one format's best tile is not another's.
@triton.autotune(configs=wide_configs(), key=["M", "N", "K", "BLOCK_BYTES"])
@triton.jit
def _wide_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K,
                 stride_xm, stride_wn, stride_om,
                 HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                 DECODE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_BYTES: tl.constexpr, BLOCK_K: tl.constexpr,
                 NBS: tl.constexpr, SUB: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    x_row = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_row = (w_ptr + rn.to(tl.int64) * stride_wn)[None, :]
    dtype = x_ptr.dtype.element_ty
    kk = tl.arange(0, BLOCK_K)
    run = tl.arange(0, NBS) * SUB
    kr = run[:, None] + tl.arange(0, SUB)[None, :]
    w_row3 = w_row[None, :, :]
    n_mask3 = n_mask[None, None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for i in range(0, tl.cdiv(K, BLOCK_K)):
        # The step as NBS runs of SUB weights, each inside one block: one header load per
        # row and run (j as in the skinny kernel).
        k0 = i * BLOCK_K
        k3 = (k0 + kr)[:, :, None]
        start = (k0 + run)[:, None, None]
        b = DECODE(w_row3, start // BLOCK, k3 % BLOCK, n_mask3 & (start < K), n_mask3 & (k3 < K))
        # [BLOCK_K, BLOCK_N]: transposed for tl.dot.
        b = tl.reshape(b, (BLOCK_K, BLOCK_N))
        k = k0 + kk
        a = tl.load(x_row + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0)
        acc = tl.dot(a, b.to(dtype), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0).to(tl.float32)[None, :]
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dequantize_kernel(w_ptr, out_ptr, n_blocks, DECODE: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr):
    # The blocks as one flat sequence (rows are whole blocks, back to back), TILE of them per
    # program as [TILE, BLOCK]: one header load per block.
    b = (tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE))[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    ok = b < n_blocks
    w = DECODE(w_ptr, b, j, ok, ok)
    tl.store(out_ptr + b * BLOCK + j, w.to(out_ptr.dtype.element_ty), mask=ok)


class _WithMeta:
    """A kernel whose launches get extra constexprs: matmul_launch passes the wide kernel only
    the arguments every format shares."""

    def __init__(self, kernel, **meta):
        self.kernel, self.meta = kernel, meta

    def __getitem__(self, grid):
        return functools.partial(self.kernel[grid], **self.meta)


def decoder(fmt):
    """(name, DECODERS entry) of format `fmt`, a DECODERS name or a tinykern.formats record."""
    name = fmt if isinstance(fmt, str) else fmt.name
    if name not in DECODERS:
        raise ValueError(f"no Triton decoder for format {name!r}; expected one of {list(DECODERS)}")
    return name, DECODERS[name]


def skinny_step(block_m):
    """Weights per skinny K step for block_m rows of x: the accumulator (block_m x 16 rows x
    step, fp32, over 128 threads) stays at 32 registers a thread."""
    return max(16, 256 // block_m)


def _matmul(fmt, x, w, bias):
    _, dec = decoder(fmt)
    if x.stride(-1) != 1:  # the kernels step along K by address
        x = x.contiguous()
    M, K = x.shape
    ks = skinny_step(triton.next_power_of_2(max(M, 1)))
    sub = min(ks, dec.block)
    n_steps = max(1, triton.cdiv(K, ks))  # one (fully masked) step when K is 0
    wide = _WithMeta(_wide_kernel, DECODE=dec.fn, BLOCK=dec.block, BLOCK_BYTES=dec.block_bytes,
                     BLOCK_K=WIDE_BLOCK_K, NBS=WIDE_BLOCK_K // min(WIDE_BLOCK_K, dec.block),
                     SUB=min(WIDE_BLOCK_K, dec.block))
    return matmul_launch(_skinny_kernel, wide, x, w, bias, n_steps, n_steps,
                         DECODE=dec.fn, BLOCK=dec.block, NBS=ks // sub, SUB=sub)


def _dequantize(fmt, blocks, dtype):
    _, dec = decoder(fmt)
    nb = blocks.shape[-1] // dec.block_bytes
    blocks = blocks.contiguous()
    # The interpreter's fp32->bf16 cast truncates: there, round once in torch.
    kernel_dtype = torch.float32 if dtype == torch.bfloat16 and not blocks.is_cuda else dtype
    out = torch.empty((*blocks.shape[:-1], nb * dec.block), dtype=kernel_dtype, device=blocks.device)
    n_blocks = out.numel() // dec.block
    if n_blocks:
        tile = max(1, DEQUANT_WEIGHTS // dec.block)
        with torch.cuda.device(blocks.device.index if blocks.is_cuda else -1):
            _dequantize_kernel[(triton.cdiv(n_blocks, tile),)](
                blocks, out, n_blocks, DECODE=dec.fn, BLOCK=dec.block, TILE=tile)
    return out.to(dtype)


@torch.library.custom_op("tinykern::block_matmul_triton", mutates_args=())
def _matmul_op(fmt: str, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _matmul(fmt, x, w, bias)


@_matmul_op.register_fake
def _(fmt, x, w, bias):
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("tinykern::block_dequantize_triton", mutates_args=())
def _dequantize_op(fmt: str, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _dequantize(fmt, blocks, dtype)


@_dequantize_op.register_fake
def _(fmt, blocks, dtype):
    _, dec = decoder(fmt)
    return blocks.new_empty((*blocks.shape[:-1], blocks.shape[-1] // dec.block_bytes * dec.block), dtype=dtype)


def block_matmul_triton(fmt, x, w, bias=None):
    """x [M, K] @ dequant(w [N, nb*block_bytes]).T (+ bias [N]) -> [M, N] in x.dtype, K <=
    nb*block; fmt a DECODERS name or a tinykern.formats record."""
    return _matmul_op(decoder(fmt)[0], x, w, bias)


def block_dequantize_triton(fmt, blocks, dtype=torch.float32):
    """Blocks uint8 [..., nb*block_bytes] -> [..., nb*block] in dtype (computed in fp32 as
    gguf-py does, then rounded once)."""
    return _dequantize_op(decoder(fmt)[0], blocks, dtype)


def op_name(name, kind):
    """The registry's name of format `name`'s `kind` op (e.g. "q4k_matmul")."""
    return FORMATS[name].op(kind)


for _name in DECODERS:
    if _name not in TUNED:
        backends.register(op_name(_name, "matmul"), "triton")(functools.partial(block_matmul_triton, _name))
        backends.register(op_name(_name, "dequantize"), "triton")(functools.partial(block_dequantize_triton, _name))
