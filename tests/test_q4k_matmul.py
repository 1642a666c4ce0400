"""q4k_matmul on every backend against x @ dequant(w).T in float64 (kernel error only, not
quantization error), plus the Triton op's own checks: opcheck, torch.compile, both regimes,
masks at K.

Shapes stay small: on a machine without a GPU the Triton kernels run in the interpreter.
"""

import pytest
import torch
from conftest import BACKEND_CASES, DEVICES, forced, relative_error
from test_cpu_int8 import ggml_error

from tinykern import ops
from tinykern.formats import q4k

# (M, K, N, bias): M covers both Triton regimes (skinny <= 16 < wide); K 256, 512, 2880
# (padded to 3072) and 320 (padded to 512); N never a multiple of a tile.
CASES = [
    (1, 256, 7, True),
    (1, 2880, 96, True),
    (3, 512, 33, False),
    (3, 320, 7, True),
    (17, 320, 96, True),
    (17, 2880, 33, True),
    (64, 512, 33, True),
    (64, 320, 7, False),
    (257, 320, 33, True),  # the CPU's bf16 path (from 256 rows) on bf16 hardware
]
# Relative Frobenius error of ggml's Q4_K mul_mat (activations quantized to 8 bits) against
# float64 on random data: the most the default (not exact) CPU path may show from 256 rows.
FAST_BOUND = 7e-3


def fast_bound(backend, x, dense, bias=None):
    """The default (not exact) bound: on the cpu backend below 128 rows x goes to int8 as ggml
    rounds its activations (tests/test_cpu_int8.py), held to ggml's own error on the same data
    (which on small shapes can pass FAST_BOUND); FAST_BOUND otherwise."""
    if backend == "cpu" and x.reshape(-1, x.shape[-1]).shape[0] < 128:
        return max(FAST_BOUND, 1.05 * ggml_error("q4k", x.reshape(-1, x.shape[-1]), dense, bias) + 1e-6)
    return FAST_BOUND
LOW_PRECISION_CASES = [(3, 320, 33), (64, 512, 33)]


def make_weight(gen, n, k):
    """Q4_K rows for k features (row padding holds random weights too: they must not count)."""
    padded = -(-k // q4k.BLOCK) * q4k.BLOCK
    w = q4k.quantize(torch.randn(n, padded, generator=gen))
    return w, q4k.dequantize(w, torch.float64)[:, :k]


def reference(x, dense, bias):
    y = x.double().cpu() @ dense.T
    return y if bias is None else y + bias.double().cpu()


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("M,K,N,has_bias", CASES)
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_fp32_matches_dequantized_matmul(device, backend, M, K, N, has_bias, exact, gen):
    """exact: every backend within 1e-3. fast (the default): the CPU kernels round x to int8
    below 128 rows and may round to bf16 from 256 rows on bf16 hardware, and must stay within ggml's own
    error with 8-bit activations (fast_bound)."""
    w, dense = make_weight(gen, N, K)
    x = torch.randn(M, K, generator=gen)
    bias = torch.randn(N, generator=gen) if has_bias else None
    y = torch.full((M, N), float("nan"))
    with forced("q4k_matmul", backend, device, exact=exact):
        y = ops.q4k_matmul(x.to(device), w.to(device), None if bias is None else bias.to(device))
    assert y.shape == (M, N) and y.dtype == torch.float32 and y.device.type == device
    assert relative_error(y, reference(x, dense, bias)) < (1e-3 if exact else fast_bound(backend, x, dense, bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,N", LOW_PRECISION_CASES)
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_low_precision_within_twice_torch_error(device, backend, M, K, N, dtype, gen):
    w, dense = make_weight(gen, N, K)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen)
    expected = reference(x, dense, bias)
    x, bias = x.to(device), bias.to(device)
    torch_error = relative_error(x @ dense.to(device, dtype).T + bias.to(dtype), expected)
    with forced("q4k_matmul", backend, device):
        y = ops.q4k_matmul(x, w.to(device), bias)
    assert y.dtype == dtype
    # The cpu backend's int8 path (below 128 rows) adds ggml's activation rounding on top.
    int8 = ggml_error("q4k", x.float().cpu(), dense) if backend == "cpu" and M < 128 else 0.0
    assert relative_error(y, expected) <= 2 * torch_error + int8 + 1e-5


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_leading_dims(device, backend, gen):
    w, dense = make_weight(gen, 9, 256)
    x = torch.randn(2, 3, 256, generator=gen)
    with forced("q4k_matmul", backend, device):
        y = ops.q4k_matmul(x.to(device), w.to(device))
    assert y.shape == (2, 3, 9)
    bound = fast_bound(backend, x, dense) if backend == "cpu" else 1e-3
    assert relative_error(y.reshape(6, 9), reference(x.reshape(6, 256), dense, None)) < bound


def triton_module(device):
    """The Triton kernel module, or a skip when Triton cannot run on `device` here."""
    with forced("q4k_matmul", "triton", device):
        from tinykern.kernels.triton import q4k_matmul
    return q4k_matmul


@pytest.mark.parametrize("M,has_bias", [(2, True), (20, False)])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, M, has_bias, gen):
    mod = triton_module(device)
    w, _ = make_weight(gen, 5, 300)
    x = torch.randn(M, 300, generator=gen)
    bias = torch.randn(5, generator=gen).to(device) if has_bias else None
    torch.library.opcheck(mod.q4k_matmul_triton, (x.to(device), w.to(device), bias))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_matches_eager(device, gen):
    triton_module(device)
    w, _ = make_weight(gen, 6, 256)
    w = w.to(device)
    x = torch.randn(2, 256, generator=gen).to(device)
    bias = torch.randn(6, generator=gen).to(device)
    with forced("q4k_matmul", "triton", device):
        eager = ops.q4k_matmul(x, w, bias)
        compiled = torch.compile(ops.q4k_matmul, fullgraph=True)(x, w, bias)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


class LaunchCounter:
    """Stands in for a @triton.jit kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("M,regime", [(1, "skinny"), (16, "skinny"), (17, "wide"), (64, "wide")])
@pytest.mark.parametrize("device", DEVICES)
def test_regime_by_rows(device, M, regime, gen, monkeypatch):
    mod = triton_module(device)
    counters = {name: LaunchCounter(getattr(mod, f"_{name}_kernel")) for name in ("skinny", "wide")}
    for name, counter in counters.items():
        monkeypatch.setattr(mod, f"_{name}_kernel", counter)
    w, dense = make_weight(gen, 10, 256)
    x = torch.randn(M, 256, generator=gen)
    with forced("q4k_matmul", "triton", device):
        y = ops.q4k_matmul(x.to(device), w.to(device))
    assert {name: c.launches for name, c in counters.items()} == {n: int(n == regime) for n in counters}
    assert relative_error(y, reference(x, dense, None)) < 1e-3


@pytest.mark.parametrize("M", [3, 20])
@pytest.mark.parametrize("device", DEVICES)
def test_reads_no_x_past_k(device, M, gen):
    """x as a view whose rows are followed by NaN: any load past K would poison the output."""
    mod = triton_module(device)
    K = 300
    w, dense = make_weight(gen, 11, K)
    x = torch.randn(M, K, generator=gen)
    buf = torch.full((M, K + 256), float("nan"))
    buf[:, :K] = x
    y = mod.q4k_matmul_triton(buf.to(device)[:, :K], w.to(device), None)
    assert relative_error(y, reference(x, dense, None)) < 1e-3
