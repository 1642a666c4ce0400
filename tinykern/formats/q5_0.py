"""GGML's Q5_0, byte-compatible with GGUF: 32 weights in 22 bytes: fp16 scale d, 4 bytes of 5th bits,
16 bytes of low nibbles; value = (q - 16)*d (tinykern.formats.legacy has the layout)."""

import torch

from tinykern.formats import legacy
from tinykern.formats.record import Format

GGML_TYPE = 6
BLOCK = legacy.BLOCK
BLOCK_BYTES = 22
# d = max/-16 must stay a finite fp16.
MAX_ABS = legacy.symmetric_max_abs(5)


def quantize(w, name="weight"):
    """Quantize w [..., K] (K a multiple of 32) to Q5_0 blocks, uint8 [..., K/32*22], byte for
    byte as ggml's quantize_row_q5_0_ref (d = max/-16 with max the signed value of largest
    magnitude; codes truncated from x/d + 16.5), in torch on w's device.
    Raises ValueError naming `name` if w holds NaN, Inf or a magnitude above MAX_ABS."""
    return legacy.quantize_symmetric(w, name, "Q5_0", 5, GGML_TYPE)


def dequantize(blocks, dtype=torch.float32):
    """Q5_0 blocks uint8 [..., nb*22] -> [..., nb*32], bit-identical to gguf's dequantize."""
    return legacy.dequantize_symmetric(blocks, dtype, 5)


FORMAT = Format(name="q5_0", ggml_type=GGML_TYPE, block=BLOCK, block_bytes=BLOCK_BYTES, quantize=quantize,
                dequantize=dequantize)
