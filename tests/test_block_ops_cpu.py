"""The CPU kernels of the block_* ops (every GGML block format by its type id).

- block_dequantize: bit-identical with gguf-py's numpy dequantizer on random blocks (finite fp16
  fields, any other byte), fp16/bf16 the fp32 result rounded; on every SIMD path;
- block_matmul: against x.double() @ dequant(w).double().T on x views followed by NaN (a load
  past K would poison the output), with row padding of random weights (which must never count);
- block_quantize: byte-identical with libggml's quantize_row_*_ref where there is a native one;
- errors for unknown types.
"""


import numpy as np
import pytest
import torch
from conftest import ggml_reference_quantize, relative_error
from test_format_records import FP16_FIELDS

from tinykern import _ext
from tinykern.formats import BY_GGML_TYPE, FORMATS

gguf_quants = pytest.importorskip("gguf.quants")

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"tinykern._C is not built ({_ext.ERROR})")

# GGML type id: (name, weights per block, bytes per block, byte offsets of the block's fp16 fields)
TYPES = {f.ggml_type: (f.name, f.block, f.block_bytes, FP16_FIELDS[f.ggml_type]) for f in FORMATS.values()}
WITH_TYPE = pytest.mark.parametrize("ggml_type", list(TYPES), ids=[TYPES[t][0] for t in TYPES])
NATIVE_QUANTIZERS = tuple(TYPES)
SIMD = pytest.mark.parametrize("simd", ["best", "avx2", "scalar"])
INTS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the machine running the tests is small and shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def simd_path(request, monkeypatch):
    def cap(simd):
        if simd != "best":
            monkeypatch.setenv("TINYKERN_CPU_SIMD", simd)

    return cap


def random_blocks(gen, ggml_type, rows, nb, fp16_bits=None):
    """rows x nb random blocks: any byte, but finite fp16 fields. fp16_bits(shape) draws the
    fields' bits; by default any finite value (subnormal, negative, huge)."""
    _, _, size, fields = TYPES[ggml_type]
    blocks = torch.randint(0, 256, (rows, nb, size), dtype=torch.uint8, generator=gen)
    for off in fields:
        if fp16_bits is None:
            bits = torch.randint(0, 1 << 16, (rows, nb), generator=gen, dtype=torch.int32)
            bits = torch.where((bits >> 10 & 31) == 31, bits & ~0x4000, bits)  # exponent 31 is inf/NaN
            bits = bits.to(torch.int16)
        else:
            bits = fp16_bits((rows, nb))
        blocks[:, :, off : off + 2] = bits.view(torch.uint8).reshape(rows, nb, 2)
    return blocks.reshape(rows, nb * size)


def moderate_fp16(gen):
    """fp16 fields of either sign, magnitudes 2^-10..2^-2: weights of order one."""

    def draw(shape):
        mag = torch.exp2(torch.empty(shape).uniform_(-10, -2, generator=gen))
        sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
        return (mag * sign).half().view(torch.int16)

    return draw


def gguf_dequantize(blocks, ggml_type):
    return torch.from_numpy(np.ascontiguousarray(gguf_quants.dequantize(blocks.numpy(), ggml_type)))


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INTS[a.dtype]), b.view(INTS[b.dtype]))


# ----------------------------------------------------------------------------------- dequantize


@SIMD
@WITH_TYPE
def test_dequantize_is_bit_identical_with_gguf(ggml_type, simd, simd_path, gen):
    simd_path(simd)
    blocks = random_blocks(gen, ggml_type, 5, 7)
    expected = gguf_dequantize(blocks, ggml_type)
    out = torch.ops.tinykern.block_dequantize(blocks, ggml_type, torch.float32)
    assert same_bits(out, expected)
    for dtype in (torch.float16, torch.bfloat16):
        assert same_bits(torch.ops.tinykern.block_dequantize(blocks, ggml_type, dtype), expected.to(dtype))


@WITH_TYPE
def test_dequantize_keeps_leading_dims(ggml_type, gen):
    blocks = random_blocks(gen, ggml_type, 6, 2).reshape(2, 3, -1)
    out = torch.ops.tinykern.block_dequantize(blocks, ggml_type, torch.float32)
    assert out.shape == (2, 3, 2 * TYPES[ggml_type][1])
    assert same_bits(out.reshape(6, -1), gguf_dequantize(blocks.reshape(6, -1), ggml_type))


# --------------------------------------------------------------------------------------- matmul


def matmul_case(gen, ggml_type, m, n, dtype, with_bias):
    """(x as a view whose rows run on into NaN, w, bias, float64 reference). K leaves part of
    the last block as row padding."""
    block = TYPES[ggml_type][1]
    nb = 5 if block == 32 else 2
    k = nb * block - (block // 2 + 3)
    w = random_blocks(gen, ggml_type, n, nb, moderate_fp16(gen))
    dense = gguf_dequantize(w, ggml_type)[:, :k]
    x = torch.randn(m, k, generator=gen).to(dtype)
    buf = torch.full((m, k + 40), float("nan"), dtype=dtype)
    buf[:, :k] = x
    bias = torch.randn(n, generator=gen) if with_bias else None
    ref = x.double() @ dense.double().T
    if bias is not None:
        ref += bias.double()
    return buf[:, :k], w, bias, ref


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m", [1, 3, 17, 300])
@WITH_TYPE
def test_matmul_fp32_exact(ggml_type, m, with_bias, gen):
    x, w, bias, ref = matmul_case(gen, ggml_type, m, 37, torch.float32, with_bias)
    y = torch.ops.tinykern.block_matmul(x, w, bias, ggml_type, True)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert relative_error(y, ref) < 1e-5


@SIMD
@pytest.mark.parametrize("m", [1, 5])
@WITH_TYPE
def test_matmul_gemv_on_every_simd_path(ggml_type, m, simd, simd_path, gen):
    simd_path(simd)
    x, w, bias, ref = matmul_case(gen, ggml_type, m, 19, torch.float32, True)
    assert relative_error(torch.ops.tinykern.block_matmul(x, w, bias, ggml_type, True), ref) < 1e-5


# The output is rounded to x's dtype: a few units of its last place.
HALF_BOUND = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [3, 17])
@WITH_TYPE
def test_matmul_half_x(ggml_type, m, dtype, gen):
    x, w, bias, ref = matmul_case(gen, ggml_type, m, 37, dtype, True)
    y = torch.ops.tinykern.block_matmul(x, w, bias, ggml_type, True)
    assert y.dtype == dtype
    assert relative_error(y, ref) < HALF_BOUND[dtype] / 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@WITH_TYPE
def test_matmul_inexact_wide(ggml_type, with_bias, dtype, gen):
    """exact=False: the bf16 GEMM where the CPU multiplies bf16 in hardware, the fp32 tiles elsewhere."""
    x, w, bias, ref = matmul_case(gen, ggml_type, 300, 37, dtype, with_bias)
    y = torch.ops.tinykern.block_matmul(x, w, bias, ggml_type, False)
    assert y.dtype == dtype
    assert relative_error(y, ref) < 1e-2


@WITH_TYPE
def test_matmul_empty(ggml_type, gen):
    w = random_blocks(gen, ggml_type, 4, 1, moderate_fp16(gen))
    y = torch.ops.tinykern.block_matmul(torch.randn(0, 10, generator=gen), w, None, ggml_type, True)
    assert y.shape == (0, 4)


# ------------------------------------------------------------------------------------- quantize


def ggml_quantize(ggml_type, x):
    return ggml_reference_quantize(BY_GGML_TYPE[ggml_type], x)


def quantize_inputs(gen, block):
    """Rows of normal weights at several scales, and blocks with the reference's corner cases:
    all zeros, one constant, equal magnitudes of both signs, one outlier, tiny values."""
    rows = [torch.randn(8 * block, generator=gen) * s for s in (1e-3, 0.5, 30.0)]
    corner = torch.randn(8, block, generator=gen)
    corner[0] = 0
    corner[1] = 0.375
    corner[2, ::2], corner[2, 1::2] = 2.0, -2.0
    corner[3, 5] = 40.0
    corner[4] *= 1e-6
    corner[5] = corner[5].abs() + 1
    rows.append(corner.reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("ggml_type", NATIVE_QUANTIZERS, ids=[TYPES[t][0] for t in NATIVE_QUANTIZERS])
def test_quantize_is_byte_identical_with_ggml(ggml_type, gen):
    x = quantize_inputs(gen, TYPES[ggml_type][1])
    if ggml_type == 12:
        x = x[:3]  # Q4_K stores constant blocks and fp16 overflow by rules of its own
    out = torch.ops.tinykern.block_quantize(x, ggml_type)
    assert torch.equal(out, ggml_quantize(ggml_type, x))


@pytest.mark.parametrize("ggml_type", [2, 3, 6, 7], ids=["q4_0", "q4_1", "q5_0", "q5_1"])
def test_quantize_threads_and_shapes(ggml_type, gen):
    x = torch.randn(3, 5, 64 * 32, generator=gen)
    one = torch.ops.tinykern.block_quantize(x, ggml_type)
    torch.set_num_threads(2)
    assert torch.equal(torch.ops.tinykern.block_quantize(x, ggml_type), one)
    assert one.shape == (3, 5, 64 * TYPES[ggml_type][2])
    assert torch.equal(one.reshape(15, -1), ggml_quantize(ggml_type, x.reshape(15, -1)))


# --------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("ggml_type", [0, 1, 9, 15, 99, -1])
def test_unknown_type_is_named(ggml_type, gen):
    blocks = torch.zeros(4, 144, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=rf"block_dequantize: unknown GGML type {ggml_type};"):
        torch.ops.tinykern.block_dequantize(blocks, ggml_type, torch.float32)
    with pytest.raises(RuntimeError, match=rf"block_matmul: unknown GGML type {ggml_type};"):
        torch.ops.tinykern.block_matmul(torch.randn(2, 256), blocks, None, ggml_type, True)
    with pytest.raises(RuntimeError, match=rf"block_quantize: unknown GGML type {ggml_type};"):
        torch.ops.tinykern.block_quantize(torch.randn(2, 256), ggml_type)


@WITH_TYPE
def test_shape_errors_name_the_op(ggml_type, gen):
    _, block, size, _ = TYPES[ggml_type]
    with pytest.raises(RuntimeError, match="block_dequantize: blocks of shape"):
        torch.ops.tinykern.block_dequantize(torch.zeros(2, size + 1, dtype=torch.uint8), ggml_type, torch.float32)
    w = random_blocks(gen, ggml_type, 3, 2, moderate_fp16(gen))
    with pytest.raises(RuntimeError, match="block_matmul: x of shape"):
        torch.ops.tinykern.block_matmul(torch.randn(2, block), w, None, ggml_type, True)


# ---------------------------------------------------------------------------- threads and views


@pytest.mark.parametrize("ggml_type", [2, 7, 11, 14], ids=["q4_0", "q5_1", "q3_k", "q6_k"])
def test_threads_agree(ggml_type, gen):
    """The row dots and the tiles have the same shapes however many threads split them."""
    w = random_blocks(gen, ggml_type, 70, 3, moderate_fp16(gen))
    k = 3 * TYPES[ggml_type][1] - 5
    xs = [torch.randn(m, k, generator=gen) for m in (3, 40)]
    one = [torch.ops.tinykern.block_matmul(x, w, None, ggml_type, True) for x in xs]
    one.append(torch.ops.tinykern.block_dequantize(w, ggml_type, torch.bfloat16))
    torch.set_num_threads(2)
    two = [torch.ops.tinykern.block_matmul(x, w, None, ggml_type, True) for x in xs]
    two.append(torch.ops.tinykern.block_dequantize(w, ggml_type, torch.bfloat16))
    assert all(same_bits(a, b) for a, b in zip(one, two))


@WITH_TYPE
def test_unaligned_and_strided_blocks(ggml_type, gen):
    """Blocks at an odd byte offset, and weight rows with a gap between them."""
    w = random_blocks(gen, ggml_type, 6, 2, moderate_fp16(gen))
    buf = torch.zeros(6, w.shape[1] + 3, dtype=torch.uint8)
    buf[:, 1 : 1 + w.shape[1]] = w
    view = buf[:, 1 : 1 + w.shape[1]]
    assert same_bits(torch.ops.tinykern.block_dequantize(view, ggml_type, torch.float32), gguf_dequantize(w, ggml_type))
    x = torch.randn(2, w.shape[1] // TYPES[ggml_type][2] * TYPES[ggml_type][1], generator=gen)
    assert same_bits(torch.ops.tinykern.block_matmul(x, view, None, ggml_type, True),
                     torch.ops.tinykern.block_matmul(x, w, None, ggml_type, True))
