"""The generic Triton block kernels (tinykern/kernels/triton/block_matmul.py, decode.py) for
every format in DECODERS: dequantize bit-identical to gguf-py, matmul against
x @ dequant(w).T in float64 in both regimes, the tuned Q4_K and Q8_0 kernels matched, and the
registry entries.

Weights are random bytes with finite fp16 scale fields (every bit pattern of the codes is a
valid block), so no quantizer is needed. Shapes stay tiny: without a GPU the kernels run in
the interpreter.
"""

import pytest
import torch
from conftest import DEVICES, forced, relative_error

from tinykern import backends

gguf = pytest.importorskip("gguf")
triton_blocks = pytest.importorskip("tinykern.kernels.triton.block_matmul")
from tinykern.kernels.triton.decode import DECODERS  # noqa: E402

NAMES = list(DECODERS)
# Byte offsets of each format's fp16 fields (d, and m / dmin where it has one) in its block.
HALVES = {"q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,), "q2_k": (80, 82),
          "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}
# fp32 x: the skinny kernel sums fp32 products (error ~1e-7 here); the wide one goes through
# tl.dot (3xTF32 on a GPU), held to the bound of the tuned kernels' tests.
SKINNY_TOL = 1e-5
WIDE_TOL = 1e-3


def random_blocks(gen, name, shape, poison_from=None):
    """uint8 [*shape, nb*block_bytes] of random blocks whose fp16 fields are moderate finite
    values; blocks from index poison_from on get NaN fields (padding no kernel may read)."""
    dec = DECODERS[name]
    *lead, nb = shape
    raw = torch.randint(0, 256, (*lead, nb, dec.block_bytes), generator=gen, dtype=torch.uint8)
    for o in HALVES[name]:
        raw[..., o:o + 2] = (0.05 * torch.randn(*lead, nb, 1, generator=gen)).half().view(torch.uint8)
        if poison_from is not None:
            raw[..., poison_from:, o:o + 2] = torch.tensor([float("nan")]).half().view(torch.uint8)
    return raw.reshape(*lead, nb * dec.block_bytes)


def gguf_dequantize(name, blocks):
    dec = DECODERS[name]
    return torch.from_numpy(gguf.quants.dequantize(blocks.cpu().numpy(), gguf.GGMLQuantizationType(dec.ggml_type)))


def triton_device(device):
    """Skip unless Triton runs on `device` here (the interpreter on CPU)."""
    reason = backends.unavailable_reason("triton", torch.device(device).type)
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every torch.empty comes back full of NaN (or 0x5A bytes): an output element a kernel
    leaves unwritten shows up."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(0x5A)

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_bit_identical_to_gguf(device, name, gen, poisoned_outputs):
    triton_device(device)
    blocks = random_blocks(gen, name, (3, 2))
    expected = gguf_dequantize(name, blocks)
    got = triton_blocks.block_dequantize_triton(name, blocks.to(device), torch.float32).cpu()
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    # Lower precisions: the fp32 values rounded once.
    for dtype in (torch.float16, torch.bfloat16):
        low = triton_blocks.block_dequantize_triton(name, blocks.to(device), dtype).cpu()
        assert low.dtype == dtype and torch.equal(low, expected.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_leading_dims_and_empty(device, gen):
    triton_device(device)
    blocks = random_blocks(gen, "q5_1", (2, 3, 1))
    got = triton_blocks.block_dequantize_triton("q5_1", blocks.to(device), torch.float32).cpu()
    assert torch.equal(got, gguf_dequantize("q5_1", blocks))
    empty = triton_blocks.block_dequantize_triton("q3_k", torch.empty(0, 110, dtype=torch.uint8, device=device))
    assert empty.shape == (0, 256)


def reference(x, dense, bias):
    y = x.double().cpu() @ dense.double().T
    return y if bias is None else y + bias.double().cpu()


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("device", DEVICES)
def test_matmul_matches_float64(device, name, M, has_bias, gen, poisoned_outputs):
    """K = 2 blocks - 5 (a partial last block), N odd; a third block of NaN scales pads each
    row and x rows are followed by NaN: any read past K poisons the output."""
    triton_device(device)
    block = DECODERS[name].block
    K, N = 2 * block - 5, 33 if M == 3 else 7
    w = random_blocks(gen, name, (N, 3), poison_from=2)
    dense = gguf_dequantize(name, w)[:, :K]
    x = torch.randn(M, K, generator=gen)
    buf = torch.full((M, K + block), float("nan"))
    buf[:, :K] = x
    bias = torch.randn(N, generator=gen) if has_bias else None
    y = triton_blocks.block_matmul_triton(name, buf.to(device)[:, :K], w.to(device),
                                          None if bias is None else bias.to(device))
    assert y.shape == (M, N) and y.dtype == torch.float32 and y.device.type == device
    assert relative_error(y, reference(x, dense, bias)) < (SKINNY_TOL if M <= 16 else WIDE_TOL)


@pytest.mark.parametrize("M", [1, 17])
@pytest.mark.parametrize("name", [n for n in NAMES if DECODERS[n].block == 32])
@pytest.mark.parametrize("device", DEVICES)
def test_reads_no_weight_past_k(device, name, M, gen):
    """K inside the first of three blocks, the next two with NaN scales: a K step that
    reached past the block holding K (or an unmasked one) would poison the output."""
    triton_device(device)
    K, N = 27, 5
    w = random_blocks(gen, name, (N, 3), poison_from=1)
    x = torch.randn(M, K, generator=gen)
    y = triton_blocks.block_matmul_triton(name, x.to(device), w.to(device), None)
    dense = gguf_dequantize(name, w)[:, :K]
    assert relative_error(y, reference(x, dense, None)) < (SKINNY_TOL if M <= 16 else WIDE_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [3, 17])
@pytest.mark.parametrize("name", ["q5_0", "q3_k"])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_within_twice_torch_error(device, name, M, dtype, gen):
    triton_device(device)
    K, N = 2 * DECODERS[name].block - 5, 9
    w = random_blocks(gen, name, (N, 2))
    dense = gguf_dequantize(name, w)[:, :K]
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen)
    expected = reference(x, dense, bias)
    torch_error = relative_error(x @ dense.to(dtype).T + bias.to(dtype), expected)
    y = triton_blocks.block_matmul_triton(name, x.to(device), w.to(device), bias.to(device))
    assert y.dtype == dtype
    assert relative_error(y, expected) <= 2 * torch_error + 1e-5


@pytest.mark.parametrize("M", [3, 17])
@pytest.mark.parametrize("name", ["q4_k", "q8_0"])
@pytest.mark.parametrize("device", DEVICES)
def test_generic_matches_tuned_kernels(device, name, M, gen):
    """The generic kernels agree with the tuned ones, so the tuned formats could switch."""
    triton_device(device)
    from tinykern.kernels.triton import q4k_matmul, q8_0_matmul

    tuned = {"q4_k": q4k_matmul.q4k_matmul_triton, "q8_0": q8_0_matmul.q8_0_matmul_triton}[name]
    K, N = 2 * DECODERS[name].block - 5, 11
    w = random_blocks(gen, name, (N, 2)).to(device)
    x = torch.randn(M, K, generator=gen).to(device)
    bias = torch.randn(N, generator=gen).to(device)
    expected = tuned(x, w, bias)
    got = triton_blocks.block_matmul_triton(name, x, w, bias)
    assert relative_error(got, expected) < (SKINNY_TOL if M <= 16 else WIDE_TOL)


class LaunchCounter:
    """Stands in for a @triton.jit kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("M,regime", [(16, "skinny"), (17, "wide")])
@pytest.mark.parametrize("device", DEVICES)
def test_regime_by_rows(device, M, regime, gen, monkeypatch):
    triton_device(device)
    counters = {r: LaunchCounter(getattr(triton_blocks, f"_{r}_kernel")) for r in ("skinny", "wide")}
    for r, counter in counters.items():
        monkeypatch.setattr(triton_blocks, f"_{r}_kernel", counter)
    w = random_blocks(gen, "q4_1", (5, 1))
    x = torch.randn(M, 32, generator=gen)
    y = triton_blocks.block_matmul_triton("q4_1", x.to(device), w.to(device))
    assert {r: c.launches for r, c in counters.items()} == {r: int(r == regime) for r in counters}
    assert relative_error(y, reference(x, gguf_dequantize("q4_1", w), None)) < WIDE_TOL


@pytest.mark.parametrize("name", [n for n in NAMES if n not in triton_blocks.TUNED])
@pytest.mark.parametrize("device", DEVICES)
def test_registered_for_untuned_formats(device, name, gen):
    """Registered under the format's op names; through tinykern.ops for the formats that
    tinykern.formats has records of."""
    triton_device(device)
    for kind in ("matmul", "dequantize"):
        assert backends.unavailable_reason("triton", torch.device(device).type, triton_blocks.op_name(name, kind)) is None
    from tinykern import formats, ops

    if name not in formats.FORMATS:
        return
    w = random_blocks(gen, name, (3, 1)).to(device)
    x = torch.randn(2, DECODERS[name].block - 1, generator=gen).to(device)
    with forced(formats.FORMATS[name].op("matmul"), "triton", device):
        y = ops.matmul(x, w, name)
        dense = ops.dequantize(w, name)
    assert torch.equal(dense.cpu(), gguf_dequantize(name, w))
    assert relative_error(y, reference(x.cpu(), dense[:, : x.shape[1]].cpu(), None)) < SKINNY_TOL


def test_tuned_formats_keep_their_kernels():
    from tinykern.kernels.triton import q4k_matmul, q8_0_matmul

    backends.preload("triton", ("cpu",))
    assert backends._IMPLS[("q4k_matmul", "triton")] is q4k_matmul.q4k_matmul_triton
    assert backends._IMPLS[("q8_0_matmul", "triton")] is q8_0_matmul.q8_0_matmul_triton


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, gen):
    triton_device(device)
    w = random_blocks(gen, "q6_k", (5, 1)).to(device)
    x = torch.randn(2, 200, generator=gen).to(device)
    bias = torch.randn(5, generator=gen).to(device)
    torch.library.opcheck(triton_blocks._matmul_op, ("q6_k", x, w, bias))
    torch.library.opcheck(triton_blocks._dequantize_op, ("q6_k", w, torch.float16))


def test_unknown_format_refused():
    with pytest.raises(ValueError, match="no Triton decoder"):
        triton_blocks.block_matmul_triton("iq2_xxs", torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.uint8))


def test_decoders_match_gguf_geometry():
    for name, dec in DECODERS.items():
        t = gguf.GGMLQuantizationType(dec.ggml_type)
        assert t.name.lower() == name
        assert gguf.constants.GGML_QUANT_SIZES[t] == (dec.block, dec.block_bytes)
