"""GGML's Q8_0: 32 weights in 34 bytes (fp16 scale d, 32 int8 codes), byte-compatible with GGUF."""

import torch

from tinykern.formats.common import FP16_MAX, float32_in_range, fp16_bytes, fp16_from_bytes, native_quantize
from tinykern.formats.record import Format

BLOCK = 32
BLOCK_BYTES = 34
# d = amax/127 must stay a finite fp16.
MAX_ABS = 127 * FP16_MAX


def quantize(w, name="weight"):
    """Quantize w [..., K] (K a multiple of 32) to Q8_0 blocks, uint8 [..., K/32*34], exactly as
    the reference quantizer does (d = amax/127 in fp32, codes rounded half away from zero): the
    compiled quantizer on CPU tensors, torch elsewhere (the same bytes).
    Raises ValueError naming `name` if w holds NaN, Inf or a magnitude above MAX_ABS."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"{name}: Q8_0 needs rows that are a multiple of {BLOCK}, got shape {list(w.shape)}")
    x = float32_in_range(w, name, "Q8_0", -MAX_ABS, MAX_ABS).reshape(-1, BLOCK)
    out = native_quantize("q8_0_quantize", x)
    if out is not None:
        return out.reshape(*w.shape[:-1], w.shape[-1] // BLOCK * BLOCK_BYTES)
    d = x.abs().amax(dim=1) / 127
    inv = torch.where(d > 0, 1 / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))
    q = _round_half_away(x * inv[:, None]).to(torch.int8)
    out = torch.cat((fp16_bytes(d), q.view(torch.uint8)), dim=1)
    return out.reshape(*w.shape[:-1], w.shape[-1] // BLOCK * BLOCK_BYTES)


def dequantize(blocks, dtype=torch.float32):
    """Q8_0 blocks uint8 [..., nb*34] -> [..., nb*32], bit-identical to gguf's dequantize."""
    b = blocks.reshape(-1, BLOCK_BYTES)
    d = fp16_from_bytes(b[:, 0:2])
    q = b[:, 2:].contiguous().view(torch.int8).float()
    w = d[:, None] * q
    return w.to(dtype).reshape(*blocks.shape[:-1], blocks.shape[-1] // BLOCK_BYTES * BLOCK)


def _round_half_away(v):
    # C's roundf. floor(|v| + 0.5) is wrong just below 0.5 (0.49999997 + 0.5 rounds to 1.0).
    a = v.abs()
    whole = a.floor()
    return torch.copysign(whole + (2 * (a - whole)).floor(), v)


FORMAT = Format(name="q8_0", ggml_type=8, block=BLOCK, block_bytes=BLOCK_BYTES, quantize=quantize,
                dequantize=dequantize, linear="Q8Linear")
