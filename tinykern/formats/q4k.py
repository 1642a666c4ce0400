"""GGML's Q4_K: 256 weights in 144 bytes, byte-compatible with GGUF.

Layout (see docs/formats.md): fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins
for eight 32-weight sub-blocks, 128 bytes of 4-bit codes. A row of K weights (K a multiple of
256) is K/256 consecutive blocks.
"""

import torch

from tinykern.formats.common import FP16_MAX, fp16_bytes, fp16_from_bytes, quantize_blocks, round_to_fp16
from tinykern.formats.record import Format

BLOCK = 256
BLOCK_BYTES = 144
GGML_TYPE = 12
SUB = 32  # weights per sub-block
NMAX = 15
# The range a block can hold: down to -dmin*63 (the largest min), up to d*63*15 with min 0.
LOWEST = -63 * FP16_MAX
HIGHEST = 63 * NMAX * FP16_MAX
# The reference quantizer's candidate grids: iscale = (nmax + rmin + rdelta*i) / (max - min).
_GRID_STEPS = 21
# Super-blocks quantized at a time: keeps the [S, 32] temporaries near 1 MB, in cache.
_CHUNK = 1024


def quantize(w, name="weight"):
    """Quantize w [..., K] (K a multiple of 256) to Q4_K blocks, uint8 [..., K/256*144].

    Runs the reference quantizer's search (weighted 2x2 least squares over 21 grids per
    sub-block, 6-bit scales and mins, codes recomputed against the stored scales): on CPU
    tensors the compiled port of GGML's quantize_row_q4_K_ref (the same bytes, multi-threaded),
    elsewhere (or with the torch backend forced, or without tinykern._C) a torch version
    vectorized on w's device, within 1% of the reference's error. Raises ValueError naming `name` if w holds NaN, Inf or values outside
    [LOWEST, HIGHEST].
    """
    return quantize_blocks(w, name, "Q4_K", LOWEST, HIGHEST, GGML_TYPE, BLOCK, BLOCK_BYTES, _quantize_blocks, _CHUNK)


def dequantize(blocks, dtype=torch.float32):
    """Q4_K blocks uint8 [..., nb*144] -> [..., nb*256], bit-identical to gguf's dequantize."""
    b = blocks.reshape(-1, BLOCK_BYTES)
    d = fp16_from_bytes(b[:, 0:2])
    dmin = fp16_from_bytes(b[:, 2:4])
    sc, m = unpack_scales(b[:, 4:16])
    q = torch.stack((b[:, 16:] & 15, b[:, 16:] >> 4), dim=1)  # [nb, lo/hi, 128]
    q = q.reshape(-1, 2, 4, 32).transpose(1, 2).reshape(-1, 8, SUB).float()
    # Same operation order as the C reference, so every float matches it bit for bit.
    w = (d[:, None] * sc.float())[:, :, None] * q - (dmin[:, None] * m.float())[:, :, None]
    return w.to(dtype).reshape(*blocks.shape[:-1], blocks.shape[-1] // BLOCK_BYTES * BLOCK)


def unpack_scales(s):
    """The 12 scale bytes [nb, 12] -> (sc, m), each uint8 [nb, 8] of 6-bit values."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((lo & 63, (hi & 15) | ((lo >> 6) << 4)), dim=1)
    m = torch.cat((mid & 63, (hi >> 4) | ((mid >> 6) << 4)), dim=1)
    return sc, m


def pack_scales(sc, m):
    """Inverse of unpack_scales: (sc, m) uint8 [nb, 8] of 6-bit values -> [nb, 12]."""
    lo = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    mid = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return torch.cat((lo, mid, hi), dim=1)


def _quantize_blocks(x):
    """x [B, 256] float32 -> Q4_K blocks [B, 144]."""
    B = x.shape[0]
    xs = x.reshape(B, 8, SUB)
    scale, neg_min, best_l = _search(xs)  # [B, 8] each, best_l [B, 8, 32]

    max_scale = scale.amax(dim=1).clamp(min=0)
    max_min = neg_min.amax(dim=1).clamp(min=0)
    sc = _six_bits(scale, max_scale)
    m = _six_bits(neg_min, max_min)
    # The fit may ask for a little more than fp16 holds near the range's ends: saturate (the
    # codes below are recomputed against the stored values).
    d = round_to_fp16((max_scale / 63).clamp(max=FP16_MAX))
    dmin = round_to_fp16((max_min / 63).clamp(max=FP16_MAX))

    # Codes against the stored, rounded parameters; sub-blocks whose stored scale is 0 keep
    # the search's codes (they contribute nothing either way), as the reference does.
    step = d[:, None] * sc.float()
    offset = dmin[:, None] * m.float()
    q = torch.round((xs + offset[:, :, None]) / step[:, :, None]).clamp_(0, NMAX)
    q = torch.where((step == 0)[:, :, None], best_l, q).to(torch.uint8)

    d, dmin, sc, m, q = _exact_constants(x, d, dmin, sc, m, q)
    qs = q.reshape(B, 4, 2, SUB)
    qs = qs[:, :, 0] | (qs[:, :, 1] << 4)
    return torch.cat((fp16_bytes(d), fp16_bytes(dmin), pack_scales(sc, m), qs.reshape(B, 128)), dim=1)


def _search(xs):
    """Best (scale, -min, codes) per 32-weight sub-block of xs [..., 32] (make_qkx2_quants).

    Vectorized over sub-blocks; the 21 grid steps run in order because, as in the reference,
    each grid is laid from the best min found so far.
    """
    weights = xs.square().mean(dim=-1, keepdim=True).sqrt() + xs.abs()
    lo = xs.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = xs.amax(dim=-1, keepdim=True)
    flat = hi == lo
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    sum_w = weights.sum(-1, keepdim=True)
    wx = weights * xs
    sum_x = wx.sum(-1, keepdim=True)
    sum_x2 = (wx * xs).sum(-1, keepdim=True)

    # Candidate 0: iscale = 15/span, unfitted (scale, min) = (1/iscale, lo).
    iscale = NMAX / span
    scale, low = 1 / iscale, lo
    # The winning grid (its origin and iscale): its codes are rebuilt once at the end.
    grid_low, grid_iscale = lo, iscale
    l = _codes(xs, low, iscale)
    best_err = (weights * (scale * l + low - xs).square()).sum(-1, keepdim=True)
    for step in range(_GRID_STEPS):
        factor = (torch.tensor(-1.0) + torch.tensor(0.1) * step) + NMAX  # float32, as in C
        iscale = factor.item() / span
        l = _codes(xs, low, iscale)
        sum_l = (weights * l).sum(-1, keepdim=True)
        sum_l2 = (weights * l * l).sum(-1, keepdim=True)
        sum_xl = (wx * l).sum(-1, keepdim=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        fit_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        fit_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        # A positive min is not representable (mins are subtracted): refit the scale alone.
        positive = fit_min > 0
        fit_scale = torch.where(positive, sum_xl / torch.where(positive, sum_l2, torch.ones_like(sum_l2)), fit_scale)
        fit_min = torch.where(positive, torch.zeros_like(fit_min), fit_min)
        # sum w*(s*l + m - x)^2 expanded over the sums: no pass over the 32 weights.
        s, m = fit_scale, fit_min
        err = s * (s * sum_l2 + 2 * (m * sum_l - sum_xl)) + m * (m * sum_w - 2 * sum_x) + sum_x2
        better = ok & (err < best_err)
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, fit_scale, scale)
        grid_low = torch.where(better, low, grid_low)
        grid_iscale = torch.where(better, iscale, grid_iscale)
        low = torch.where(better, fit_min, low)

    # A flat sub-block (max == min <= 0) has scale 0 and codes 0; its value lives in the min.
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    low = torch.where(flat, lo, low)
    best_l = torch.where(flat, 0.0, _codes(xs, grid_low, grid_iscale))
    return scale[..., 0], -low[..., 0], best_l


def _codes(xs, low, iscale):
    return torch.addcmul(-iscale * low, xs, iscale).round_().clamp_(0, NMAX)


def _six_bits(values, maximum):
    """Quantize [B, 8] non-negative values to 0..63 against their per-block maximum."""
    inv = torch.where(maximum > 0, 63 / maximum.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(maximum))
    return torch.round(inv[:, None] * values).clamp_(0, 63).to(torch.uint8)


def _exact_constants(x, d, dmin, sc, m, q):
    """Store blocks of one fp16-representable value c exactly: c = d*1*1 or -(dmin*1)."""
    c = x[:, 0]
    const = (x == c[:, None]).all(dim=1) & (round_to_fp16(c) == c) & (c != 0)
    if not bool(const.any()):
        return d, dmin, sc, m, q
    pos = const & (c > 0)
    neg = const & (c < 0)
    ones = torch.ones_like(sc)
    zeros = torch.zeros_like(sc)
    d = torch.where(pos, c, torch.where(neg, torch.zeros_like(d), d))
    dmin = torch.where(neg, -c, torch.where(pos, torch.zeros_like(dmin), dmin))
    sc = torch.where(pos[:, None], ones, torch.where(neg[:, None], zeros, sc))
    m = torch.where(neg[:, None], ones, torch.where(pos[:, None], zeros, m))
    q = torch.where(pos[:, None, None], torch.ones_like(q), torch.where(neg[:, None, None], torch.zeros_like(q), q))
    return d, dmin, sc, m, q


FORMAT = Format(name="q4_k", ggml_type=GGML_TYPE, block=BLOCK, block_bytes=BLOCK_BYTES, quantize=quantize,
                dequantize=dequantize, op_prefix="q4k", linear="Q4Linear", conv="Q4Conv2d")
