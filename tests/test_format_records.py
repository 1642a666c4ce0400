"""Every block format in tinykern.formats.FORMATS against GGML, through its Format record.

Dequantization must be bit-identical to the `gguf` package on random valid blocks (compared as
float32 bit patterns, so even the sign of a zero counts). Quantization is measured against
libggml's reference quantizer (quantize_row_<type>_ref of the libggml-python wheel): its error
must stay within 1% of the reference's on every test distribution, and the formats in
BYTE_IDENTICAL must give the reference's bytes.
"""

import contextlib
import re

import numpy as np
import pytest
import torch
from conftest import DEVICES, ggml_reference_quantize, relative_error
from gguf import GGMLQuantizationType, quants
from gguf.constants import GGML_QUANT_SIZES

from tinykern import backends
from tinykern.formats import BY_GGML_TYPE, FORMATS, legacy

ALL = [pytest.param(f, id=f.name) for f in FORMATS.values()]
WRITABLE = [pytest.param(f, id=f.name) for f in FORMATS.values() if f.quantize is not None]
# The formats whose quantizer ports the reference exactly, on every path (not only the compiled one).
BYTE_IDENTICAL = {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q5_k", "q6_k"}
# Byte offsets of each block's fp16 fields, by GGML type (ggml-common.h's block structs).
FP16_FIELDS = {2: (0,), 3: (0, 2), 6: (0,), 7: (0, 2), 8: (0,), 10: (80, 82), 11: (108,), 12: (0, 2),
               13: (0, 2), 14: (208,)}
# The devices besides the CPU on which the torch quantizers and dequantizers must agree with it.
OFF_CPU = [d for d in DEVICES if d != "cpu"] or [
    pytest.param("cuda", marks=pytest.mark.skip(reason="no CUDA device: the torch paths off the CPU are not checked"))]
# Weights per row in the quantizer tests: whole blocks of every format.
K = 1024
TOLERANCE = 1.01


def bits(t):
    """float32 values -> their int32 bit patterns (as numpy), for bit-exact comparison."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().float().numpy()
    return np.ascontiguousarray(t, dtype=np.float32).view(np.int32)


def random_blocks(gen, fmt, n):
    """n blocks of uniformly random bytes, uint8 numpy [n, block_bytes], whose fp16 fields are all
    finite (Inf or NaN scales are no valid block)."""
    if fmt.ggml_type not in FP16_FIELDS:
        pytest.fail(f"{fmt.name}: add its fp16 field offsets to FP16_FIELDS")
    raw = torch.randint(0, 256, (n, fmt.block_bytes), generator=gen, dtype=torch.int32).to(torch.uint8).numpy()
    for offset in FP16_FIELDS[fmt.ggml_type]:
        half = raw[:, offset:offset + 2].copy().view(np.uint16)
        # Exponent all ones is Inf/NaN: clearing its top bit keeps sign and mantissa random.
        half[(half & 0x7C00) == 0x7C00] ^= 0x4000
        raw[:, offset:offset + 2] = half.view(np.uint8)
    return raw


def gguf_dequantize(fmt, raw):
    """gguf-py's dequantization of the blocks uint8 numpy [..., nb*block_bytes], as float32."""
    return quants.dequantize(raw, GGMLQuantizationType(fmt.ggml_type)).astype(np.float32)


# --- libggml's reference quantizers ----------------------------------------------------------


def on_path(path):
    """The context running quantizers on `path`: "auto" (the default: compiled where built) or
    "torch" (the torch port, what tensors off the CPU get)."""
    return contextlib.nullcontext() if path == "auto" else backends.backend(path)


# --- test data -------------------------------------------------------------------------------


def _normal(gen, shape):
    return torch.randn(shape, generator=gen)


def _laplace(gen, shape):
    # The difference of two unit exponentials is a unit Laplace.
    return torch.empty(shape).exponential_(generator=gen) - torch.empty(shape).exponential_(generator=gen)


def _student_t3(gen, shape):
    # N(0, 1) / sqrt(chi2(3) / 3), with chi2(3) the sum of three squared normals.
    chi2 = torch.randn(3, *shape, generator=gen).square().sum(dim=0)
    return torch.randn(shape, generator=gen) / (chi2 / 3).sqrt()


def _outliers(gen, shape):
    # 1% of the weights 30x larger than the rest.
    scale = torch.where(torch.rand(shape, generator=gen) < 0.01, 30.0, 1.0)
    return torch.randn(shape, generator=gen) * scale


def _tiny(gen, shape):
    return 1e-6 * torch.randn(shape, generator=gen)


def _sparse(gen, shape):
    return torch.where(torch.rand(shape, generator=gen) < 0.9, 0.0, torch.randn(shape, generator=gen))


def _shifted(gen, shape):
    return torch.randn(shape, generator=gen) + 3


DISTRIBUTIONS = {"normal": _normal, "laplace": _laplace, "student_t3": _student_t3, "outliers": _outliers,
                 "tiny": _tiny, "sparse": _sparse, "shifted": _shifted}


# --- the records -------------------------------------------------------------------------------


def test_records_are_unique_and_match_gguf():
    assert len({f.ggml_type for f in FORMATS.values()}) == len(FORMATS)
    assert BY_GGML_TYPE == {f.ggml_type: f for f in FORMATS.values()}
    for name, fmt in FORMATS.items():
        assert fmt.name == name == GGMLQuantizationType(fmt.ggml_type).name.lower()
        assert GGML_QUANT_SIZES[GGMLQuantizationType(fmt.ggml_type)] == (fmt.block, fmt.block_bytes)


@pytest.mark.parametrize("fmt", ALL)
def test_record_geometry(fmt):
    assert fmt.bits_per_weight == fmt.block_bytes * 8 / fmt.block
    assert K % fmt.block == 0
    assert all(offset + 2 <= fmt.block_bytes for offset in FP16_FIELDS.get(fmt.ggml_type, ()))
    assert fmt.padded(fmt.block + 1) == 2 * fmt.block and fmt.padded(fmt.block) == fmt.block
    assert fmt.row_bytes(fmt.block + 1) == 2 * fmt.block_bytes


# --- dequantize --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("batch", [(), (5,), (2, 3)], ids=["row", "rows", "batch"])
def test_dequantize_bit_identical_to_gguf(gen, fmt, batch):
    nb = 4
    raw = random_blocks(gen, fmt, int(np.prod(batch, dtype=np.int64)) * nb).reshape(*batch, nb * fmt.block_bytes)
    got = fmt.dequantize(torch.from_numpy(raw))
    expected = gguf_dequantize(fmt, raw)
    assert got.dtype == torch.float32 and tuple(got.shape) == (*batch, nb * fmt.block) == expected.shape
    np.testing.assert_array_equal(bits(got), bits(expected))


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_to_half_dtypes_rounds_the_float32_values(gen, fmt, dtype):
    blocks = torch.from_numpy(random_blocks(gen, fmt, 6)).reshape(2, -1)
    got = fmt.dequantize(blocks, dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, fmt.dequantize(blocks).to(dtype), rtol=0, atol=0, equal_nan=True)


# --- quantize ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", WRITABLE)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("path", ["auto", "torch"])
def test_quantize_error_against_reference(gen, fmt, dist, path):
    """Error within TOLERANCE of libggml's reference quantizer on fresh data, on the default path
    (the compiled quantizer where there is one) and the torch one; the reference's bytes where
    the format claims them."""
    x = DISTRIBUTIONS[dist](gen, (64, K))
    reference = ggml_reference_quantize(fmt, x)
    with on_path(path):
        blocks = fmt.quantize(x)
    ours = relative_error(fmt.dequantize(blocks), x)
    theirs = relative_error(fmt.dequantize(reference), x)
    assert ours <= TOLERANCE * theirs, f"{fmt.name} {dist}: error {ours:.6g}, reference {theirs:.6g}"
    if fmt.name in BYTE_IDENTICAL:
        differ = (blocks.reshape(-1, fmt.block_bytes) != reference.reshape(-1, fmt.block_bytes)).any(dim=1)
        assert not bool(differ.any()), f"{fmt.name} {dist}: {int(differ.sum())} blocks differ from the reference"


@pytest.mark.parametrize("fmt", [pytest.param(FORMATS[n], id=n) for n in sorted(BYTE_IDENTICAL & set(FORMATS)) if FORMATS[n].block == 32])
def test_quantize_edge_blocks_match_reference(fmt):
    """Blocks the reference treats specially (the 32-weight formats; the K-quants' are in
    test_kquant_formats.py): all zeros (of either sign), ties between +a and -a,
    constants, a single nonzero, scales that are fp16-subnormal or round to zero."""
    assert fmt.block == 32
    x = torch.stack([
        torch.zeros(32), -torch.zeros(32), torch.full((32,), 2.5), torch.full((32,), -2.5),
        torch.tensor([1.0, -1.0] * 16), torch.tensor([-1.0, 1.0] * 16),
        torch.where(torch.arange(32) == 7, -3.0, 0.0), torch.where(torch.arange(32) == 7, 3.0, -0.0),
        torch.linspace(-1, 1, 32), torch.linspace(-1e-30, 1e-30, 32), torch.linspace(0, 1e-5, 32),
        torch.arange(32.0) - 16, torch.arange(32.0) * 1000,
        # Zeros of both signs as the minimum: the reference keeps the first one's sign.
        torch.tensor([0.0, -0.0] * 15 + [1.0, 2.0]), torch.tensor([-0.0, 0.0] * 15 + [1.0, 2.0]),
    ])
    reference = ggml_reference_quantize(fmt, x)
    for path in ("auto", "torch"):
        with on_path(path):
            assert torch.equal(fmt.quantize(x), reference), path


@pytest.mark.parametrize("fmt", WRITABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_shape_and_dtype(gen, fmt, dtype):
    w = torch.randn(3, 2, 2 * fmt.block, generator=gen)
    blocks = fmt.quantize(w)
    assert blocks.dtype == torch.uint8 and blocks.shape == (3, 2, 2 * fmt.block_bytes)
    back = fmt.dequantize(blocks, dtype)
    assert back.dtype == dtype and back.shape == w.shape
    assert torch.equal(back, fmt.dequantize(blocks).to(dtype))
    # A half-precision input quantizes as its float32 values do.
    assert torch.equal(fmt.quantize(w.to(dtype)), fmt.quantize(w.to(dtype).float()))


@pytest.mark.parametrize("fmt", [pytest.param(FORMATS[n], id=n) for n in sorted(BYTE_IDENTICAL & set(FORMATS))])
@pytest.mark.parametrize("device", OFF_CPU)
def test_quantize_and_dequantize_off_cpu_match(gen, fmt, device):
    """The torch quantizer and dequantizer give the same bytes and bits on another device."""
    x = torch.cat([f(gen, (4, K)) for f in DISTRIBUTIONS.values()])
    blocks = fmt.quantize(x)
    with on_path("torch"):
        on_device = fmt.quantize(x.to(device))
    assert on_device.device.type == device and torch.equal(on_device.cpu(), blocks)
    raw = torch.from_numpy(random_blocks(gen, fmt, 64)).reshape(4, -1)
    np.testing.assert_array_equal(bits(fmt.dequantize(raw.to(device))), bits(fmt.dequantize(raw)))


# --- errors ------------------------------------------------------------------------------------


def _raises_naming(fmt, w, name="blocks.3.attn.weight"):
    with pytest.raises(ValueError, match=re.escape(name)):
        fmt.quantize(w, name=name)


@pytest.mark.parametrize("fmt", WRITABLE)
def test_quantize_refuses_partial_blocks(fmt):
    _raises_naming(fmt, torch.zeros(2, fmt.block + fmt.block // 2))


@pytest.mark.parametrize("fmt", WRITABLE)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_refuses_non_finite(gen, fmt, bad):
    w = torch.randn(2, fmt.block, generator=gen)
    w[1, 5] = bad
    _raises_naming(fmt, w)


@pytest.mark.parametrize("fmt", WRITABLE)
@pytest.mark.parametrize("big", [1e38, -1e38])
def test_quantize_refuses_values_out_of_range(gen, fmt, big):
    w = torch.randn(2, fmt.block, generator=gen)
    w[0, 3] = big
    _raises_naming(fmt, w)


@pytest.mark.parametrize("fmt", [pytest.param(FORMATS[n], id=n) for n in ("q4_1", "q5_1") if n in FORMATS])
def test_affine_formats_check_each_block_against_fp16(fmt):
    """Q4_1 / Q5_1 store a block's minimum and spread as fp16: a block of a large constant is out
    of range, a wide block starting at zero is not."""
    fp16_max = torch.finfo(torch.float16).max
    _raises_naming(fmt, torch.full((1, 32), 2 * fp16_max))
    nmax = 15 if fmt.name == "q4_1" else 31
    wide = torch.linspace(0, nmax * fp16_max, 32)[None]
    assert torch.equal(fmt.quantize(wide), ggml_reference_quantize(fmt, wide))
    _raises_naming(fmt, torch.linspace(-fp16_max, nmax * fp16_max, 32)[None])


@pytest.mark.parametrize("fmt", [pytest.param(FORMATS[n], id=n) for n in ("q4_0", "q5_0") if n in FORMATS])
def test_symmetric_formats_hold_their_max_abs(fmt):
    bits_ = 4 if fmt.name == "q4_0" else 5
    edge = legacy.symmetric_max_abs(bits_)
    w = torch.linspace(-edge, edge, 32)[None]
    assert torch.equal(fmt.quantize(w), ggml_reference_quantize(fmt, w))
    _raises_naming(fmt, w * 1.001)
