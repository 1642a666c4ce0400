"""Q4_K decoding inside Triton kernels, shared by q4k_matmul and q4k_conv2d.

A Q4_K block is 144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of
codes (see docs/formats.md). Kernels take the caller's GGUF bytes as they are: codes
are read as bytes, and the 16-byte header as four little-endian int32 words (blocks are
16-byte aligned in a row), which the compiler can prefetch like any wide load.
"""

import triton
import triton.language as tl

# Q4_K geometry for the kernels (Triton reads only constexpr globals).
BLOCK = tl.constexpr(256)
BLOCK_BYTES = tl.constexpr(144)


@triton.jit
def block_scales(blk, mask):
    """Header of the blocks at byte pointers `blk`: (d, dmin) as float32 and the scale words
    s1 = bytes 4-7, s2 = bytes 8-11, s3 = bytes 12-15 (int32)."""
    words = blk.to(tl.pointer_type(tl.int32))
    w0 = tl.load(words, mask=mask, other=0)
    d = (w0 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = ((w0 >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    s1 = tl.load(words + 1, mask=mask, other=0)
    s2 = tl.load(words + 2, mask=mask, other=0)
    s3 = tl.load(words + 3, mask=mask, other=0)
    return d, dmin, s1, s2, s3


@triton.jit
def scale_min(s1, s2, s3, j):
    """6-bit (scale, min) of sub-block j (0..7, scalar or tensor) as float32.

    scales[0..3] (s1) hold sc0..sc3, scales[4..7] (s2) m0..m3, scales[8..11] (s3) the low
    nibbles of sc4..sc7 / m4..m7; the top two bits of scales[0..7] complete sc4..sc7 / m4..m7.
    """
    shift = (j % 4) * 8
    a = (s1 >> shift) & 255
    b = (s2 >> shift) & 255
    e = (s3 >> shift) & 255
    low = j < 4
    sc = tl.where(low, a & 63, (e & 15) | ((a >> 6) << 4))
    mn = tl.where(low, b & 63, (e >> 4) | ((b >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def chunk_scales(w_row, i, mask):
    """Per row at byte pointers w_row: (scale, offset) of the two sub-blocks of chunk i
    (weights 64i .. 64i+63), i.e. d*sc and dmin*m of sub-blocks 2c and 2c+1, c = i % 4."""
    d, dmin, s1, s2, s3 = block_scales(w_row + (i // 4) * BLOCK_BYTES, mask)
    c = i % 4
    sc0, m0 = scale_min(s1, s2, s3, 2 * c)
    sc1, m1 = scale_min(s1, s2, s3, 2 * c + 1)
    return d * sc0, dmin * m0, d * sc1, dmin * m1


@triton.jit
def dequant_chunk(w_row, i, n_mask, scale0, offset0, scale1, offset1, dtype: tl.constexpr):
    """Chunk i of the Q4_K rows at byte pointers w_row ([BLOCK_N]) as a [64, BLOCK_N] tile in
    `dtype`, transposed for tl.dot, given its chunk_scales. Same fp32 order as the reference:
    (d*sc)*q - dmin*m.

    A chunk is the natural K step: its 32 code bytes hold weights 64i+l (low nibble, sub-block
    2c) and 64i+32+l (high nibble, sub-block 2c+1). Rows r and r+32 load the same byte (a cache
    hit) so that the tile comes out in K order for one tl.dot, with no register shuffle.
    """
    r = tl.arange(0, 64)
    high = (r >= 32)[:, None]
    codes = w_row[None, :] + (i // 4) * BLOCK_BYTES + 16 + (i % 4) * 32 + (r % 32)[:, None]
    q = tl.load(codes, mask=n_mask[None, :], other=0)
    q = tl.where(high, q >> 4, q & 15).to(tl.float32)
    scale = tl.where(high, scale1[None, :], scale0[None, :])
    offset = tl.where(high, offset1[None, :], offset0[None, :])
    return (q * scale - offset).to(dtype)
