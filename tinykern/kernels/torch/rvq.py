"""Residual VQ encode/decode in plain torch: the "torch" backend.

Encoding never builds the full N x K distance matrix: rows go through in chunks whose
[rows, K] fp32 distance block stays under CHUNK_BYTES, so memory is O(N*L + L*K*D + CHUNK).
"""

import torch

from tinykern import backends

CHUNK_BYTES = 64 << 20


@backends.register("rvq_encode", "torch")
def rvq_encode(x, codebooks):
    num_levels, k, _ = codebooks.shape
    residual = x.float().clone()
    codes = torch.empty(x.shape[0], num_levels, dtype=torch.int64, device=x.device)
    # The sum of the chosen codewords, levels in order into an fp32 zero as rvq_decode adds
    # them (not x - residual, which is NaN for a row of x holding Inf).
    quantized = torch.zeros_like(residual)
    # ||c||^2 once per code; ||r||^2 is the same for every code of a row, so the argmin drops it.
    norms = codebooks.square().sum(-1)
    rows = max(1, CHUNK_BYTES // (4 * k))
    for start in range(0, x.shape[0], rows):
        r = residual[start:start + rows]
        for level in range(num_levels):
            dist = torch.addmm(norms[level], r, codebooks[level].t(), alpha=-2)
            # A NaN distance never wins (ops.rvq_encode's rule); argmin returns the first
            # minimal index, so ties, and rows with no distance below +Inf, go to the lowest code.
            idx = dist.nan_to_num_(nan=float("inf"), posinf=float("inf"), neginf=float("-inf")).argmin(1)
            codes[start:start + rows, level] = idx
            chosen = codebooks[level].index_select(0, idx)
            r -= chosen
            quantized[start:start + rows] += chosen
    return codes, quantized


@backends.register("rvq_decode", "torch")
def rvq_decode(codes, codebooks):
    n, num_levels = codes.shape
    bad = ((codes < -1) | (codes >= codebooks.shape[1])).nonzero()
    if len(bad):
        row, level = bad[0].tolist()
        raise ValueError(f"rvq_decode: code {int(codes[row, level])} at [{row}, {level}] is out of range for "
                         f"codebooks of shape {list(codebooks.shape)} (expected -1..{codebooks.shape[1] - 1})")
    out = torch.zeros(n, codebooks.shape[2], dtype=torch.float32, device=codes.device)
    # Levels are added in order 0, 1, ... into an fp32 zero so the result is reproducible
    # bit for bit by any implementation that sums in the same order.
    for level in range(num_levels):
        c = codes[:, level].long()
        picked = codebooks[level].index_select(0, c.clamp(min=0)).float()
        out += torch.where((c >= 0)[:, None], picked, 0.0)
    return out.to(codebooks.dtype)
