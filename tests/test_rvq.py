"""rvq_encode / rvq_decode on every backend against a float64 brute force.

Shapes stay small: on a machine without a GPU the Triton kernels run in the interpreter.
"""

import pytest
import torch
from conftest import BACKEND_CASES, DEVICES, forced, relative_error

from tinykern import backends, ops

# (N, K, D, L, shared codebook, data): N never a multiple of the tiles; K 1/7/1024, D 3/64/256
# (3 and 5 take the Triton broadcast path, the others tl.dot), L 1..8.
ENCODE_CASES = [
    (100, 7, 3, 3, False, "random"),
    (70, 1024, 64, 2, False, "clustered"),
    (33, 16, 256, 4, False, "random"),
    (65, 1, 5, 2, False, "random"),
    (130, 64, 32, 8, True, "clustered"),
    (50, 1024, 256, 1, False, "clustered"),
    (97, 40, 64, 5, True, "random"),
    (300, 1500, 24, 2, False, "clustered"),  # several row tiles and code tiles of the C++ kernel
]


def make_codebooks(gen, levels, k, d, shared):
    """Codebooks that shrink level by level, as trained residual codebooks do."""
    books = torch.randn(1 if shared else levels, k, d, generator=gen)
    books = books.expand(levels, k, d) if shared else books / 2.0 ** torch.arange(levels)[:, None, None]
    return books.contiguous()


def make_x(gen, codebooks, n, data):
    levels, k, d = codebooks.shape
    if data == "random":
        return torch.randn(n, d, generator=gen) * codebooks[0].std()
    # Sums of one codeword per level plus a little noise: the structure RVQ is meant for.
    picks = torch.randint(0, k, (n, levels), generator=gen)
    x = sum(codebooks[lvl, picks[:, lvl]] for lvl in range(levels))
    return x + 1e-3 * torch.randn(n, d, generator=gen)


def brute_force_check(x, codebooks, codes, quantized, tol=1e-5):
    """Walk the levels in float64, following the implementation's codes. Each code must be the
    nearest one, or at worst tol off the nearest relative to the size of the distance terms
    (||r||^2 + ||c||^2: the fp32 error of the ||c||^2 - 2 r.c form)."""
    r = x.double().cpu()
    books = codebooks.double().cpu()
    codes = codes.cpu()
    assert codes.dtype == torch.int64 and codes.shape == (x.shape[0], books.shape[0])
    for level in range(books.shape[0]):
        c = books[level]
        dist = r.square().sum(1, keepdim=True) - 2 * r @ c.T + c.square().sum(1)
        best = dist.min(1).values
        chosen = dist.gather(1, codes[:, level:level + 1])[:, 0]
        slack = tol * (r.square().sum(1) + c.square().sum(1).max())
        bad = (chosen - best > slack).nonzero()[:, 0]
        rows = bad[:5]
        assert bad.numel() == 0, (f"level {level}: rows {rows.tolist()} got codes {codes[rows, level].tolist()}, "
                                  f"nearest {dist[rows].argmin(1).tolist()}")
        r = r - c[codes[:, level]]
    expected = x.double().cpu() - r
    assert quantized.dtype == torch.float32 and quantized.shape == x.shape
    assert torch.allclose(quantized.double().cpu(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("n,k,d,levels,shared,data", ENCODE_CASES)
def test_rvq_encode(device, backend, n, k, d, levels, shared, data, gen):
    books = make_codebooks(gen, levels, k, d, shared)
    x = make_x(gen, books, n, data)
    with forced("rvq_encode", backend, device):
        codes, quantized = ops.rvq_encode(x.to(device), books.to(device))
    brute_force_check(x, books, codes, quantized)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rvq_encode_half_inputs(device, backend, dtype, gen):
    books = make_codebooks(gen, 3, 50, 64, False)
    x = make_x(gen, books, 77, "clustered").to(dtype)
    with forced("rvq_encode", backend, device):
        codes, quantized = ops.rvq_encode(x.to(device), books.to(device))
    # Distances in fp32 from the exact low-precision values: the same oracle applies.
    brute_force_check(x, books, codes, quantized)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("d", [3, 64])
def test_rvq_encode_ties_go_to_the_lowest_code(device, backend, d, gen):
    # Small integers make every product and sum exact in fp32, so equal distances are truly
    # equal; K = 2100 with d = 3 repeats each of the 125 vectors many times, across code tiles.
    books = torch.randint(-2, 3, (3, 2100, d), generator=gen).float()
    x = torch.randint(-2, 3, (90, d), generator=gen).float()
    with forced("rvq_encode", backend, device):
        codes, quantized = ops.rvq_encode(x.to(device), books.to(device))
    r = x.double()
    for level in range(3):
        dist = ((r[:, None, :] - books[level].double()) ** 2).sum(-1)
        assert torch.equal(codes[:, level].cpu(), dist.argmin(1))  # argmin: first minimum
        r = r - books[level].double()[codes[:, level].cpu()]
    assert torch.equal(quantized.cpu(), (x.double() - r).float())


def test_rvq_encode_torch_chunks_rows(monkeypatch, gen):
    from tinykern.kernels.torch import rvq as torch_rvq

    books = make_codebooks(gen, 3, 100, 16, False)
    x = make_x(gen, books, 95, "random")
    whole = torch_rvq.rvq_encode(x, books)
    # 10 rows of 100 fp32 distances per chunk: 10 chunks, the last one short.
    monkeypatch.setattr(torch_rvq, "CHUNK_BYTES", 10 * 100 * 4)
    chunked = torch_rvq.rvq_encode(x, books)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def reference_decode(codes, codebooks):
    """Gather-sum of the first L' levels in float64 and, in the kernels' order, in fp32."""
    exact = torch.zeros(codes.shape[0], codebooks.shape[2], dtype=torch.float64)
    ordered = torch.zeros(codes.shape[0], codebooks.shape[2], dtype=torch.float32)
    for level in range(codes.shape[1]):
        c = codes[:, level].long()
        keep = (c >= 0)[:, None]
        picked = codebooks[level][c.clamp(min=0)]
        exact += torch.where(keep, picked.double(), 0.0)
        ordered += torch.where(keep, picked.float(), 0.0)
    return exact, ordered


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("n,k,d,levels,used,code_dtype", [
    (100, 7, 3, 3, 3, torch.int64),
    (70, 1024, 64, 8, 5, torch.int32),
    (33, 16, 256, 4, 1, torch.int64),
    (9, 1, 130, 2, 2, torch.int32),
])
def test_rvq_decode(device, backend, n, k, d, levels, used, code_dtype, gen):
    books = make_codebooks(gen, levels, k, d, False)
    codes = torch.randint(0, k, (n, used), generator=gen)
    # Dropped levels: -1 in random places and a whole trailing dropped block.
    codes[torch.rand(n, used, generator=gen) < 0.2] = -1
    codes[: n // 4, used // 2:] = -1
    codes = codes.to(code_dtype)
    with forced("rvq_decode", backend, device):
        out = ops.rvq_decode(codes.to(device), books.to(device))
    exact, ordered = reference_decode(codes, books)
    assert out.dtype == torch.float32 and out.shape == (n, d)
    if backend in ("torch", "triton"):
        # Both add the levels in order into an fp32 zero.
        assert torch.equal(out.cpu(), ordered)
    assert relative_error(out, exact) < 1e-6


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("bad", [16, -2])
def test_rvq_decode_refuses_or_poisons_a_code_out_of_range(device, backend, bad, gen):
    if backend == "cuda":
        pytest.skip("the cuda kernel device-asserts, which would end this process's CUDA context")
    books = make_codebooks(gen, 2, 16, 8, False)
    codes = torch.randint(0, 16, (5, 2), generator=gen)
    codes[3, 1] = bad
    with forced("rvq_decode", backend, device):
        if backend == "triton":  # no host sync in the kernel: the row is NaN instead
            out = ops.rvq_decode(codes.to(device), books.to(device)).cpu()
            assert out[3].isnan().all() and not out[[0, 1, 2, 4]].isnan().any()
            good = codes[[0, 1, 2, 4]]
            assert torch.equal(out[[0, 1, 2, 4]], reference_decode(good, books)[1])
        else:
            with pytest.raises((ValueError, RuntimeError), match=rf"code {bad} at \[3, 1\] is out of range"):
                ops.rvq_decode(codes.to(device), books.to(device))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rvq_decode_half_codebooks(device, backend, dtype, gen):
    books = make_codebooks(gen, 4, 32, 64, False).to(dtype)
    codes = torch.randint(-1, 32, (45, 4), generator=gen)
    with forced("rvq_decode", backend, device):
        out = ops.rvq_decode(codes.to(device), books.to(device))
    exact, _ = reference_decode(codes, books)
    assert out.dtype == dtype and out.shape == (45, 64)
    # One rounding of an fp32 sum to dtype (the interpreter truncates instead of rounding).
    eps = torch.finfo(dtype).eps
    assert torch.allclose(out.cpu().double(), exact, rtol=2 * eps, atol=2 * eps * exact.abs().max().item())


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_rvq_decode_of_encode_is_quantized(device, backend, gen):
    books = make_codebooks(gen, 4, 64, 32, False)
    x = make_x(gen, books, 75, "clustered")
    with forced("rvq_encode", backend, device), forced("rvq_decode", backend, device):
        codes, quantized = ops.rvq_encode(x.to(device), books.to(device))
        # Partial decodes: each added level brings the reconstruction closer to x.
        errors = [relative_error(ops.rvq_decode(codes[:, :lvl], books.to(device)), x) for lvl in range(1, 5)]
        full = ops.rvq_decode(codes, books.to(device))
    assert torch.allclose(full, quantized, atol=1e-5)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("device", DEVICES)
def test_rvq_triton_opcheck(device, gen):
    reason = backends.unavailable_reason("triton", device, "rvq_encode")
    if reason is not None:
        pytest.skip(reason)
    from tinykern.kernels.triton import rvq as triton_rvq  # noqa: F401  (registers the ops)

    books = make_codebooks(gen, 3, 20, 24, False).to(device)
    x = make_x(gen, books.cpu(), 40, "random").to(device)
    codes = torch.randint(-1, 20, (40, 2), generator=gen).to(device)
    torch.library.opcheck(torch.ops.tinykern.rvq_encode_triton.default, (x, books))
    torch.library.opcheck(torch.ops.tinykern.rvq_encode_triton.default, (x.half(), books))
    torch.library.opcheck(torch.ops.tinykern.rvq_decode_triton.default, (codes, books))


@pytest.mark.parametrize("device", DEVICES)
def test_rvq_encode_triton_rejects_large_dim(device, gen):
    reason = backends.unavailable_reason("triton", device, "rvq_encode")
    if reason is not None:
        pytest.skip(reason)
    books = torch.randn(1, 4, 600, generator=gen).to(device)
    with backends.backend("triton"), pytest.raises(ValueError, match=r"\[5, 600\].*D <= 512"):
        ops.rvq_encode(torch.randn(5, 600, generator=gen).to(device), books)


def test_rvq_ops_refuse_codebooks_without_codes(gen):
    x = torch.randn(5, 8, generator=gen)
    with pytest.raises(ValueError, match=r"rvq_encode: codebooks \[2, 0, 8\] hold no codes \(K = 0\)"):
        ops.rvq_encode(x, torch.empty(2, 0, 8))
    with pytest.raises(ValueError, match=r"rvq_decode: codebooks \[2, 0, 8\] hold no codes"):
        ops.rvq_decode(torch.full((5, 2), -1), torch.empty(2, 0, 8))
