"""Byte-level helpers shared by the block formats."""

import torch


def check_finite(w, name):
    if not bool(torch.isfinite(w).all()):
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"{name}: cannot quantize a weight holding NaN or Inf ({bad} of {w.numel()} values)")


def round_to_fp16(x):
    """x rounded to the nearest fp16, back in float32 (how the formats store scales)."""
    return x.to(torch.float16).float()


def fp16_bytes(x):
    """float32 [n] -> its fp16 little-endian bytes, uint8 [n, 2]."""
    return x.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def fp16_from_bytes(b):
    """uint8 [n, 2] little-endian fp16 -> float32 [n]."""
    return b.contiguous().view(torch.float16).reshape(-1).float()
