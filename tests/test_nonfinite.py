"""Non-finite input on every backend: the rules stated in tinykern.ops (the module docstring
for the matmuls, rvq_encode's docstring)."""

import pytest
import torch
from conftest import BACKEND_CASES, forced

from tinykern import ops
from tinykern.formats import q4k, q8_0

NAN, INF = float("nan"), float("inf")
# The Triton interpreter (numpy) warns on every NaN it makes: here they are the point.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def encode(backend, device, x, books):
    with forced("rvq_encode", backend, device):
        codes, quantized = ops.rvq_encode(x.to(device), books.to(device))
    return codes.cpu(), quantized.cpu()


@pytest.mark.parametrize("d", [5, 16])  # Triton's broadcast path and its tl.dot path
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_rvq_encode_never_chooses_a_nan_codeword(device, backend, d, gen):
    books = torch.randn(3, 40, d, generator=gen) / 2.0 ** torch.arange(3)[:, None, None]
    x = torch.randn(60, d, generator=gen)
    poisoned, far = books.clone(), books.clone()
    poisoned[:, 7, 1] = NAN
    far[:, 7] = 1e6  # the same codeword moved where it never wins: what NaN must amount to
    codes, quantized = encode(backend, device, x, poisoned)
    expected, _ = encode(backend, device, x, far)
    assert (expected[:, 0] == 7).sum() == 0 and (codes != 7).all()
    assert torch.equal(codes, expected)
    # quantized is the sum of the chosen codewords, as rvq_decode adds them.
    assert torch.equal(quantized, ops.rvq_decode(codes, poisoned))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_rvq_encode_rows_of_x_with_nan_or_inf(device, backend, gen):
    books = torch.randn(2, 40, 16, generator=gen) / 2.0 ** torch.arange(2)[:, None, None]
    clean = torch.randn(30, 16, generator=gen)
    x = clean.clone()
    x[3, 5] = x[20, 0] = NAN
    x[8, 2], x[9, 11] = INF, -INF
    codes, quantized = encode(backend, device, x, books)
    clean_codes, clean_quantized = encode(backend, device, clean, books)
    assert (codes[[3, 20]] == 0).all()  # no distance below +Inf at any level: code 0
    ok = torch.ones(30, dtype=torch.bool)
    ok[[3, 8, 9, 20]] = False
    assert torch.equal(codes[ok], clean_codes[ok]) and torch.equal(quantized[ok], clean_quantized[ok])
    # Every backend agrees with the reference on the Inf rows too, and quantized stays finite.
    assert torch.equal(codes, encode("torch", "cpu", x, books)[0])
    assert torch.equal(quantized, ops.rvq_decode(codes, books)) and torch.isfinite(quantized).all()


@pytest.mark.parametrize("fmt,op", [(q4k, ops.q4k_matmul), (q8_0, ops.q8_0_matmul)], ids=["q4_k", "q8_0"])
@pytest.mark.parametrize("M", [4, 20])  # below and above the cpu (14) and triton (16) row thresholds
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_matmul_non_finite_x_stays_in_its_rows(device, backend, M, fmt, op, gen):
    w = fmt.quantize(torch.randn(9, -(-320 // fmt.BLOCK) * fmt.BLOCK, generator=gen)).to(device)
    bias = torch.randn(9, generator=gen).to(device)
    clean = torch.randn(M, 320, generator=gen)
    x = clean.clone()
    x[1, 5], x[2, 100], x[M - 1, 0] = INF, -INF, NAN
    with forced(op.__name__, backend, device):
        y = op(x.to(device), w, bias).cpu()
        y_clean = op(clean.to(device), w, bias).cpu()
    bad = torch.zeros(M, dtype=torch.bool)
    bad[[1, 2, M - 1]] = True
    assert not torch.isfinite(y[bad]).any(), y[bad]
    assert torch.equal(y[~bad], y_clean[~bad]) and torch.isfinite(y_clean).all()
