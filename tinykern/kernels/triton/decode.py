"""GGML block decoding inside Triton kernels, one @triton.jit function per format.

Every decoder has the same signature, so that a kernel can take one as a tl.constexpr:

    decode(w_row, b, j, block_mask, mask) -> float32

w_row: byte pointers to the start of the rows, b: block index, j: offset of the weight inside
its block (0 .. block-1); all broadcast together, and the result has their shape. The block's
header (its fp16 fields) is read where block_mask holds, with the shape of w_row + b: a
caller whose K step stays inside one block passes a scalar b and gets one header load per row
instead of one per weight. Codes are read where mask holds; where it does not, the weight is
unspecified (finite when the header is).

Layouts and arithmetic follow gguf-py (gguf/quants.py) term for term. The results are
bit-identical to it in fp32 on any backend, fused multiply-add or not: every product here is
exact in fp32 (an fp16 significand, 11 bits, times small integers: at most 23 bits), so the
final add or subtract is the only rounding.

Weights are gathered byte by byte: blocks are only 2-byte aligned (18, 22, 34, 110 ... bytes),
and the caller's tensor may start anywhere, so no wider load is safe in general. fp16 fields
are rebuilt from their two bytes for the same reason.
"""

from typing import NamedTuple

import triton
import triton.language as tl

from tinykern.formats import FORMATS


@triton.jit
def _byte(p, mask):
    """The byte at p as int32 (0..255)."""
    return tl.load(p, mask=mask, other=0).to(tl.int32)


@triton.jit
def _sbyte(p, mask):
    """The byte at p as a signed int8 value, in int32."""
    return tl.load(p, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.int32)


@triton.jit
def _half(p, mask):
    """The little-endian fp16 at p (any alignment) as float32."""
    lo = tl.load(p, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(p + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nibble32(qs, j, mask):
    """4-bit code j of a 32-weight block whose 16 code bytes start at qs: low nibbles hold
    weights 0-15, high nibbles 16-31."""
    return (_byte(qs + j % 16, mask) >> ((j // 16) * 4)) & 15


@triton.jit
def _bit32(qh, j, mask):
    """Bit j of the little-endian 32-bit word at qh (read bytewise: it is 2-byte aligned)."""
    return (_byte(qh + j // 8, mask) >> (j % 8)) & 1


@triton.jit
def decode_q4_0(w_row, b, j, block_mask, mask):
    # 18 bytes: fp16 d, 16 bytes of 4-bit codes; w = d * (q - 8).
    blk = w_row + b * 18
    d = _half(blk, block_mask)
    q = _nibble32(blk + 2, j, mask) - 8
    return d * q.to(tl.float32)


@triton.jit
def decode_q4_1(w_row, b, j, block_mask, mask):
    # 20 bytes: fp16 d, fp16 m, 16 bytes of codes; w = d * q + m.
    blk = w_row + b * 20
    d = _half(blk, block_mask)
    m = _half(blk + 2, block_mask)
    q = _nibble32(blk + 4, j, mask)
    return d * q.to(tl.float32) + m


@triton.jit
def decode_q5_0(w_row, b, j, block_mask, mask):
    # 22 bytes: fp16 d, 32 high bits, 16 bytes of low nibbles; w = d * (q - 16).
    blk = w_row + b * 22
    d = _half(blk, block_mask)
    q = (_nibble32(blk + 6, j, mask) | (_bit32(blk + 2, j, mask) << 4)) - 16
    return d * q.to(tl.float32)


@triton.jit
def decode_q5_1(w_row, b, j, block_mask, mask):
    # 24 bytes: fp16 d, fp16 m, 32 high bits, 16 bytes of low nibbles; w = d * q + m.
    blk = w_row + b * 24
    d = _half(blk, block_mask)
    m = _half(blk + 2, block_mask)
    q = _nibble32(blk + 8, j, mask) | (_bit32(blk + 4, j, mask) << 4)
    return d * q.to(tl.float32) + m


@triton.jit
def decode_q8_0(w_row, b, j, block_mask, mask):
    # 34 bytes: fp16 d, 32 int8 codes; w = q * d.
    blk = w_row + b * 34
    d = _half(blk, block_mask)
    return _sbyte(blk + 2 + j, mask).to(tl.float32) * d


@triton.jit
def decode_q2_k(w_row, b, j, block_mask, mask):
    # 84 bytes: 16 scale bytes (low nibble scale, high nibble min, per 16 weights), 64 bytes
    # of 2-bit codes, fp16 d, fp16 dmin. Code byte 32c+l holds weights 128c+32s+l at bits 2s.
    blk = w_row + b * 84
    sc = _byte(blk + j // 16, mask)
    q = (_byte(blk + 16 + (j // 128) * 32 + j % 32, mask) >> (((j // 32) % 4) * 2)) & 3
    dl = _half(blk + 80, block_mask) * (sc & 15).to(tl.float32)
    ml = _half(blk + 82, block_mask) * (sc >> 4).to(tl.float32)
    return dl * q.to(tl.float32) - ml


@triton.jit
def decode_q3_k(w_row, b, j, block_mask, mask):
    # 110 bytes: 32 bytes of high bits (hmask), 64 bytes of 2-bit codes, 12 bytes of 6-bit
    # scales (16 sub-blocks of 16), fp16 d. w = (d * (scale - 32)) * (q - 4 * !hbit).
    blk = w_row + b * 110
    i = j // 16
    low = (_byte(blk + 96 + i % 8, mask) >> ((i // 8) * 4)) & 15
    high = (_byte(blk + 104 + i % 4, mask) >> ((i // 4) * 2)) & 3
    scale = (low | (high << 4)) - 32
    ql = (_byte(blk + 32 + (j // 128) * 32 + j % 32, mask) >> (((j // 32) % 4) * 2)) & 3
    hbit = (_byte(blk + j % 32, mask) >> (j // 32)) & 1
    q = ql - ((hbit ^ 1) << 2)
    dl = _half(blk + 108, block_mask) * scale.to(tl.float32)
    return dl * q.to(tl.float32)


@triton.jit
def _k_scale_min(scales, sb, mask):
    """6-bit (scale, min) of sub-block sb (0..7) from the 12 packed bytes at `scales` (Q4_K,
    Q5_K): bytes 0-3 scales 0-3, 4-7 mins 0-3, 8-11 the low nibbles of scales/mins 4-7, whose
    top two bits are the top bits of bytes 0-7."""
    t = sb % 4
    a = _byte(scales + t, mask)
    m = _byte(scales + 4 + t, mask)
    e = _byte(scales + 8 + t, mask)
    low = sb < 4
    sc = tl.where(low, a & 63, (e & 15) | ((a >> 6) << 4))
    mn = tl.where(low, m & 63, (e >> 4) | ((m >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def decode_q4_k(w_row, b, j, block_mask, mask):
    # 144 bytes: fp16 d, fp16 dmin, 12 scale bytes, 128 code bytes; byte 32c+l holds weights
    # 64c+l (low nibble) and 64c+32+l (high). w = (d * sc) * q - dmin * m.
    blk = w_row + b * 144
    sc, mn = _k_scale_min(blk + 4, j // 32, mask)
    q = (_byte(blk + 16 + (j // 64) * 32 + j % 32, mask) >> (((j // 32) % 2) * 4)) & 15
    return (_half(blk, block_mask) * sc) * q.to(tl.float32) - _half(blk + 2, block_mask) * mn


@triton.jit
def decode_q5_k(w_row, b, j, block_mask, mask):
    # 176 bytes: Q4_K's header, 32 bytes of high bits (byte l, bit s: weight 32s+l), then
    # Q4_K's 128 code bytes.
    blk = w_row + b * 176
    sc, mn = _k_scale_min(blk + 4, j // 32, mask)
    ql = (_byte(blk + 48 + (j // 64) * 32 + j % 32, mask) >> (((j // 32) % 2) * 4)) & 15
    qh = (_byte(blk + 16 + j % 32, mask) >> (j // 32)) & 1
    q = ql | (qh << 4)
    return (_half(blk, block_mask) * sc) * q.to(tl.float32) - _half(blk + 2, block_mask) * mn


@triton.jit
def decode_q6_k(w_row, b, j, block_mask, mask):
    # 210 bytes: 128 bytes of low nibbles (byte 64c+l: weights 128c+l, 128c+64+l), 64 bytes of
    # 2-bit high parts (byte 32c+l: weights 128c+32s+l at bits 2s), 16 int8 scales, fp16 d.
    # w = (d * scale) * (q - 32).
    blk = w_row + b * 210
    c = j // 128
    ql = (_byte(blk + c * 64 + j % 64, mask) >> (((j // 64) % 2) * 4)) & 15
    qh = (_byte(blk + 128 + c * 32 + j % 32, mask) >> (((j // 32) % 4) * 2)) & 3
    q = (ql | (qh << 4)) - 32
    dl = _half(blk + 208, block_mask) * _sbyte(blk + 192 + j // 16, mask).to(tl.float32)
    return dl * q.to(tl.float32)


class Decoder(NamedTuple):
    fn: object  # the @triton.jit decode function
    block: int  # weights per block
    block_bytes: int
    ggml_type: int


# Each format's decoder, keyed by the names of tinykern.formats.FORMATS (whose records give the
# geometry).
_DECODE = {"q4_0": decode_q4_0, "q4_1": decode_q4_1, "q5_0": decode_q5_0, "q5_1": decode_q5_1, "q8_0": decode_q8_0,
           "q2_k": decode_q2_k, "q3_k": decode_q3_k, "q4_k": decode_q4_k, "q5_k": decode_q5_k, "q6_k": decode_q6_k}
DECODERS = {name: Decoder(fn, FORMATS[name].block, FORMATS[name].block_bytes, FORMATS[name].ggml_type)
            for name, fn in _DECODE.items()}
