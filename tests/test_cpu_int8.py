"""The CPU int8 path of q4k_matmul and q8_0_matmul (exact=False, fewer than kInt8MaxRows = 128
rows of x): x rounded to int8 per block (256 values for Q4_K as ggml's Q8_K, 32 for Q8_0), the
weight codes multiplied with integer instructions.

Its error against float64 is that of the rounded activations, so it is held to ggml's own error
on the same data, computed here by rounding x the way ggml's quantizers do (scale max|x| / 127,
codes rounded half to even) and multiplying in float64. Measured on N(0, 1) x and weights
(K 4096, N 4096, M 1..16): Q4_K 6.9e-3 on every SIMD path (ggml's Q8_K: the same rounding, so
the same 6.9e-3), Q8_0 5.4e-3 (ggml's Q8_0 activations, whose fp16 scale adds a little, about
the same). exact=True keeps the fp32 kernels (error ~3e-7).
"""

import pytest
import torch
from conftest import relative_error

from tinykern import _ext, backends, ops
from tinykern.formats import q4k, q8_0

_FORMATS = {"q4k": (q4k, 256), "q8_0": (q8_0, 32)}
SIMD = ["best", "avx512", "avx2", "scalar"]
SCALAR_INT8_MAX_ROWS = 14  # kTileMinRows: without SIMD the int8 path stops where the BLAS tiles start


def make_case(gen, fmt, m, k, n):
    module, _ = _FORMATS[fmt]
    kp = -(-k // module.BLOCK) * module.BLOCK
    w = module.quantize(torch.randn(n, kp, generator=gen))
    return torch.randn(m, k, generator=gen), w, module.dequantize(w, torch.float64)[:, :k]


def ggml_rounded(x, block, fp16_scale):
    """x as ggml's activation quantizer leaves it, in float64: per block of `block` values
    (zero-padded), codes round(x * 127 / max|x|) and scale max|x| / 127 (fp16 for Q8_0)."""
    m, k = x.shape
    kp = -(-k // block) * block
    xp = torch.nn.functional.pad(x.float(), (0, kp - k)).view(m, kp // block, block)
    amax = xp.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    codes = torch.round(xp * inv)
    d = amax / 127.0
    if fp16_scale:
        d = d.half().float()
    return (codes.double() * d.double()).view(m, kp)[:, :k]


def ggml_error(fmt, x, dense, bias=None):
    """ggml's own relative error on this data: x rounded by its activation quantizer for `fmt`
    ("q4k" or "q8_0"), the rest in float64; the bound of the int8 path (with 5% of slack)."""
    _, block = _FORMATS[fmt]
    ref = x.double().cpu() @ dense.T
    got = ggml_rounded(x.cpu(), block, fmt == "q8_0") @ dense.T
    if bias is not None:
        ref, got = ref + bias.double().cpu(), got + bias.double().cpu()
    return relative_error(got, ref)


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("fmt", list(_FORMATS))
@pytest.mark.parametrize("m", [1, 3, 4, 13, 16])
def test_error_within_ggml_own(simd, fmt, m, monkeypatch, gen):
    """Against float64: within ggml's own error on the same data (its activation rounding in
    float64), for K not a multiple of the block and M around the four-row groups."""
    if simd != "best":
        monkeypatch.setenv("TINYKERN_CPU_SIMD", simd)
    _, block = _FORMATS[fmt]
    op = getattr(torch.ops.tinykern, f"{fmt}_matmul")
    for k, n in ((1001, 37), (300, 64)):
        x, w, dense = make_case(gen, fmt, m, k, n)
        bias = torch.randn(n, generator=gen)
        ref = x.double() @ dense.T + bias.double()
        ggml_err = relative_error(ggml_rounded(x, block, fmt == "q8_0") @ dense.T + bias.double(), ref)
        fast = op(x, w, bias, False)
        exact = op(x, w, bias, True)
        assert fast.shape == (m, n) and fast.dtype == torch.float32
        assert relative_error(exact, ref) < 1e-5
        if simd == "scalar" and m >= SCALAR_INT8_MAX_ROWS:
            assert torch.equal(fast, exact)  # the scalar int8 code only pays below the BLAS tiles
            continue
        err = relative_error(fast, ref)
        assert err <= 1.05 * ggml_err + 1e-6, (k, err, ggml_err)
        assert err > 1e-5  # the int8 path ran (fp32 would be ~3e-7)


@pytest.mark.parametrize("fmt", list(_FORMATS))
def test_simd_paths_agree(fmt, monkeypatch, gen):
    """The integer sums are exact on every path; only the fp32 accumulation order differs."""
    x, w, _ = make_case(gen, fmt, 5, 1001, 41)  # 5 rows: a group of four and a single one
    op = getattr(torch.ops.tinykern, f"{fmt}_matmul")
    outs = {}
    for simd in SIMD:
        monkeypatch.setenv("TINYKERN_CPU_SIMD", simd)
        outs[simd] = op(x, w, None, False)
    for simd in SIMD[1:]:
        assert relative_error(outs[simd], outs["best"].double()) < 1e-5, simd


@pytest.mark.parametrize("fmt", list(_FORMATS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(fmt, dtype, gen):
    x, w, dense = make_case(gen, fmt, 4, 512, 33)
    x = x.to(dtype)
    op = getattr(torch.ops.tinykern, f"{fmt}_matmul")
    y = op(x, w, None, False)
    assert y.dtype == dtype
    _, block = _FORMATS[fmt]
    ggml_err = relative_error(ggml_rounded(x, block, fmt == "q8_0") @ dense.T, x.double() @ dense.T)
    # The output's rounding to 16 bits adds its own error.
    assert relative_error(y, x.double() @ dense.T) < ggml_err + 4e-3


@pytest.mark.parametrize("fmt", list(_FORMATS))
def test_routes(fmt, gen):
    """ops.* on the cpu backend take the int8 path by default and the fp32 kernels under
    backend('cpu', exact=True); from 128 rows the int8 path is off."""
    x, w, _ = make_case(gen, fmt, 3, 512, 33)
    op = getattr(ops, f"{fmt}_matmul")
    raw = getattr(torch.ops.tinykern, f"{fmt}_matmul")
    with backends.backend("cpu"):
        assert torch.equal(op(x, w), raw(x, w, None, False))
    with backends.backend("cpu", exact=True):
        assert torch.equal(op(x, w), raw(x, w, None, True))
    assert not torch.equal(raw(x, w, None, False), raw(x, w, None, True))
    if not _ext.runtime_info()["bf16_gemm"]:  # from 256 rows bf16 hardware would take bf16
        wide = torch.randn(128, 512, generator=gen)
        assert torch.equal(raw(wide, w, None, False), raw(wide, w, None, True))


@pytest.mark.parametrize("fmt", list(_FORMATS))
def test_zero_and_empty_rows(fmt, gen):
    x, w, _ = make_case(gen, fmt, 4, 300, 9)
    x[2] = 0
    op = getattr(torch.ops.tinykern, f"{fmt}_matmul")
    y = op(x, w, None, False)
    assert bool((y[2] == 0).all()) and bool(torch.isfinite(y).all())
    assert op(x[:0], w, None, False).shape == (0, 9)


@pytest.mark.parametrize("fmt", list(_FORMATS))
def test_same_bits_on_any_thread_count(fmt, gen):
    """Each output is one kernel call's sum whatever the tiling, so threads change no bits."""
    op = getattr(torch.ops.tinykern, f"{fmt}_matmul")
    threads = torch.get_num_threads()
    try:
        for m in (1, 5, 77):
            x, w, _ = make_case(gen, fmt, m, 1000, 300)
            torch.set_num_threads(1)
            one = op(x, w, None, False)
            torch.set_num_threads(2)
            assert torch.equal(op(x, w, None, False), one), m
    finally:
        torch.set_num_threads(threads)
