"""GGML's Q2_K: 256 weights in 84 bytes, byte-compatible with GGUF.

Layout: 16 bytes of 4-bit scale (low nibble) and min (high nibble) for sixteen 16-weight
sub-blocks, 64 bytes of 2-bit codes, fp16 d, fp16 dmin. A weight is
d * scale * code - dmin * min, code 0..3.
"""

import torch

from tinykern.formats import kquants
from tinykern.formats.common import FP16_MAX, fp16_bytes, fp16_from_bytes, quantize_blocks, round_to_fp16
from tinykern.formats.record import Format

GGML_TYPE = 10
BLOCK = 256
BLOCK_BYTES = 84
SUB = 16
NMAX = 3
# Down to -dmin*15 (the largest min), up to d*15*3 with min 0.
LOWEST = -15 * FP16_MAX
HIGHEST = 15 * NMAX * FP16_MAX
# Super-blocks quantized at a time: bounds the temporaries, and amortizes the per-element loops.
_CHUNK = 2048


def quantize(w, name="weight"):
    """Quantize w [..., K] (K a multiple of 256) to Q2_K blocks, uint8 [..., K/256*84].

    A torch port of GGML's quantize_row_q2_K_ref (make_qkx2_quants with weights |x| and absolute
    error over 16 grids per sub-block, 4-bit scales and mins, codes recomputed against the stored
    scales), vectorized over blocks on w's device, byte-identical to it. On the CPU the compiled
    port of tinykern._C runs instead (the same bytes; `with tinykern.backend("torch")` forces this
    one). Raises ValueError naming `name` if w holds NaN, Inf or values outside [LOWEST, HIGHEST].
    """
    return quantize_blocks(w, name, "Q2_K", LOWEST, HIGHEST, GGML_TYPE, BLOCK, BLOCK_BYTES, _quantize_blocks, _CHUNK)


def dequantize(blocks, dtype=torch.float32):
    """Q2_K blocks uint8 [..., nb*84] -> [..., nb*256], bit-identical to gguf's dequantize."""
    b = blocks.reshape(-1, BLOCK_BYTES)
    d = fp16_from_bytes(b[:, 80:82])
    dmin = fp16_from_bytes(b[:, 82:84])
    scales = b[:, :16]
    q = unpack_codes(b[:, 16:80]).reshape(-1, BLOCK // SUB, SUB).float()
    # Same operation order as the C reference, so every float matches it bit for bit.
    w = (d[:, None] * (scales & 15).float())[:, :, None] * q - (dmin[:, None] * (scales >> 4).float())[:, :, None]
    return w.to(dtype).reshape(*blocks.shape[:-1], blocks.shape[-1] // BLOCK_BYTES * BLOCK)


def unpack_codes(qs):
    """qs bytes [nb, 64] -> codes uint8 [nb, 256] in 0..3 (element 128*h + 32*s + l is bits
    2s..2s+1 of byte 32*h + l)."""
    nb = qs.shape[0]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device).reshape(1, 1, 4, 1)
    return ((qs.reshape(nb, 2, 1, 32) >> shifts) & 3).reshape(nb, BLOCK)


def pack_codes(q):
    """Inverse of unpack_codes: codes uint8 [nb, 256] in 0..3 -> [nb, 64]."""
    nb = q.shape[0]
    q = q.reshape(nb, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(nb, 64)


def _quantize_blocks(x):
    """x [B, 256] float32 -> Q2_K blocks [B, 84]."""
    B = x.shape[0]
    nsub = BLOCK // SUB
    xt = x.reshape(B * nsub, SUB).t().contiguous()  # [16, B*16], element-major
    scale, neg_min, codes = kquants.make_qkx2_quants(xt, xt.abs(), NMAX, -0.5, 0.1, 15, use_mad=True)
    scale, neg_min = scale.reshape(B, nsub), neg_min.reshape(B, nsub)
    codes = codes.t().reshape(B, nsub, SUB)

    max_scale = kquants.positive_max(scale)
    max_min = kquants.positive_max(neg_min)
    has_scale, has_min = max_scale > 0, max_min > 0
    inv_scale = kquants.rdiv(15, torch.where(has_scale, max_scale, torch.ones_like(max_scale)))
    inv_min = kquants.rdiv(15, torch.where(has_min, max_min, torch.ones_like(max_min)))
    # The reference ORs the rounded ints into a byte: both nibbles modulo 16.
    sc = torch.where(has_scale[:, None], kquants.nearest_int(inv_scale[:, None] * scale), 0)
    m = torch.where(has_min[:, None], kquants.nearest_int(inv_min[:, None] * neg_min), 0)
    packed = (sc | (m << 4)) & 255
    sc, m = packed & 15, packed >> 4
    # The fit may ask for a little more than fp16 holds near the range's ends: saturate (the
    # codes below are recomputed against the stored values).
    d = round_to_fp16(torch.where(has_scale, max_scale / 15, 0).clamp(max=FP16_MAX))
    dmin = round_to_fp16(torch.where(has_min, max_min / 15, 0).clamp(max=FP16_MAX))

    # Codes against the stored parameters; sub-blocks whose step is 0 keep the search's codes.
    step = d[:, None] * sc.float()
    offset = dmin[:, None] * m.float()
    requant = kquants.nearest_int((x.reshape(B, nsub, SUB) + offset[:, :, None]) / step[:, :, None]).clamp_(0, NMAX)
    codes = torch.where((step == 0)[:, :, None], codes, requant.to(torch.uint8))
    codes = pack_codes(codes.reshape(B, BLOCK))
    return torch.cat((packed.to(torch.uint8), codes, fp16_bytes(d), fp16_bytes(dmin)), dim=1)


FORMAT = Format(name="q2_k", ggml_type=GGML_TYPE, block=BLOCK, block_bytes=BLOCK_BYTES, quantize=quantize,
                dequantize=dequantize)
