"""GGML's Q4_0, byte-compatible with GGUF: 32 weights in 18 bytes: fp16 scale d, 16 bytes of 4-bit
codes q; value = (q - 8)*d (tinykern.formats.legacy has the layout)."""

import torch

from tinykern.formats import legacy
from tinykern.formats.record import Format

GGML_TYPE = 2
BLOCK = legacy.BLOCK
BLOCK_BYTES = 18
# d = max/-8 must stay a finite fp16.
MAX_ABS = legacy.symmetric_max_abs(4)


def quantize(w, name="weight"):
    """Quantize w [..., K] (K a multiple of 32) to Q4_0 blocks, uint8 [..., K/32*18], byte for
    byte as ggml's quantize_row_q4_0_ref (d = max/-8 with max the signed value of largest
    magnitude; codes truncated from x/d + 8.5), in torch on w's device.
    Raises ValueError naming `name` if w holds NaN, Inf or a magnitude above MAX_ABS."""
    return legacy.quantize_symmetric(w, name, "Q4_0", 4, GGML_TYPE)


def dequantize(blocks, dtype=torch.float32):
    """Q4_0 blocks uint8 [..., nb*18] -> [..., nb*32], bit-identical to gguf's dequantize."""
    return legacy.dequantize_symmetric(blocks, dtype, 4)


FORMAT = Format(name="q4_0", ggml_type=GGML_TYPE, block=BLOCK, block_bytes=BLOCK_BYTES, quantize=quantize,
                dequantize=dequantize)
