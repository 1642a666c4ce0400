"""GGML's Q3_K: 256 weights in 110 bytes, byte-compatible with GGUF.

Layout: 32 bytes of third code bits (hmask), 64 bytes of low code bit pairs (qs), 12 bytes of
6-bit scales for sixteen 16-weight sub-blocks, fp16 d. A weight is d * (scale - 32) * (code - 4),
code 0..7.
"""

import torch

from tinykern.formats import kquants
from tinykern.formats.common import FP16_MAX, fp16_bytes, fp16_from_bytes, quantize_blocks, round_to_fp16
from tinykern.formats.record import Format

GGML_TYPE = 11
BLOCK = 256
BLOCK_BYTES = 110
SUB = 16
# |d| <= FP16_MAX and |(scale - 32) * (code - 4)| <= 32 * 4.
MAX_ABS = 32 * 4 * FP16_MAX
# Super-blocks quantized at a time: bounds the temporaries, and amortizes the per-element loops.
_CHUNK = 4096


def quantize(w, name="weight"):
    """Quantize w [..., K] (K a multiple of 256) to Q3_K blocks, uint8 [..., K/256*110].

    A torch port of GGML's quantize_row_q3_K_ref (make_q3_quants per sub-block: codes from the
    largest magnitude, refined one code at a time; 6-bit scales against the block's largest),
    vectorized over blocks on w's device, byte-identical to it. On the CPU the compiled port of
    tinykern._C runs instead (the same bytes; `with tinykern.backend("torch")` forces this one).
    Raises ValueError naming `name` if w holds NaN, Inf or a magnitude above MAX_ABS.
    """
    return quantize_blocks(w, name, "Q3_K", -MAX_ABS, MAX_ABS, GGML_TYPE, BLOCK, BLOCK_BYTES, _quantize_blocks, _CHUNK)


def dequantize(blocks, dtype=torch.float32):
    """Q3_K blocks uint8 [..., nb*110] -> [..., nb*256], bit-identical to gguf's dequantize."""
    b = blocks.reshape(-1, BLOCK_BYTES)
    d = fp16_from_bytes(b[:, 108:110])
    scales = unpack_scales(b[:, 96:108]).float() - 32
    q = unpack_codes(b[:, :96]).float() - 4
    w = (d[:, None] * scales)[:, :, None] * q.reshape(-1, BLOCK // SUB, SUB)
    return w.to(dtype).reshape(*blocks.shape[:-1], blocks.shape[-1] // BLOCK_BYTES * BLOCK)


def unpack_scales(s):
    """The 12 scale bytes [nb, 12] -> uint8 [nb, 16] of 6-bit values (low nibbles in bytes
    0..7, sub-blocks 0..7 then 8..15; the high bit pairs in bytes 8..11)."""
    nb = s.shape[0]
    low = torch.cat((s[:, :8] & 15, s[:, :8] >> 4), dim=1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=s.device).reshape(1, 4, 1)
    high = ((s[:, 8:12].reshape(nb, 1, 4) >> shifts) & 3).reshape(nb, 16)  # sub-block 4*g + k
    return low | (high << 4)


def pack_scales(sc):
    """Inverse of unpack_scales: uint8 [nb, 16] of 6-bit values -> [nb, 12]."""
    nb = sc.shape[0]
    low = (sc[:, :8] & 15) | ((sc[:, 8:] & 15) << 4)
    pairs = (sc >> 4).reshape(nb, 4, 4)  # [g, k]: sub-block 4*g + k
    high = pairs[:, 0] | (pairs[:, 1] << 2) | (pairs[:, 2] << 4) | (pairs[:, 3] << 6)
    return torch.cat((low, high), dim=1)


def unpack_codes(qs):
    """hmask and qs bytes [nb, 96] -> codes uint8 [nb, 256] in 0..7."""
    nb = qs.shape[0]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device).reshape(1, 1, 4, 1)
    low = ((qs[:, 32:].reshape(nb, 2, 1, 32) >> shifts) & 3).reshape(nb, BLOCK)
    bits = torch.arange(8, dtype=torch.uint8, device=qs.device).reshape(1, 8, 1)
    high = ((qs[:, :32].reshape(nb, 1, 32) >> bits) & 1).reshape(nb, BLOCK)  # element 32*b + l
    return low | (high << 2)


def pack_codes(q):
    """Inverse of unpack_codes: codes uint8 [nb, 256] in 0..7 -> [nb, 96]."""
    nb = q.shape[0]
    bits = torch.arange(8, dtype=torch.uint8, device=q.device).reshape(1, 8, 1)
    hmask = ((q.reshape(nb, 8, 32) >> 2) << bits).sum(dim=1, dtype=torch.uint8)
    low = (q & 3).reshape(nb, 2, 4, 32)
    qs = low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)
    return torch.cat((hmask, qs.reshape(nb, 64)), dim=1)


def _quantize_blocks(x):
    """x [B, 256] float32 -> Q3_K blocks [B, 110]."""
    B = x.shape[0]
    nsub = BLOCK // SUB
    xt = x.reshape(B * nsub, SUB).t().contiguous()  # [16, B*16], element-major
    scale, codes = kquants.make_q3_quants(xt, 4)
    scales = scale.reshape(B, nsub)
    codes = codes.t().reshape(B, nsub, SUB)

    # 6-bit scales against the scale of largest magnitude (first on ties), as signed -32..31.
    peak = kquants.first_absmax(scales.t())
    empty = peak == 0
    iscale = kquants.rdiv(-32, torch.where(empty, torch.ones_like(peak), peak))
    # Truncated to int8 before the clamp, as the reference does.
    sc = kquants.nearest_int(iscale[:, None] * scales).to(torch.int8).to(torch.int32).clamp_(-32, 31) + 32
    sc = torch.where(empty[:, None], torch.zeros_like(sc), sc)
    # The fit can ask for a little more than fp16 holds at the range's end: saturate (the
    # codes below are recomputed against the stored values).
    d = round_to_fp16((1 / iscale).clamp(-FP16_MAX, FP16_MAX))
    d = torch.where(empty, torch.zeros_like(d), d)

    # Codes against the stored scales; sub-blocks whose step is 0 keep the search's codes.
    step = d[:, None] * (sc - 32)
    requant = kquants.nearest_int(x.reshape(B, nsub, SUB) / step[:, :, None]).clamp_(-4, 3) + 4
    codes = torch.where((step == 0)[:, :, None], codes, requant.to(torch.uint8))
    sc = sc.to(torch.uint8)
    return torch.cat((pack_codes(codes.reshape(B, BLOCK)), pack_scales(sc), fp16_bytes(d)), dim=1)


FORMAT = Format(name="q3_k", ggml_type=GGML_TYPE, block=BLOCK, block_bytes=BLOCK_BYTES, quantize=quantize,
                dequantize=dequantize)
