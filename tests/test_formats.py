"""The Q4_K and Q8_0 block formats, byte for byte.

Dequantization must be bit-identical to the `gguf` package (compared as float32 bit patterns, so
that even the sign of a zero counts); Q8_0 quantization byte-identical to it. gguf cannot
quantize Q4_K, so our Q4_K quantizer is measured against the C reference quantize_row_q4_K_ref
of the libggml-python wheel: relative RMS error, and the share of blocks it reproduces exactly.
The compiled quantizers of tinykern._C (what CPU tensors get) must give the C reference's bytes.
"""

import ctypes
import os

import numpy as np
import pytest
import torch
from conftest import BACKEND_CASES, forced, relative_error
from gguf import GGMLQuantizationType, quants

from tinykern import _ext, backends, ops
from tinykern.formats import q4k, q8_0

Q4_K = GGMLQuantizationType.Q4_K
Q8_0 = GGMLQuantizationType.Q8_0


def bits(t):
    """float32 values -> their int32 bit patterns (as numpy), for bit-exact comparison."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().float().numpy()
    return np.ascontiguousarray(t, dtype=np.float32).view(np.int32)


def random_bytes(gen, n, block_bytes, fp16_fields):
    """n blocks of uniformly random bytes whose fp16 fields (byte offsets) are all finite."""
    raw = torch.randint(0, 256, (n, block_bytes), generator=gen, dtype=torch.int32).to(torch.uint8).numpy()
    for offset in fp16_fields:
        half = raw[:, offset:offset + 2].copy().view(np.uint16)
        # Exponent all ones is Inf/NaN: clear its top bit, which keeps sign and mantissa random.
        inf_or_nan = (half & 0x7C00) == 0x7C00
        half[inf_or_nan] ^= 0x4000
        raw[:, offset:offset + 2] = half.view(np.uint8)
        assert np.isfinite(raw[:, offset:offset + 2].copy().view(np.float16)).all()
    return raw


def student_t(gen, df, shape):
    """torch.distributions.StudentT samples, reproducible: it draws from the global RNG, so seed
    a forked copy of it from gen."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        return torch.distributions.StudentT(df).sample(shape)


# --- Q4_K dequantize -------------------------------------------------------------------------


def test_q4k_dequantize_matches_gguf_on_our_blocks(gen):
    w = torch.randn(6, 768, generator=gen) * torch.logspace(-3, 2, 6)[:, None]
    blocks = q4k.quantize(w)
    assert blocks.shape == (6, 3 * 144) and blocks.dtype == torch.uint8
    ours = q4k.dequantize(blocks)
    theirs = quants.dequantize(blocks.numpy(), Q4_K)
    assert ours.shape == w.shape and ours.dtype == torch.float32
    np.testing.assert_array_equal(bits(ours), bits(theirs))


def test_q4k_dequantize_matches_gguf_on_random_bytes(gen):
    # Every bit pattern of the scales and codes, negative and subnormal d/dmin included.
    raw = random_bytes(gen, 4000, 144, fp16_fields=(0, 2))
    ours = q4k.dequantize(torch.from_numpy(raw))
    theirs = quants.dequantize(raw, Q4_K)
    assert ours.shape == (4000, 256)
    np.testing.assert_array_equal(bits(ours), bits(theirs))


def test_q4k_dequantize_keeps_leading_dims_and_dtype(gen):
    w = torch.randn(2, 3, 512, generator=gen)
    blocks = q4k.quantize(w)
    assert blocks.shape == (2, 3, 288)
    dense = q4k.dequantize(blocks)
    assert dense.shape == (2, 3, 512)
    for dtype in (torch.float16, torch.bfloat16):
        low = q4k.dequantize(blocks, dtype)
        assert low.dtype == dtype
        assert torch.equal(low, dense.to(dtype))


def test_q4k_dequantize_matches_c_reference(gen, ggml_c):
    raw = random_bytes(gen, 500, 144, fp16_fields=(0, 2))
    np.testing.assert_array_equal(bits(q4k.dequantize(torch.from_numpy(raw))), bits(ggml_c.dequantize_q4k(raw)))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_q4k_dequantize_op_every_backend(device, backend, gen):
    raw = random_bytes(gen, 300, 144, fp16_fields=(0, 2)).reshape(3, 100 * 144)
    expected = quants.dequantize(raw, Q4_K)
    with forced("q4k_dequantize", backend, device):
        out = ops.q4k_dequantize(torch.from_numpy(raw).to(device))
    assert out.shape == (3, 100 * 256) and out.dtype == torch.float32
    np.testing.assert_array_equal(bits(out), bits(expected))


# --- Q8_0 dequantize -------------------------------------------------------------------------


def test_q8_0_dequantize_matches_gguf_on_random_bytes(gen):
    raw = random_bytes(gen, 4000, 34, fp16_fields=(0,))
    ours = q8_0.dequantize(torch.from_numpy(raw))
    theirs = quants.dequantize(raw, Q8_0)
    assert ours.shape == (4000, 32)
    np.testing.assert_array_equal(bits(ours), bits(theirs))


def test_q8_0_dequantize_matches_gguf_on_our_blocks(gen):
    w = torch.randn(5, 96, generator=gen) * torch.logspace(-4, 3, 5)[:, None]
    blocks = q8_0.quantize(w)
    assert blocks.shape == (5, 3 * 34)
    ours = q8_0.dequantize(blocks)
    np.testing.assert_array_equal(bits(ours), bits(quants.dequantize(blocks.numpy(), Q8_0)))
    assert relative_error(ours, w) < 0.01


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_q8_0_dequantize_op_every_backend(device, backend, gen):
    raw = random_bytes(gen, 210, 34, fp16_fields=(0,)).reshape(7, 30 * 34)
    expected = quants.dequantize(raw, Q8_0)
    with forced("q8_0_dequantize", backend, device):
        out = ops.q8_0_dequantize(torch.from_numpy(raw).to(device))
    np.testing.assert_array_equal(bits(out), bits(expected))


# --- Q8_0 quantize: byte-identical to gguf -----------------------------------------------------


def assert_q8_0_matches_gguf(w):
    ours = q8_0.quantize(w)
    theirs = quants.quantize(w.float().numpy(), Q8_0)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == theirs.shape
    mismatched = (ours.numpy() != theirs).any(axis=-1)
    assert not mismatched.any(), f"{mismatched.sum()} of {mismatched.size} Q8_0 blocks differ from gguf"


def test_q8_0_quantize_matches_gguf_random(gen):
    # Scales from 1e-6 to 1e4 and a heavy-tailed distribution.
    w = torch.randn(40, 320, generator=gen) * torch.logspace(-6, 4, 40)[:, None]
    assert_q8_0_matches_gguf(w)
    assert_q8_0_matches_gguf(student_t(gen, 2.0, (13, 64)))


def test_q8_0_quantize_matches_gguf_at_exact_ties(gen):
    """x * (1/d) lands exactly on k + 0.5: C's roundf goes away from zero, not to even."""
    rows = []
    # d = 1 (amax 127): halves of every parity, both signs.
    k = torch.randint(-127, 127, (8, 31), generator=gen).float() + 0.5
    rows.append(torch.cat((torch.full((8, 1), 127.0), k), dim=1))
    # d = 0.5 (amax 63.5, 1/d = 2 exactly): x = (k + 0.5) / 2.
    k = torch.randint(-127, 127, (8, 31), generator=gen).float() + 0.5
    rows.append(torch.cat((torch.full((8, 1), -63.5), k / 2), dim=1))
    # d = 4 (amax 508): x = 4 * (k + 0.5).
    k = torch.randint(-127, 127, (8, 31), generator=gen).float() + 0.5
    rows.append(torch.cat((torch.full((8, 1), 508.0), 4 * k), dim=1))
    # The values either side of each tie (0.49999997 must not round up).
    k = torch.randint(-127, 127, (8, 31), generator=gen).float() + 0.5
    below = torch.nextafter(k, torch.zeros_like(k))
    above = torch.nextafter(k, torch.sign(k) * 1000)
    rows += [torch.cat((torch.full((8, 1), 127.0), below), dim=1), torch.cat((torch.full((8, 1), 127.0), above), dim=1)]
    w = torch.cat(rows)
    x = w.reshape(-1, 32)
    assert (x * (1 / (x.abs().amax(1, keepdim=True) / 127)) % 1 == 0.5).float().mean() > 0.3, "no ties built"
    # Permute within rows so the amax is not always first.
    w = w[:, torch.randperm(32, generator=gen)]
    assert_q8_0_matches_gguf(w)
    # And the tie codes are the away-from-zero ones.
    codes = q8_0.quantize(w[:8]).reshape(8, 34)[:, 2:].view(torch.int8).float()
    expected = torch.where(w[:8] > 0, (w[:8] + 0.5), (w[:8] - 0.5)).trunc()
    assert torch.equal(codes, expected)


def test_q8_0_quantize_zero_and_tiny_blocks(gen):
    w = torch.randn(4, 128, generator=gen)
    w[0, 32:64] = 0  # d = 0: codes 0, not NaN
    w[1, :32] = torch.randn(32, generator=gen) * 1e-7  # d below fp16's smallest normal
    w[2, 64:96] = -0.0
    assert_q8_0_matches_gguf(w)
    dense = q8_0.dequantize(q8_0.quantize(w))
    assert torch.equal(dense[0, 32:64], torch.zeros(32))
    assert torch.isfinite(dense).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_q8_0_quantize_low_precision_input(dtype, gen):
    w = torch.randn(6, 160, generator=gen).to(dtype)
    assert_q8_0_matches_gguf(w)
    assert torch.equal(q8_0.quantize(w), q8_0.quantize(w.float()))


# --- Q4_K quantize: quality against the C reference ------------------------------------------


class GGMLC:
    """The C reference of libggml-python, through ctypes."""

    def __init__(self, lib):
        self.lib = lib
        lib.quantize_row_q4_K_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        lib.quantize_row_q4_K_ref.restype = None
        lib.dequantize_row_q4_K.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        lib.dequantize_row_q4_K.restype = None
        lib.quantize_row_q8_0_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        lib.quantize_row_q8_0_ref.restype = None

    def quantize_q4k(self, x):
        return self._quantize(self.lib.quantize_row_q4_K_ref, x, 256, 144)

    def quantize_q8_0(self, x):
        return self._quantize(self.lib.quantize_row_q8_0_ref, x, 32, 34)

    @staticmethod
    def _quantize(fn, x, block, block_bytes):
        x = np.ascontiguousarray(x.detach().cpu().float().numpy().reshape(-1))
        y = np.zeros(x.size // block * block_bytes, dtype=np.uint8)
        fn(x.ctypes.data, y.ctypes.data, x.size)
        return torch.from_numpy(y).reshape(-1, block_bytes)

    def dequantize_q4k(self, blocks):
        blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
        y = np.zeros(blocks.size // 144 * 256, dtype=np.float32)
        self.lib.dequantize_row_q4_K(blocks.ctypes.data, y.ctypes.data, y.size)
        return y.reshape(-1, 256)


@pytest.fixture(scope="module")
def ggml_c():
    libggml = pytest.importorskip("libggml", reason="libggml-python is not installed: no C reference for Q4_K")
    path = os.path.join(libggml.__path__[0], "lib64", "libggml-base.so")
    if not os.path.exists(path):
        pytest.skip(f"libggml-python has no {path}: no C reference for Q4_K")
    return GGMLC(ctypes.CDLL(path))


def sample(dist, gen, n):
    if dist == "normal":
        return torch.randn(n, generator=gen)
    if dist == "student_t3":
        return student_t(gen, 3.0, (n,))
    if dist == "outliers":
        x = torch.randn(n, generator=gen)
        # A few values x50 (about one per two blocks), as in real weights.
        idx = torch.randint(0, n, (n // 512,), generator=gen)
        x[idx] *= 50
        return x
    raise AssertionError(dist)


# Share of blocks identical to the C reference, measured at 0.398 / 0.500 / 0.463 on these 512
# blocks: the floors catch a regression of the search without flagging accumulation-order ties.
IDENTICAL_FLOOR = {"normal": 0.25, "student_t3": 0.32, "outliers": 0.30}


# The quantizer each path runs on CPU tensors: the compiled port ("cpu", the default when _C is
# built) and the torch search ("torch").
QUANTIZER_PATHS = [pytest.param("cpu", marks=pytest.mark.skipif(not _ext.available(), reason="tinykern._C is not built")),
                   "torch"]


@pytest.mark.parametrize("path", QUANTIZER_PATHS)
@pytest.mark.parametrize("dist", ["normal", "student_t3", "outliers"])
def test_q4k_quantize_as_good_as_c_reference(dist, path, gen, ggml_c, record_property):
    x = sample(dist, gen, 512 * 256).reshape(16, 8192)
    with backends.backend(path):
        ours = q4k.quantize(x).reshape(-1, 144)
    ref = ggml_c.quantize_q4k(x)
    err_ours = relative_error(q4k.dequantize(ours), x.reshape(-1, 256))
    err_c = relative_error(q4k.dequantize(ref), x.reshape(-1, 256))
    identical = (ours == ref).all(dim=1).float().mean().item()
    ratio = err_ours / err_c
    record_property(f"q4k_{dist}_rel_error", err_ours)
    record_property(f"q4k_{dist}_c_rel_error", err_c)
    record_property(f"q4k_{dist}_error_ratio", ratio)
    record_property(f"q4k_{dist}_identical_blocks", identical)
    print(f"Q4_K {dist}: rel error {err_ours:.5f} vs C {err_c:.5f} (ratio {ratio:.4f}), identical blocks {identical:.1%}")
    assert ratio <= 1.01, f"{dist}: relative RMS error {err_ours:.5f} > 1.01 x C reference {err_c:.5f}"
    floor = 1.0 if path == "cpu" else IDENTICAL_FLOOR[dist]
    assert identical >= floor, f"{dist}: only {identical:.1%} of blocks match the C reference"
    if dist == "normal":
        assert 0.065 < err_ours < 0.075  # the layout doc: about 0.071 on N(0,1)


def test_q4k_quantize_special_blocks_match_c_reference(gen, ggml_c):
    """Blocks the search treats specially: all-negative, all-positive, flat, zero sub-blocks."""
    x = torch.randn(6, 256, generator=gen)
    x[0] = -x[0].abs()  # min < 0, max < 0
    x[1] = x[1].abs() + 1  # min > 0: clamped to 0
    x[2, 32:64] = -2.0  # one flat negative sub-block
    x[3, :128] = 0  # zero sub-blocks
    x[4, ::2] = 0.25  # half the values shared
    x[5] = torch.linspace(-1, 1, 256)
    ours = q4k.quantize(x)
    ref = ggml_c.quantize_q4k(x)
    for i in range(6):
        e_ours = relative_error(q4k.dequantize(ours[i]), x[i])
        e_c = relative_error(q4k.dequantize(ref[i]), x[i])
        assert e_ours <= 1.05 * e_c + 1e-6, f"block {i}: {e_ours:.5f} vs C {e_c:.5f}"


def reference_matrices(gen):
    """The data the compiled quantizers must reproduce the C reference's bytes on: the three
    distributions above, uniform, one sign only (each way), rows scaled from 1e-6 to 1e4,
    90% zeros, near the fp32 underflow, one 1e4 outlier in N(0,1), and all zeros."""
    shape = (8, 4096)
    n = shape[0] * shape[1]
    mats = {dist: sample(dist, gen, n).reshape(shape) for dist in ("normal", "student_t3", "outliers")}
    normal = torch.randn(shape, generator=gen)
    mats["uniform"] = torch.rand(shape, generator=gen) * 2 - 1
    mats["positive"] = torch.rand(shape, generator=gen) + 1
    mats["negative"] = -torch.rand(shape, generator=gen)
    mats["row_scales"] = normal * torch.logspace(-6, 4, shape[0])[:, None]
    mats["sparse"] = normal * (torch.rand(shape, generator=gen) < 0.1)
    mats["tiny"] = normal * 1e-30
    mats["outlier_1e4"] = torch.randn(shape, generator=gen)
    mats["outlier_1e4"][3, 1000] = 1e4
    mats["zeros"] = torch.zeros(shape)
    return mats


@pytest.mark.skipif(not _ext.available(), reason="tinykern._C is not built")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("simd", ["best", "avx2", "scalar"])
def test_compiled_quantizers_give_the_c_reference_bytes(simd, threads, gen, ggml_c, monkeypatch):
    """Every SIMD path of q4k_quantize / q8_0_quantize against quantize_row_q4_K_ref /
    quantize_row_q8_0_ref, byte for byte, split across one or two threads."""
    if simd != "best":
        monkeypatch.setenv("TINYKERN_CPU_SIMD", simd)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, x in reference_matrices(gen).items():
            for fmt, ref in ((q4k, ggml_c.quantize_q4k), (q8_0, ggml_c.quantize_q8_0)):
                ours = fmt.quantize(x).reshape(-1, fmt.BLOCK_BYTES)
                differ = (ours != ref(x)).any(dim=1).sum().item()
                assert differ == 0, f"{fmt.__name__} {name}: {differ} of {ours.shape[0]} blocks differ from the C reference"
    finally:
        torch.set_num_threads(saved)


@pytest.mark.skipif(not _ext.available(), reason="tinykern._C is not built")
def test_compiled_quantizers_odd_shapes_and_errors(gen):
    """Leading dims kept, an odd number of super-blocks (a part-filled group of lanes), views."""
    x = torch.randn(3, 5, 768, generator=gen)
    for fmt, op in ((q4k, torch.ops.tinykern.q4k_quantize), (q8_0, torch.ops.tinykern.q8_0_quantize)):
        with backends.backend("torch"):
            expected = fmt.quantize(x) if fmt is q8_0 else None
        got = op(x)
        assert got.shape == (3, 5, 768 // fmt.BLOCK * fmt.BLOCK_BYTES) and got.dtype == torch.uint8
        assert torch.equal(op(x[:, 1:4]), got[:, 1:4])  # a non-contiguous view
        if expected is not None:
            assert torch.equal(got, expected)
        with pytest.raises(RuntimeError, match=r"must be float32.*Half"):
            op(x.half())
        with pytest.raises(RuntimeError, match=r"multiple of"):
            op(x[..., :100])
        torch.library.opcheck(op, (x,))


# --- Q4_K quantize: exact cases, errors, dtypes ------------------------------------------------


@pytest.mark.parametrize("fmt", [q4k, q8_0], ids=["q4_k", "q8_0"])
def test_all_zero_blocks_round_trip_exactly(fmt, gen):
    w = torch.randn(3, 512, generator=gen)
    w[0] = 0
    w[2, 256:] = 0
    dense = fmt.dequantize(fmt.quantize(w))
    assert torch.equal(dense[0], torch.zeros(512))
    assert torch.equal(dense[2, 256:], torch.zeros(256))
    assert torch.equal(fmt.dequantize(fmt.quantize(torch.zeros(2, 256))), torch.zeros(2, 256))


@pytest.mark.parametrize("value", [1.0, -0.5, 3.0, 1024.0, -7.25, 2.0**-18, 65504.0])
def test_q4k_constant_blocks_round_trip_exactly(value, gen):
    # (Not Q8_0: it stores d = amax/127 as fp16, as the reference does, so 1.0 comes back as
    # 127 * fp16(1/127); its blocks must match gguf byte for byte instead.)
    fmt = q4k
    w = torch.randn(3, 512, generator=gen)
    w[1, 256:] = value  # one constant block among random ones
    w[2] = value  # a whole constant row
    dense = fmt.dequantize(fmt.quantize(w))
    assert torch.equal(dense[1, 256:], torch.full((256,), value)), dense[1, 256:].unique()
    assert torch.equal(dense[2], torch.full((512,), value)), dense[2].unique()
    assert relative_error(dense[0], w[0]) < 0.1


@pytest.mark.parametrize("fmt", [q4k, q8_0], ids=["q4_k", "q8_0"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_raise_naming_the_tensor(fmt, bad, gen):
    w = torch.randn(4, 256, generator=gen)
    w[2, 77] = bad
    with pytest.raises(ValueError, match=r"unet\.down\.0\.weight.*NaN or Inf"):
        fmt.quantize(w, name="unet.down.0.weight")


# The range each format holds (its block scales are fp16): (format, lowest, highest).
RANGES = [pytest.param(q8_0, -q8_0.MAX_ABS, q8_0.MAX_ABS, id="q8_0"),
          pytest.param(q4k, q4k.LOWEST, q4k.HIGHEST, id="q4_k")]


@pytest.mark.parametrize("fmt,lowest,highest", RANGES)
def test_weights_at_the_range_ends_quantize_finite(fmt, lowest, highest, gen):
    w = torch.randn(4, 512, generator=gen)
    w = (w / w.abs().max() * highest).clamp(lowest, highest)
    w[1, 3], w[2, 300] = lowest, highest
    single = torch.zeros(2, 256)
    single[0, 9], single[1, 200] = lowest, highest
    dense, single_back = fmt.dequantize(fmt.quantize(w)), fmt.dequantize(fmt.quantize(single))
    assert torch.isfinite(dense).all() and relative_error(dense, w) < 0.1
    # A block holding one extreme value (and zeros) stores that value exactly.
    assert single_back[0, 9] == lowest and single_back[1, 200] == highest and torch.isfinite(single_back).all()


@pytest.mark.parametrize("side", ["lowest", "highest"])
@pytest.mark.parametrize("fmt,lowest,highest", RANGES)
def test_weights_past_the_range_raise_naming_the_tensor_and_range(fmt, lowest, highest, side, gen):
    w = torch.randn(4, 256, generator=gen)
    end = lowest if side == "lowest" else highest
    w[2, 77] = torch.nextafter(torch.tensor(end), torch.tensor(2 * end))  # the next float32 out
    with pytest.raises(ValueError, match=rf"unet\.down\.0\.weight: .*\[{lowest:.9g}, {highest:.9g}\].*1 of 1024"):
        fmt.quantize(w, name="unet.down.0.weight")
    # Checked in float32: a float64 weight that rounds to the end is what would be stored.
    assert torch.isfinite(fmt.dequantize(fmt.quantize(torch.full((1, 256), end, dtype=torch.float64)))).all()


@pytest.mark.parametrize("fmt,k,multiple", [(q4k, 320, 256), (q4k, 100, 256), (q8_0, 40, 32), (q8_0, 31, 32)],
                         ids=["q4_k-320", "q4_k-100", "q8_0-40", "q8_0-31"])
def test_row_length_must_be_a_multiple_of_the_block(fmt, k, multiple, gen):
    w = torch.randn(3, k, generator=gen)
    with pytest.raises(ValueError, match=rf"layer\.w.*{multiple}.*\[3, {k}\]"):
        fmt.quantize(w, name="layer.w")


def test_dequantize_ops_reject_bad_blocks():
    with pytest.raises(ValueError, match="not a multiple of 144"):
        ops.q4k_dequantize(torch.zeros(3, 145, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        ops.q4k_dequantize(torch.zeros(3, 144, dtype=torch.int8))
    with pytest.raises(ValueError, match="not a multiple of 34"):
        ops.q8_0_dequantize(torch.zeros(2, 33, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_q4k_quantize_low_precision_input(dtype, gen):
    w = torch.randn(5, 512, generator=gen).to(dtype)
    blocks = q4k.quantize(w)
    assert blocks.shape == (5, 288) and blocks.dtype == torch.uint8
    assert torch.equal(blocks, q4k.quantize(w.float()))
    assert relative_error(q4k.dequantize(blocks), w.float()) < 0.08


def test_q4k_quantize_leading_dims_and_1d(gen):
    w = torch.randn(2, 3, 256, generator=gen)
    blocks = q4k.quantize(w)
    assert blocks.shape == (2, 3, 144)
    assert torch.equal(blocks.reshape(6, 144), q4k.quantize(w.reshape(6, 256)))
    assert torch.equal(q4k.quantize(w[0, 0]), blocks[0, 0])


# --- The 12 scale bytes --------------------------------------------------------------------------


def test_pack_unpack_scales_round_trip_every_6_bit_value():
    i = torch.arange(64)[:, None]
    j = torch.arange(8)[None, :]
    # Every position j sees all 64 values, scales and mins in different orders.
    sc = ((i + 7 * j) % 64).to(torch.uint8)
    m = ((5 * i + 3 * j + 11) % 64).to(torch.uint8)
    packed = q4k.pack_scales(sc, m)
    assert packed.shape == (64, 12) and packed.dtype == torch.uint8
    sc2, m2 = q4k.unpack_scales(packed)
    assert torch.equal(sc2, sc) and torch.equal(m2, m)
    # And gguf reads the same values out of the packed bytes.
    g_sc, g_m = quants.Q4_K.get_scale_min(packed.numpy())
    np.testing.assert_array_equal(g_sc, sc.numpy())
    np.testing.assert_array_equal(g_m, m.numpy())


def test_unpack_scales_matches_layout_doc_on_random_bytes(gen):
    s = torch.randint(0, 256, (1000, 12), generator=gen, dtype=torch.int32).to(torch.uint8)
    sc, m = q4k.unpack_scales(s)
    b = s.int()
    # The layout doc's formulas, written out.
    for jj in range(4):
        assert torch.equal(sc[:, jj].int(), b[:, jj] & 63)
        assert torch.equal(m[:, jj].int(), b[:, jj + 4] & 63)
    for jj in range(4, 8):
        assert torch.equal(sc[:, jj].int(), (b[:, jj + 4] & 15) | ((b[:, jj - 4] >> 6) << 4))
        assert torch.equal(m[:, jj].int(), (b[:, jj + 4] >> 4) | ((b[:, jj] >> 6) << 4))
    # 16 six-bit values fill the 96 bits exactly: packing is the inverse on any bytes.
    assert torch.equal(q4k.pack_scales(sc, m), s)
