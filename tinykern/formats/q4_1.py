"""GGML's Q4_1, byte-compatible with GGUF: 32 weights in 20 bytes: fp16 scale d, fp16 minimum m,
16 bytes of 4-bit codes q; value = q*d + m (tinykern.formats.legacy has the layout)."""

import torch

from tinykern.formats import legacy
from tinykern.formats.record import Format

GGML_TYPE = 3
BLOCK = legacy.BLOCK
BLOCK_BYTES = 20
# Every weight must lie in [LOWEST, HIGHEST], and each block's minimum and (max - min)/15 must
# be finite fp16s (a block of weights all above FP16_MAX is refused).
LOWEST, HIGHEST = legacy.affine_range(4)


def quantize(w, name="weight"):
    """Quantize w [..., K] (K a multiple of 32) to Q4_1 blocks, uint8 [..., K/32*20], byte for
    byte as ggml's quantize_row_q4_1_ref (m = min, d = (max - min)/15; codes truncated from
    (x - m)/d + 0.5), in torch on w's device.
    Raises ValueError naming `name` if w holds NaN, Inf, a weight outside [LOWEST, HIGHEST] or a
    block whose minimum or (max - min)/15 overflows fp16."""
    return legacy.quantize_affine(w, name, "Q4_1", 4, GGML_TYPE)


def dequantize(blocks, dtype=torch.float32):
    """Q4_1 blocks uint8 [..., nb*20] -> [..., nb*32], bit-identical to gguf's dequantize."""
    return legacy.dequantize_affine(blocks, dtype, 4)


FORMAT = Format(name="q4_1", ggml_type=GGML_TYPE, block=BLOCK, block_bytes=BLOCK_BYTES, quantize=quantize,
                dequantize=dequantize)
