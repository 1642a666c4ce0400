"""GGML's Q5_K: 256 weights in 176 bytes, byte-compatible with GGUF.

Layout: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins for eight 32-weight sub-blocks
(packed as Q4_K packs them), 32 bytes of fifth code bits (qh), 128 bytes of low code nibbles.
A weight is d * scale * code - dmin * min, code 0..31.
"""

import torch

from tinykern.formats import kquants
from tinykern.formats.common import FP16_MAX, fp16_bytes, fp16_from_bytes, quantize_blocks, round_to_fp16
from tinykern.formats.q4k import pack_scales, unpack_scales
from tinykern.formats.record import Format

GGML_TYPE = 13
BLOCK = 256
BLOCK_BYTES = 176
SUB = 32
NMAX = 31
# Down to -dmin*63 (the largest min), up to d*63*31 with min 0.
LOWEST = -63 * FP16_MAX
HIGHEST = 63 * NMAX * FP16_MAX
# Super-blocks quantized at a time: bounds the temporaries, and amortizes the per-element loops.
_CHUNK = 2048


def quantize(w, name="weight"):
    """Quantize w [..., K] (K a multiple of 256) to Q5_K blocks, uint8 [..., K/256*176].

    A torch port of GGML's quantize_row_q5_K_ref (make_qkx2_quants over 16 grids per sub-block,
    6-bit scales and mins, codes recomputed against the stored scales), vectorized over blocks on
    w's device, byte-identical to it. On the CPU the compiled port of tinykern._C runs instead (the
    same bytes; `with tinykern.backend("torch")` forces this one). Raises ValueError naming `name`
    if w holds NaN, Inf or values outside [LOWEST, HIGHEST].
    """
    return quantize_blocks(w, name, "Q5_K", LOWEST, HIGHEST, GGML_TYPE, BLOCK, BLOCK_BYTES, _quantize_blocks, _CHUNK)


def dequantize(blocks, dtype=torch.float32):
    """Q5_K blocks uint8 [..., nb*176] -> [..., nb*256], bit-identical to gguf's dequantize."""
    b = blocks.reshape(-1, BLOCK_BYTES)
    d = fp16_from_bytes(b[:, 0:2])
    dmin = fp16_from_bytes(b[:, 2:4])
    sc, m = unpack_scales(b[:, 4:16])
    q = unpack_codes(b[:, 16:]).reshape(-1, 8, SUB).float()
    # Same operation order as the C reference, so every float matches it bit for bit.
    w = (d[:, None] * sc.float())[:, :, None] * q - (dmin[:, None] * m.float())[:, :, None]
    return w.to(dtype).reshape(*blocks.shape[:-1], blocks.shape[-1] // BLOCK_BYTES * BLOCK)


def unpack_codes(qs):
    """qh and ql bytes [nb, 160] -> codes uint8 [nb, 256] in 0..31."""
    nb = qs.shape[0]
    qh = qs[:, :32].reshape(nb, 1, 32)
    ql = qs[:, 32:].reshape(nb, 4, 1, 32)
    low = torch.cat((ql & 15, ql >> 4), dim=2).reshape(nb, 8, 32)
    shifts = torch.arange(8, dtype=torch.uint8, device=qs.device).reshape(1, 8, 1)
    return (low | (((qh >> shifts) & 1) << 4)).reshape(nb, BLOCK)


def pack_codes(q):
    """Inverse of unpack_codes: codes uint8 [nb, 256] in 0..31 -> [nb, 160]."""
    nb = q.shape[0]
    q = q.reshape(nb, 8, 32)
    shifts = torch.arange(8, dtype=torch.uint8, device=q.device).reshape(1, 8, 1)
    qh = ((q >> 4) << shifts).sum(dim=1, dtype=torch.uint8)  # bit s of byte l: sub-block s
    low = (q & 15).reshape(nb, 4, 2, 32)
    ql = low[:, :, 0] | (low[:, :, 1] << 4)
    return torch.cat((qh, ql.reshape(nb, 128)), dim=1)


def _quantize_blocks(x):
    """x [B, 256] float32 -> Q5_K blocks [B, 176]."""
    B = x.shape[0]
    nsub = BLOCK // SUB
    xs = x.reshape(B * nsub, SUB)
    # Weights sqrt(mean(x^2)) + |x|, the mean square summed in the C loop's order.
    xt = xs.t().contiguous()
    mean_square = kquants.seq_sum(xt * xt) / SUB
    weights = kquants.sqrt(mean_square)[None, :] + xt.abs()
    scale, neg_min, codes = kquants.make_qkx2_quants(xt, weights, NMAX, -0.5, 0.1, 15, use_mad=False)
    scale, neg_min = scale.reshape(B, nsub), neg_min.reshape(B, nsub)
    codes = codes.t().reshape(B, nsub, SUB)
    d, dmin, sc, m = six_bit_scales(scale, neg_min)

    # Codes against the stored parameters; sub-blocks whose step is 0 keep the search's codes.
    step = d[:, None] * sc.float()
    offset = dmin[:, None] * m.float()
    requant = kquants.nearest_int((x.reshape(B, nsub, SUB) + offset[:, :, None]) / step[:, :, None]).clamp_(0, NMAX)
    codes = torch.where((step == 0)[:, :, None], codes, requant.to(torch.uint8))
    return torch.cat((fp16_bytes(d), fp16_bytes(dmin), pack_scales(sc, m), pack_codes(codes.reshape(B, BLOCK))), dim=1)


def six_bit_scales(scale, neg_min):
    """Per-block fp16 (d, dmin) and 6-bit (sc, m) uint8 [B, 8] for sub-block scales and -mins
    [B, 8], as the reference quantizes them (against the largest of each, in 63 steps)."""
    max_scale = kquants.positive_max(scale)
    max_min = kquants.positive_max(neg_min)
    inv_scale = torch.where(max_scale > 0, kquants.rdiv(63, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, kquants.rdiv(63, max_min), torch.zeros_like(max_min))
    # The reference stores the rounded int in a uint8 and then caps it at 63.
    sc = kquants.c_uint8(kquants.nearest_int(inv_scale[:, None] * scale)).clamp_(max=63).to(torch.uint8)
    m = kquants.c_uint8(kquants.nearest_int(inv_min[:, None] * neg_min)).clamp_(max=63).to(torch.uint8)
    # The fit may ask for a little more than fp16 holds near the range's ends: saturate (the
    # codes are recomputed against the stored values).
    d = round_to_fp16((max_scale / 63).clamp(max=FP16_MAX))
    dmin = round_to_fp16((max_min / 63).clamp(max=FP16_MAX))
    return d, dmin, sc, m


FORMAT = Format(name="q5_k", ggml_type=GGML_TYPE, block=BLOCK, block_bytes=BLOCK_BYTES, quantize=quantize,
                dequantize=dequantize)
