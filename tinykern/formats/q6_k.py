"""GGML's Q6_K: 256 weights in 210 bytes, byte-compatible with GGUF.

Layout: 128 bytes of low code nibbles (ql), 64 bytes of high code bit pairs (qh), 16 int8
scales for sixteen 16-weight sub-blocks, fp16 d. A weight is d * scale * (code - 32), code 0..63.
"""

import torch

from tinykern.formats import kquants
from tinykern.formats.common import FP16_MAX, fp16_bytes, fp16_from_bytes, quantize_blocks, round_to_fp16
from tinykern.formats.record import Format

GGML_TYPE = 14
BLOCK = 256
BLOCK_BYTES = 210
SUB = 16
# |d| <= FP16_MAX, |scale| <= 128, |code - 32| <= 32.
MAX_ABS = 128 * 32 * FP16_MAX
# Super-blocks quantized at a time: bounds the temporaries, and amortizes the per-element loops.
_CHUNK = 4096


def quantize(w, name="weight"):
    """Quantize w [..., K] (K a multiple of 256) to Q6_K blocks, uint8 [..., K/256*210].

    A torch port of GGML's quantize_row_q6_K_ref, vectorized over blocks on w's device
    (byte-identical to it). On the CPU the compiled port of tinykern._C runs instead (the same
    bytes; `with tinykern.backend("torch")` forces this one). Raises ValueError naming `name` if w
    holds NaN, Inf or a magnitude above MAX_ABS.
    """
    return quantize_blocks(w, name, "Q6_K", -MAX_ABS, MAX_ABS, GGML_TYPE, BLOCK, BLOCK_BYTES, _quantize_blocks, _CHUNK)


def dequantize(blocks, dtype=torch.float32):
    """Q6_K blocks uint8 [..., nb*210] -> [..., nb*256], bit-identical to gguf's dequantize."""
    b = blocks.reshape(-1, BLOCK_BYTES)
    d = fp16_from_bytes(b[:, 208:210])
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    q = unpack_codes(b[:, :192]).float() - 32
    # (d * scale) * q, the C reference's order.
    w = (d[:, None] * scales)[:, :, None] * q.reshape(-1, BLOCK // SUB, SUB)
    return w.to(dtype).reshape(*blocks.shape[:-1], blocks.shape[-1] // BLOCK_BYTES * BLOCK)


def unpack_codes(qs):
    """ql and qh bytes [nb, 192] -> codes uint8 [nb, 256] in 0..63."""
    nb = qs.shape[0]
    ql = qs[:, :128].reshape(nb, 2, 1, 64)
    low = torch.cat((ql & 15, ql >> 4), dim=2).reshape(nb, 2, 4, 32)  # element 32*s + l of each half
    qh = qs[:, 128:].reshape(nb, 2, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device).reshape(1, 1, 4, 1)
    high = (qh >> shifts) & 3
    return (low | (high << 4)).reshape(nb, BLOCK)


def pack_codes(q):
    """Inverse of unpack_codes: codes uint8 [nb, 256] in 0..63 -> [nb, 192]."""
    nb = q.shape[0]
    q = q.reshape(nb, 2, 4, 32)
    low = q & 15
    ql = torch.cat((low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)), dim=2)
    high = q >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return torch.cat((ql.reshape(nb, 128), qh.reshape(nb, 64)), dim=1)


def _quantize_blocks(x):
    """x [B, 256] float32 -> Q6_K blocks [B, 210]."""
    B = x.shape[0]
    nsub = BLOCK // SUB
    xt = x.reshape(B * nsub, SUB).t().contiguous()  # [16, B*16], element-major
    scale, codes = kquants.make_qx_quants(xt, 32)
    scales = scale.reshape(B, nsub)
    codes = codes.t().reshape(B, nsub, SUB)

    peak = kquants.first_absmax(scales.t())
    empty = peak.abs() < kquants.GROUP_MAX_EPS
    iscale = kquants.rdiv(-128, torch.where(empty, torch.ones_like(peak), peak))
    # The fit can ask for a little more than fp16 holds at the range's end: saturate (the
    # codes below are recomputed against the stored values).
    d = round_to_fp16((1 / iscale).clamp(-FP16_MAX, FP16_MAX))
    sc = kquants.nearest_int(iscale[:, None] * scales).clamp_(max=127)

    # Codes against the stored scales; sub-blocks whose step is 0 keep the search's codes.
    step = d[:, None] * sc
    requant = kquants.nearest_int(x.reshape(B, nsub, SUB) / step[:, :, None]).clamp_(-32, 31) + 32
    codes = torch.where((step == 0)[:, :, None], codes, requant.to(torch.uint8))

    # A block whose sub-blocks all quantize to 0 is stored as zero bytes.
    d = torch.where(empty, torch.zeros_like(d), d)
    sc = torch.where(empty[:, None], torch.zeros_like(sc), sc)
    codes = torch.where(empty[:, None, None], torch.zeros_like(codes), codes)
    return torch.cat((pack_codes(codes.reshape(B, BLOCK)), sc.to(torch.int8).view(torch.uint8), fp16_bytes(d)), dim=1)


FORMAT = Format(name="q6_k", ggml_type=GGML_TYPE, block=BLOCK, block_bytes=BLOCK_BYTES, quantize=quantize,
                dequantize=dequantize)
