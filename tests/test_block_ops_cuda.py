"""The CUDA block_dequantize and block_matmul ops (csrc/cuda/block_matmul.cu) for every GGML
block format, called by GGML type id: dequantization bit-identical to gguf-py, the matmul
against x @ dequant(w)[:, :K].T + bias in float64 (kernel error only, not quantization error).

Tolerances (relative Frobenius error), by x dtype and path:
- M <= 16 (GEMV): weights decoded exactly to fp32, x exact, fp32 accumulation; the only
  rounding that matters is the output's: fp32 1e-5, fp16 2e-3, bf16 1e-2.
- M > 16 (tensor cores): fp32 x runs as TF32 (x and weights cut to 10 mantissa bits), fp16 x
  with fp16 weights, bf16 x with bf16 weights, fp32 accumulation: fp32 and fp16 2e-3, bf16 1e-2.
"""

import numpy as np
import pytest
import torch

gguf_quants = pytest.importorskip("gguf.quants")
from conftest import relative_error  # noqa: E402

import tinykern._ext  # noqa: E402,F401  (registers the native ops)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not tinykern._ext.available(), reason="tinykern._C is not built"),
]

# GGML type id: (name, weights per block, bytes per block, byte offsets of the fp16 fields).
FORMATS = {
    2: ("q4_0", 32, 18, [0]),
    3: ("q4_1", 32, 20, [0, 2]),
    6: ("q5_0", 32, 22, [0]),
    7: ("q5_1", 32, 24, [0, 2]),
    8: ("q8_0", 32, 34, [0]),
    10: ("q2_k", 256, 84, [80, 82]),
    11: ("q3_k", 256, 110, [108]),
    12: ("q4_k", 256, 144, [0, 2]),
    13: ("q5_k", 256, 176, [0, 2]),
    14: ("q6_k", 256, 210, [208]),
}
TYPES = [pytest.param(t, id=name) for t, (name, *_) in FORMATS.items()]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GEMV_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TILED_TOL = {torch.float32: 2e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_blocks(rng, ggml_type, rows, nb, sane=True):
    """uint8 [rows, nb*block_bytes] of random bytes: every code and sub-block scale is valid. With
    `sane` the fp16 scales are small finite numbers; otherwise they too are random bits (inf, NaN)."""
    _, _, nbytes, fp16_offsets = FORMATS[ggml_type]
    raw = rng.integers(0, 256, size=(rows, nb, nbytes), dtype=np.uint8)
    if sane:
        for off in fp16_offsets:
            scales = (rng.standard_normal((rows, nb)) * 0.05).astype(np.float16)
            raw[:, :, off:off + 2] = scales.view(np.uint8).reshape(rows, nb, 2)
    return raw.reshape(rows, nb * nbytes)


def reference_dequantize(raw, ggml_type):
    return gguf_quants.dequantize(raw, gguf_quants.GGMLQuantizationType(ggml_type))


def poison_cuda_cache(nbytes):
    """Free a block of exactly nbytes filled with 0xFF (NaN in fp32, fp16 and bf16): the caching
    allocator hands it to the next allocation of that size, the op's output, so that an element
    the kernel never writes shows as NaN instead of a lucky zero."""
    torch.full((nbytes,), 255, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()


@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sane", [True, False], ids=["finite", "raw-bits"])
def test_dequantize_bit_identical(ggml_type, dtype, sane):
    rng = np.random.default_rng(ggml_type)
    raw = random_blocks(rng, ggml_type, 5, 7, sane)
    expected = torch.from_numpy(reference_dequantize(raw, ggml_type).astype(np.float32)).to(dtype)
    blocks = torch.from_numpy(raw).cuda()
    poison_cuda_cache(expected.numel() * expected.element_size())
    actual = torch.ops.tinykern.block_dequantize(blocks, ggml_type, dtype).cpu()
    assert actual.shape == expected.shape and actual.dtype == dtype
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan)
    # Bit for bit (NaN payloads aside: the GPU's canonical NaN is not x86's).
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(actual[~nan].view(bits), expected[~nan].view(bits))


@pytest.mark.parametrize("ggml_type", TYPES)
def test_dequantize_batched_and_offset(ggml_type):
    # Leading dims, and a view whose data is not 16-byte aligned.
    rng = np.random.default_rng(100 + ggml_type)
    _, block, nbytes, _ = FORMATS[ggml_type]
    raw = random_blocks(rng, ggml_type, 6, 3)
    expected = torch.from_numpy(reference_dequantize(raw, ggml_type).astype(np.float32)).reshape(2, 3, 3 * block)
    blocks = torch.from_numpy(raw).cuda().reshape(2, 3, 3 * nbytes)
    assert torch.equal(torch.ops.tinykern.block_dequantize(blocks, ggml_type, torch.float32).cpu(), expected)
    padded = torch.zeros(1 + raw.size, dtype=torch.uint8, device="cuda")
    padded[1:] = torch.from_numpy(raw.reshape(-1)).cuda()
    view = padded[1:].view(6, 3 * nbytes)
    assert torch.equal(torch.ops.tinykern.block_dequantize(view, ggml_type, torch.float32).cpu(),
                       expected.reshape(6, -1))


# (M, K offset from whole blocks, N, bias): M on both sides of 16 and past one 64-row tile; K
# short of whole blocks by 5 (not a multiple of 8: x read element-wise) or 8 (x read eight at
# a time); N not a multiple of 16 or 64.
MATMUL_CASES = [
    (1, 5, 7, True),
    (1, 8, 40, False),
    (3, 5, 33, True),
    (16, 8, 17, True),
    (17, 5, 65, True),
    (17, 8, 7, False),
    (300, 5, 70, True),
]


@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k_short,n,with_bias", MATMUL_CASES)
def test_matmul(ggml_type, dtype, m, k_short, n, with_bias):
    rng = np.random.default_rng(ggml_type * 1000 + m)
    _, block, _, _ = FORMATS[ggml_type]
    # Two blocks of 256 or ten of 32 (more than one 64-wide tile step), the last one partial.
    nb = 2 if block == 256 else 10
    k = nb * block - k_short
    raw = random_blocks(rng, ggml_type, n, nb)
    # Row padding past K holds random weights too: they must not count.
    dense = torch.from_numpy(reference_dequantize(raw, ggml_type).astype(np.float64))[:, :k]
    x = torch.from_numpy(rng.standard_normal((m, k))).to(dtype)
    bias = torch.from_numpy(rng.standard_normal(n)).to(dtype) if with_bias else None
    expected = x.double() @ dense.T + (bias.double() if with_bias else 0)
    args = (x.cuda(), torch.from_numpy(raw).cuda(), bias.cuda() if with_bias else None, ggml_type)
    poison_cuda_cache(m * n * x.element_size())
    actual = torch.ops.tinykern.block_matmul(*args).cpu()
    assert actual.shape == (m, n) and actual.dtype == dtype
    assert torch.isfinite(actual).all()
    tol = (GEMV_TOL if m <= 16 else TILED_TOL)[dtype]
    assert relative_error(actual, expected) < tol


@pytest.mark.parametrize("ggml_type", [12, 2])
def test_matmul_long_k(ggml_type):
    # K past one shared-memory chunk of x (512 to 8192 columns by M and dtype), for every GEMV
    # width, and a float32 bias with fp16 x.
    rng = np.random.default_rng(7)
    _, block, _, _ = FORMATS[ggml_type]
    nb = 9216 // block
    k = nb * block - 3
    raw = random_blocks(rng, ggml_type, 24, nb)
    dense = torch.from_numpy(reference_dequantize(raw, ggml_type).astype(np.float64))[:, :k]
    bias = torch.from_numpy(rng.standard_normal(24).astype(np.float32))
    for m in (1, 4, 8, 16, 40):
        for dtype in (torch.float32, torch.float16):
            x = torch.from_numpy(rng.standard_normal((m, k))).to(dtype)
            actual = torch.ops.tinykern.block_matmul(x.cuda(), torch.from_numpy(raw).cuda(), bias.cuda(),
                                                     ggml_type).cpu()
            expected = x.double() @ dense.T + bias.double()
            tol = (GEMV_TOL if m <= 16 else TILED_TOL)[dtype]
            assert relative_error(actual, expected) < tol, (m, dtype)


def test_matmul_strided_x():
    # A non-contiguous x (a column slice) is made contiguous, not misread.
    rng = np.random.default_rng(3)
    raw = random_blocks(rng, 8, 9, 2)
    dense = torch.from_numpy(reference_dequantize(raw, 8).astype(np.float64))
    wide = torch.from_numpy(rng.standard_normal((20, 70)).astype(np.float32))
    x = wide[:, 3:67]
    for rows in (2, 20):
        actual = torch.ops.tinykern.block_matmul(wide.cuda()[:rows, 3:67], torch.from_numpy(raw).cuda(), None,
                                                 8).cpu()
        assert relative_error(actual, x[:rows].double() @ dense.T) < 2e-3


def test_empty_shapes():
    raw = torch.from_numpy(random_blocks(np.random.default_rng(0), 2, 4, 1)).cuda()
    assert torch.ops.tinykern.block_matmul(torch.empty(0, 32, device="cuda"), raw, None, 2).shape == (0, 4)
    out = torch.ops.tinykern.block_dequantize(torch.empty(0, 18, dtype=torch.uint8, device="cuda"), 2, torch.float16)
    assert out.shape == (0, 32)


def test_unknown_type_is_refused():
    x = torch.zeros(1, 32, device="cuda")
    w = torch.zeros(1, 18, dtype=torch.uint8, device="cuda")
    with pytest.raises(RuntimeError, match="block_matmul: GGML type 1 has no CUDA kernels"):
        torch.ops.tinykern.block_matmul(x, w, None, 1)
    with pytest.raises(RuntimeError, match="block_dequantize: GGML type 99 has no CUDA kernels"):
        torch.ops.tinykern.block_dequantize(w, 99, torch.float32)


def test_bad_shapes_are_refused():
    w = torch.zeros(2, 18, dtype=torch.uint8, device="cuda")
    with pytest.raises(RuntimeError, match="block_matmul: x of shape"):
        torch.ops.tinykern.block_matmul(torch.zeros(1, 40, device="cuda"), w, None, 2)
    with pytest.raises(RuntimeError, match="block_dequantize: blocks of shape"):
        torch.ops.tinykern.block_dequantize(torch.zeros(2, 20, dtype=torch.uint8, device="cuda"), 2, torch.float32)
    with pytest.raises(RuntimeError, match="every tensor on one"):
        torch.ops.tinykern.block_matmul(torch.zeros(1, 32), w, None, 2)
