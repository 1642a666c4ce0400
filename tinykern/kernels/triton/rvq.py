"""Residual VQ encode/decode in Triton: the "triton" backend.

Encode: a program owns BLOCK_N rows and keeps their fp32 residual on chip through all L
levels. For each level it streams the codebook in tiles of BLOCK_K codes, scores them with
||c||^2 - 2 r.c (||c||^2 precomputed by the launcher, ||r||^2 dropped: it does not change the
argmin) and keeps a running min/argmin, so no N x K matrix exists anywhere. Only codes [N, L]
are written; quantized [N, D] is their decode: memory is O(N*L + N*D + L*K*D).

Decode: gather the selected codewords level by level and add them in fp32.
"""

import contextlib

import torch
import triton
import triton.language as tl

from tinykern import backends

# The residual tile [BLOCK_N, next_pow2(D)] lives in registers; past this it would spill.
MAX_DIM = 512


@triton.jit
def _rvq_encode_kernel(x_ptr, cb_ptr, norms_ptr, codes_ptr, N, K, D, L,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                       USE_DOT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    tile_ok = row_ok[:, None] & dim_ok[None, :]
    r = tl.load(x_ptr + rows[:, None] * D + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for level in range(L):
        cb = cb_ptr + level * K * D
        best_d = tl.full([BLOCK_N], float("inf"), tl.float32)
        best_i = tl.zeros([BLOCK_N], tl.int32)
        for k0 in range(0, K, BLOCK_K):
            k_idx = k0 + ks
            k_ok = k_idx < K
            c = tl.load(cb + k_idx[:, None] * D + dims[None, :], mask=k_ok[:, None] & dim_ok[None, :], other=0.0)
            if USE_DOT:
                # "ieee" keeps full fp32 products (tf32 would flip near-equal distances).
                dot = tl.dot(r, tl.trans(c), input_precision="ieee")
            else:
                # D of 8 or less: a dot would pad D to 16, the broadcast does the exact work.
                dot = tl.sum(r[:, None, :] * c[None, :, :], axis=2)
            # Padded codes get +inf so they never win, and so do NaN distances (ops.rvq_encode's rule).
            norms = tl.load(norms_ptr + level * K + k_idx, mask=k_ok, other=float("inf"))
            dist = norms[None, :] - 2.0 * dot
            dist = tl.where(dist != dist, float("inf"), dist)
            tile_d, tile_i = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
            # Strict < : tiles come in increasing code order, so a tie keeps the earlier code.
            better = tile_d < best_d
            best_d = tl.where(better, tile_d, best_d)
            best_i = tl.where(better, tile_i + k0, best_i)
        tl.store(codes_ptr + rows * L + level, best_i.to(tl.int64), mask=row_ok)
        chosen = tl.load(cb + best_i.to(tl.int64)[:, None] * D + dims[None, :], mask=tile_ok, other=0.0)
        r = r - chosen


@triton.jit
def _rvq_decode_kernel(codes_ptr, cb_ptr, out_ptr, N, K, D, L,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Same order as the torch reference (levels 0, 1, ... into an fp32 zero): identical sums.
    for level in range(L):
        code = tl.load(codes_ptr + rows * L + level, mask=row_ok, other=-1).to(tl.int64)
        # -1 (dropped level) adds nothing; any other code out of range is never read and
        # poisons its row with NaN instead (raising would need a host sync).
        use = (code >= 0) & (code < K)
        ptrs = cb_ptr + level * K * D + code[:, None] * D + dims[None, :]
        acc += tl.load(ptrs, mask=use[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.where(((code < -1) | (code >= K))[:, None], float("nan"), acc)
    tl.store(out_ptr + rows[:, None] * D + dims[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def _encode_config(d):
    """(BLOCK_N, BLOCK_K, BLOCK_D, USE_DOT, num_warps) for dimension d."""
    block_d = triton.next_power_of_2(d)
    if block_d <= 8:
        return 32, 32, block_d, False, 4
    block_d = max(block_d, 16)
    if block_d <= 64:
        return 64, 64, block_d, True, 4
    if block_d <= 256:
        return 64, 32, block_d, True, 8
    return 32, 32, block_d, True, 8


def _on_device(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("tinykern::rvq_encode_triton", mutates_args=())
def rvq_encode_triton(x: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, codebooks = x.contiguous(), codebooks.contiguous()
    n, d = x.shape
    num_levels, k, _ = codebooks.shape
    if d > MAX_DIM or (k == 0 and num_levels > 0):
        raise ValueError(
            f"rvq_encode (triton): x {list(x.shape)} {x.dtype}, codebooks {list(codebooks.shape)}: the "
            f"Triton kernel needs 1 <= K and D <= {MAX_DIM} (its residual stays in registers); use the "
            "cuda/cpu/torch backend, or project to a smaller codebook_dim"
        )
    codes = torch.empty(n, num_levels, dtype=torch.int64, device=x.device)
    if n == 0:
        return codes, _decode(codes, codebooks)
    norms = codebooks.square().sum(-1).contiguous()
    block_n, block_k, block_d, use_dot, warps = _encode_config(d)
    with _on_device(x):
        _rvq_encode_kernel[(triton.cdiv(n, block_n),)](
            x, codebooks, norms, codes, n, k, d, num_levels,
            BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, USE_DOT=use_dot, num_warps=warps,
        )
    # quantized is the decode of the codes, a second launch: the sum of the chosen codewords
    # in level order, as the other backends add them (x - residual would be NaN where x is Inf,
    # and keeping a sum live through the levels would double the kernel's registers).
    return codes, _decode(codes, codebooks)


@rvq_encode_triton.register_fake
def _(x, codebooks):
    return (x.new_empty(x.shape[0], codebooks.shape[0], dtype=torch.int64),
            x.new_empty(x.shape, dtype=torch.float32))


@torch.library.custom_op("tinykern::rvq_decode_triton", mutates_args=())
def rvq_decode_triton(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    return _decode(codes.contiguous(), codebooks.contiguous())


def _decode(codes, codebooks):
    n, num_levels = codes.shape
    _, k, d = codebooks.shape
    out = torch.empty(n, d, dtype=codebooks.dtype, device=codes.device)
    if n == 0 or d == 0:
        return out
    block_d = min(triton.next_power_of_2(d), 128)
    block_n = 32
    with _on_device(codes):
        _rvq_decode_kernel[(triton.cdiv(n, block_n), triton.cdiv(d, block_d))](
            codes, codebooks, out, n, k, d, num_levels, BLOCK_N=block_n, BLOCK_D=block_d,
        )
    return out


@rvq_decode_triton.register_fake
def _(codes, codebooks):
    return codebooks.new_empty(codes.shape[0], codebooks.shape[2])


backends.register("rvq_encode", "triton")(rvq_encode_triton)
backends.register("rvq_decode", "triton")(rvq_decode_triton)
