"""What GGML's four legacy 32-weight formats share, byte-compatible with GGUF: Q4_0 and Q5_0
(symmetric: value = (q - 2^(bits-1))*d), Q4_1 and Q5_1 (affine: value = q*d + m).

Block layout, little-endian: fp16 d, [fp16 m (affine)], [uint32 qh: bit j is the 5th bit of
weight j (5-bit)], 16 bytes of nibbles (byte j holds weight j low, weight j+16 high).
The quantizers port ggml's quantize_row_q{4,5}_{0,1}_ref exactly: the same float operations in
the same order, so they give its bytes on any device.
"""

import torch

from tinykern.formats.common import FP16_MAX, float32_in_range, fp16_bytes, fp16_from_bytes, native_quantize

BLOCK = 32
HALF = BLOCK // 2


def block_bytes(bits, affine):
    """Bytes of one block: the fp16 scale, the fp16 minimum if affine, the 5th bits, the nibbles."""
    return 2 + 2 * affine + 4 * (bits == 5) + HALF


def symmetric_max_abs(bits):
    """The largest magnitude a symmetric format holds: d = max/-2^(bits-1) must be a finite fp16."""
    return 2 ** (bits - 1) * FP16_MAX


def affine_range(bits):
    """(lowest, highest) weight of an affine format: below -FP16_MAX no fp16 minimum holds a
    block, above 2^bits*FP16_MAX no fp16 minimum and spread do. Blocks are checked further."""
    return -FP16_MAX, (1 << bits) * FP16_MAX


def quantize_symmetric(w, name, fmt, bits, ggml_type):
    """w [..., K] -> Q4_0 (bits=4) or Q5_0 (bits=5) blocks uint8 [..., K/32*bytes], the bytes of
    ggml's reference quantizer."""
    max_abs = symmetric_max_abs(bits)
    x = _blocks_of(w, name, fmt, -max_abs, max_abs)
    native = native_quantize("block_quantize", x, ggml_type)
    if native is not None:
        return native.reshape(*w.shape[:-1], -1)
    levels = 1 << bits
    # The signed value of largest magnitude, the first one on ties. An all-zero block keeps +0.0
    # (the reference's initial value), so that its d is -0.0 as there.
    first = x.abs().argmax(dim=1)  # argmax documents the first index on ties; max(dim) does not
    peak = x.gather(1, first[:, None])[:, 0]
    peak = torch.where(peak != 0, peak, torch.zeros_like(peak))
    d = peak / -(levels // 2)
    q = _codes(x * _inverse(d)[:, None] + (levels // 2 + 0.5), levels)
    return _pack(w, [fp16_bytes(d)], q, bits)


def quantize_affine(w, name, fmt, bits, ggml_type):
    """w [..., K] -> Q4_1 (bits=4) or Q5_1 (bits=5) blocks uint8 [..., K/32*bytes], the bytes of
    ggml's reference quantizer. Raises ValueError naming `name` for a block whose minimum or
    (max - min)/(2^bits - 1) overflows fp16."""
    x = _blocks_of(w, name, fmt, *affine_range(bits))
    nmax = (1 << bits) - 1
    low, high = torch.aminmax(x, dim=1)
    # The reference keeps the first element equal to the minimum: it decides the sign of a zero.
    first = (x == low[:, None]).to(torch.uint8).argmax(dim=1)
    low = x.gather(1, first[:, None])[:, 0]
    d = (high - low) / nmax
    _check_fp16(w, name, fmt, nmax, low, high, d)
    native = native_quantize("block_quantize", x, ggml_type)
    if native is not None:
        return native.reshape(*w.shape[:-1], -1)
    q = _codes((x - low[:, None]) * _inverse(d)[:, None] + 0.5, nmax + 1)
    return _pack(w, [fp16_bytes(d), fp16_bytes(low)], q, bits)


def dequantize_symmetric(blocks, dtype, bits):
    """Q4_0 / Q5_0 blocks uint8 [..., nb*bytes] -> [..., nb*32], bit-identical to gguf."""
    b = blocks.reshape(-1, block_bytes(bits, False))
    d = fp16_from_bytes(b[:, 0:2])
    q = _unpack(b[:, 2:], bits).to(torch.int32) - (1 << (bits - 1))
    # d times a small integer is exact in float32: no order to match.
    return _shaped(blocks, d[:, None] * q.float(), dtype, bits, False)


def dequantize_affine(blocks, dtype, bits):
    """Q4_1 / Q5_1 blocks uint8 [..., nb*bytes] -> [..., nb*32], bit-identical to gguf."""
    b = blocks.reshape(-1, block_bytes(bits, True))
    d = fp16_from_bytes(b[:, 0:2])
    m = fp16_from_bytes(b[:, 2:4])
    q = _unpack(b[:, 4:], bits).float()
    # As the reference: the exact product, then one rounding in the add.
    return _shaped(blocks, d[:, None] * q + m[:, None], dtype, bits, True)


def _blocks_of(w, name, fmt, low, high):
    if w.shape[-1] % BLOCK:
        raise ValueError(f"{name}: {fmt} needs rows that are a multiple of {BLOCK}, got shape {list(w.shape)}")
    return float32_in_range(w, name, fmt, low, high).reshape(-1, BLOCK)


def _inverse(d):
    # The reference's `d ? 1.0f/d : 0.0f`, as a true division (not an approximate reciprocal).
    nonzero = d != 0
    return torch.where(nonzero, 1 / torch.where(nonzero, d, torch.ones_like(d)), torch.zeros_like(d))


def _codes(v, levels):
    # The reference's MIN(levels - 1, (int8_t)v): truncation toward zero, v >= 0 here.
    return v.to(torch.int32).clamp(max=levels - 1).to(torch.uint8)


def _check_fp16(w, name, fmt, nmax, low, high, d):
    bad = ~(torch.isfinite(low.to(torch.float16)) & torch.isfinite(d.to(torch.float16)))
    if bool(bad.any()):
        worst = int((high - low).argmax())
        raise ValueError(
            f"{name}: {fmt} stores each block's minimum and (max - min)/{nmax} as fp16 (at most {FP16_MAX:.9g}), "
            f"but {int(bad.sum())} of {bad.numel()} blocks exceed that (the widest spans "
            f"[{low[worst].item():.9g}, {high[worst].item():.9g}])"
        )


def _pack(w, header, q, bits):
    # q uint8 [nb, 32] -> the block bytes: header fields, then qh (5-bit), then the nibbles.
    parts = list(header)
    if bits == 5:
        high = (q >> 4).reshape(-1, 4, 8)  # bit j of qh (little-endian uint32) is weight j's
        weights = 1 << torch.arange(8, device=q.device, dtype=torch.uint8)
        parts.append((high * weights).sum(dim=2, dtype=torch.int32).to(torch.uint8))
    lo = q & 15
    parts.append(lo[:, :HALF] | (lo[:, HALF:] << 4))
    out = torch.cat(parts, dim=1)
    return out.reshape(*w.shape[:-1], w.shape[-1] // BLOCK * out.shape[1])


def _unpack(b, bits):
    # [nb, (4 +) 16] bytes after the header -> codes uint8 [nb, 32].
    qs = b[:, -HALF:]
    q = torch.cat((qs & 15, qs >> 4), dim=1)
    if bits == 5:
        shifts = torch.arange(8, device=b.device, dtype=torch.uint8)
        high = (b[:, :4, None] >> shifts) & 1
        q = q | (high.reshape(-1, BLOCK) << 4)
    return q


def _shaped(blocks, w, dtype, bits, affine):
    nbytes = block_bytes(bits, affine)
    return w.to(dtype).reshape(*blocks.shape[:-1], blocks.shape[-1] // nbytes * BLOCK)
