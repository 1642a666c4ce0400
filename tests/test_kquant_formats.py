"""Q2_K, Q3_K, Q5_K and Q6_K specifics: bit packing round trips, the quantizers' bytes (the
compiled one of tinykern._C and the torch port, each) against libggml's reference quantizers on
fresh data and on extreme blocks, the two against each other, and refusals.

The format-generic checks (dequantize against gguf-py, error against libggml on seven
distributions) live in test_format_records.py.
"""

import contextlib

import pytest
import torch
from conftest import DEVICES, ggml_reference_quantize

from tinykern import _ext, backends
from tinykern.formats import q2_k, q3_k, q5_k, q6_k

MODULES = {"q2_k": q2_k, "q3_k": q3_k, "q5_k": q5_k, "q6_k": q6_k}
FORMATS = list(MODULES)
# The quantizer paths on the CPU: "auto" runs the compiled port where tinykern._C is built,
# "torch" forces the torch port (what tensors off the CPU get).
NATIVE = pytest.mark.skipif(not _ext.available(), reason=f"tinykern._C is not built ({_ext.ERROR})")
PATHS = pytest.mark.parametrize("path", [pytest.param("auto", marks=NATIVE), "torch"])


def on_path(path):
    return contextlib.nullcontext() if path == "auto" else backends.backend(path)


def reference(fmt, x):
    """x float32 [n, K] quantized by libggml's quantize_row_<type>_ref, uint8 [n, K/256*bytes]."""
    return ggml_reference_quantize(MODULES[fmt].FORMAT, x)


def assert_same_bytes(fmt, x):
    ours = MODULES[fmt].quantize(x)
    theirs = reference(fmt, x)
    differing = (ours != theirs).any(dim=-1).reshape(-1, 1)  # per row
    assert not bool(differing.any()), f"{fmt}: {int(differing.sum())} of {x.shape[0]} rows differ from libggml"


def _distributions(gen, rows):
    shape = (rows, 512)
    normal = torch.randn(shape, generator=gen)
    outliers = torch.randn(shape, generator=gen)
    outliers[torch.rand(shape, generator=gen) < 0.01] *= 40
    sparse = torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.1)
    u = torch.rand(shape, generator=gen) - 0.5
    laplace = -torch.sign(u) * torch.log1p(-2 * u.abs())  # inverse CDF
    return {"normal": normal, "outliers": outliers, "sparse": sparse, "laplace": laplace,
            "tiny": 1e-6 * torch.randn(shape, generator=gen), "shifted": torch.randn(shape, generator=gen) + 3,
            "wide": torch.randn(shape, generator=gen) * torch.logspace(-3, 3, 512),
            # Spans of denormals overflow the searches' iscale to Inf, where nearest_int wraps.
            "denormal": 1e-39 * torch.randn(shape, generator=gen)}


@PATHS
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seed", [11, 12])
def test_quantize_is_byte_identical_to_libggml(fmt, seed, path):
    gen = torch.Generator().manual_seed(seed)
    with on_path(path):
        for x in _distributions(gen, 24).values():
            assert_same_bytes(fmt, x)


@NATIVE
@pytest.mark.parametrize("fmt", FORMATS)
def test_compiled_and_torch_quantizers_agree(fmt):
    """The two paths give the same bytes on every distribution, the extreme blocks and the
    range's ends (where the reference would store an Inf scale and both saturate)."""
    mod = MODULES[fmt]
    gen = torch.Generator().manual_seed(21)
    low, high = _ends(mod)
    ends = torch.randn(4, 256, generator=gen)
    ends[0, 5], ends[1, 6], ends[2], ends[3] = high, low, high, low
    for x in [*_distributions(gen, 16).values(), _extreme_blocks(), ends]:
        native = mod.quantize(x)
        with backends.backend("torch"):
            ported = mod.quantize(x)
        differing = (native != ported).any(dim=-1)
        assert not bool(differing.any()), f"{fmt}: {int(differing.sum())} of {x.shape[0]} rows differ"


@NATIVE
@pytest.mark.parametrize("fmt", FORMATS)
def test_compiled_quantizer_threads_and_shapes(fmt):
    """Blocks split across threads give the bytes of one thread, for a block count that no
    group of SIMD lanes or chunk divides."""
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(3, 5, 37 * 256, generator=gen) * torch.logspace(-2, 2, 37 * 256)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.tinykern.block_quantize(x, MODULES[fmt].GGML_TYPE)
        torch.set_num_threads(2)
        two = torch.ops.tinykern.block_quantize(x, MODULES[fmt].GGML_TYPE)
    finally:
        torch.set_num_threads(threads)
    assert one.shape == (3, 5, 37 * MODULES[fmt].BLOCK_BYTES)
    assert torch.equal(one, two)
    assert_same_bytes(fmt, x.reshape(15, -1))


def _extreme_blocks():
    """[n, 256] blocks at the corners of the searches: flat, zero, one outlier, one sign."""
    base = torch.randn(256, generator=torch.Generator().manual_seed(5))
    one_hot = torch.zeros(256)
    one_hot[77] = 3.5
    outlier = base.clone()
    outlier[3] = 1000.0
    neg_outlier = base.clone()
    neg_outlier[200] = -1000.0
    ties = torch.tensor([1.0, -1.0]).repeat(128)  # equal magnitudes of both signs
    steps = torch.arange(256.0) % 7 - 3
    return torch.stack([
        torch.zeros(256), torch.full((256,), 0.75), torch.full((256,), -0.75), torch.full((256,), 1e-20),
        torch.full((256,), 3.0e4), one_hot, outlier, neg_outlier, -base.abs(), base.abs(), base.abs() + 100,
        ties, steps, torch.where(torch.arange(256) < 128, 0.0, base), base * 1e-30,
    ])


@NATIVE
@pytest.mark.parametrize("simd", ["avx2", "scalar"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_compiled_quantizer_on_each_simd_path(fmt, simd, monkeypatch):
    """The 8-lane (AVX2) and 4-lane (baseline) searches give libggml's bytes."""
    monkeypatch.setenv("TINYKERN_CPU_SIMD", simd)  # read at each call; a cap above the CPU's is moot
    gen = torch.Generator().manual_seed(23)
    for x in [*_distributions(gen, 8).values(), _extreme_blocks()]:
        assert_same_bytes(fmt, x)


@PATHS
@pytest.mark.parametrize("fmt", FORMATS)
def test_extreme_blocks_match_libggml(fmt, path):
    with on_path(path):
        assert_same_bytes(fmt, _extreme_blocks())


@pytest.mark.parametrize("fmt", FORMATS)
def test_extreme_blocks_decode_sensibly(fmt):
    mod = MODULES[fmt]
    x = _extreme_blocks()
    w = mod.dequantize(mod.quantize(x))
    assert torch.isfinite(w).all()
    assert (w[0] == 0).all()  # all-zero stays exactly zero
    # One sign only: nothing decodes to the other sign beyond a step.
    neg = w[8]
    assert (neg <= 0.05 * x[8].abs().max()).all()
    # Each block's error stays well below its own scale (the one outlier may take a sub-block).
    err = (w - x).norm(dim=1) / x.norm(dim=1).clamp(min=1e-30)
    bound = {"q2_k": 0.7, "q3_k": 0.5, "q5_k": 0.2, "q6_k": 0.1}[fmt]
    # (Row 3, 1e-20, lies below fp16's smallest scale and decodes to 0 in libggml too.)
    assert (err[[1, 2, *range(4, 14)]] < bound).all(), err


@pytest.mark.parametrize("fmt", FORMATS)
def test_code_packing_round_trips(fmt, gen):
    mod = MODULES[fmt]
    levels = {"q2_k": 4, "q3_k": 8, "q5_k": 32, "q6_k": 64}[fmt]
    codes = torch.randint(0, levels, (9, 256), generator=gen, dtype=torch.uint8)
    assert torch.equal(mod.unpack_codes(mod.pack_codes(codes)), codes)
    # Every packed bit is used: random bytes survive unpack-pack.
    raw = torch.randint(0, 256, (9, mod.pack_codes(codes).shape[1]), generator=gen, dtype=torch.uint8)
    assert torch.equal(mod.pack_codes(mod.unpack_codes(raw)), raw)


def test_q3_k_scale_packing_round_trips(gen):
    sc = torch.randint(0, 64, (9, 16), generator=gen, dtype=torch.uint8)
    assert torch.equal(q3_k.unpack_scales(q3_k.pack_scales(sc)), sc)
    raw = torch.randint(0, 256, (9, 12), generator=gen, dtype=torch.uint8)
    assert torch.equal(q3_k.pack_scales(q3_k.unpack_scales(raw)), raw)


@pytest.mark.parametrize("fmt", FORMATS)
def test_decoded_layout_matches_codes(fmt):
    """Known codes and scales decode where the format says: scale 1 (offset-free), d = 1."""
    mod = MODULES[fmt]
    n = 256
    if fmt == "q6_k":
        codes = (torch.arange(n) % 64).to(torch.uint8)
        raw = torch.cat((mod.pack_codes(codes[None]), torch.ones(1, 16, dtype=torch.uint8),
                         torch.tensor([[0x00, 0x3C]], dtype=torch.uint8)), dim=1)  # fp16 1.0
        expected = codes.float() - 32
    elif fmt == "q3_k":
        codes = (torch.arange(n) % 8).to(torch.uint8)
        sc = torch.full((1, 16), 33, dtype=torch.uint8)  # scale 33 - 32 = 1
        raw = torch.cat((mod.pack_codes(codes[None]), mod.pack_scales(sc),
                         torch.tensor([[0x00, 0x3C]], dtype=torch.uint8)), dim=1)
        expected = codes.float() - 4
    elif fmt == "q5_k":
        from tinykern.formats.q4k import pack_scales

        codes = (torch.arange(n) % 32).to(torch.uint8)
        ones, zeros = torch.ones(1, 8, dtype=torch.uint8), torch.zeros(1, 8, dtype=torch.uint8)
        raw = torch.cat((torch.tensor([[0x00, 0x3C, 0x00, 0x00]], dtype=torch.uint8), pack_scales(ones, zeros),
                         mod.pack_codes(codes[None])), dim=1)
        expected = codes.float()
    else:
        codes = (torch.arange(n) % 4).to(torch.uint8)
        raw = torch.cat((torch.ones(1, 16, dtype=torch.uint8), mod.pack_codes(codes[None]),
                         torch.tensor([[0x00, 0x3C, 0x00, 0x00]], dtype=torch.uint8)), dim=1)
        expected = codes.float()
    assert raw.shape[1] == mod.BLOCK_BYTES
    assert torch.equal(mod.dequantize(raw)[0], expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_shapes_and_dtypes(fmt, gen):
    mod = MODULES[fmt]
    x = torch.randn(2, 3, 512, generator=gen)
    q = mod.quantize(x.half())
    assert q.shape == (2, 3, 2 * mod.BLOCK_BYTES) and q.dtype == torch.uint8
    assert torch.equal(q, mod.quantize(x.half().float()))
    w = mod.dequantize(q, dtype=torch.bfloat16)
    assert w.shape == x.shape and w.dtype == torch.bfloat16
    assert torch.equal(w, mod.dequantize(q).to(torch.bfloat16))
    assert mod.quantize(torch.empty(0, 256)).shape == (0, mod.BLOCK_BYTES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_devices_give_the_same_bytes(fmt, device, gen):
    mod = MODULES[fmt]
    x = torch.randn(16, 512, generator=gen) * torch.logspace(-2, 2, 16)[:, None]
    assert torch.equal(mod.quantize(x.to(device)).cpu(), mod.quantize(x))


def _ends(mod):
    """The (lowest, highest) weight the format holds."""
    if hasattr(mod, "MAX_ABS"):
        return -mod.MAX_ABS, mod.MAX_ABS
    return mod.LOWEST, mod.HIGHEST


@pytest.mark.parametrize("fmt", FORMATS)
def test_refusals_name_the_weight(fmt):
    mod = MODULES[fmt]
    with pytest.raises(ValueError, match=r"^blk\.0\.w: .*multiple of 256"):
        mod.quantize(torch.zeros(4, 300), name="blk.0.w")
    low, high = _ends(mod)
    for bad in (float("nan"), float("inf"), float("-inf"), 1.01 * high, 1.01 * low):
        x = torch.zeros(2, 256)
        x[1, 9] = bad
        with pytest.raises(ValueError, match=r"^blk\.0\.w: ") as info:
            mod.quantize(x, name="blk.0.w")
        assert fmt[:2].upper() in str(info.value) or "NaN" in str(info.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_range_ends_are_held(fmt):
    """The advertised range's ends quantize to finite blocks that decode near them."""
    mod = MODULES[fmt]
    low, high = _ends(mod)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    x[0, 5], x[1, 6] = high, low
    x[2] = high
    x[3] = low
    w = mod.dequantize(mod.quantize(x))
    assert torch.isfinite(w).all()
    assert abs(w[0, 5].item() / high - 1) < 0.01 and abs(w[1, 6].item() / low - 1) < 0.01
    assert ((w[2] / high - 1).abs() < 0.01).all() and ((w[3] / low - 1).abs() < 0.01).all()
