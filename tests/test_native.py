"""The kernels of tinykern._C (the "cpu" and "cuda" backends), called through torch.ops.tinykern.

- dequantize: bit-exact with tinykern.formats, on quantized data and on random bytes;
- matmul: against x.double() @ dequant(w).double().T, fp32 relative error < FP32_BOUND, fp16/bf16
  within 2x of torch's own half-precision matmul error against the same reference;
- rvq_encode: against a float64 brute force, rvq_decode: bit-exact with the torch reference;
- opcheck on every op, and the errors for bad shapes, dtypes and devices.

The CPU cases run once per SIMD path (TINYKERN_CPU_SIMD caps it), CUDA cases only with a GPU.
"""

import pytest
import torch
from conftest import DEVICES, forced, relative_error

from tinykern import _ext, backends, ops
from tinykern.formats import FORMATS, q4k, q8_0
from tinykern.kernels import native  # noqa: F401  (registers the fake kernels)
from tinykern.kernels.torch import rvq as rvq_reference

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"tinykern._C is not built ({_ext.ERROR})")

FP32_BOUND = 1e-5
_FORMATS = {"q4k": q4k, "q8_0": q8_0}
# Feature counts per format: whole blocks, padded rows (320 and 2880 are SD1.5 row lengths), and
# for q4k one that is not a multiple of 4 (the CUDA GEMV then pads x).
K_VALUES = {"q4k": (256, 320, 1001, 2880, 4096), "q8_0": (256, 300, 2890, 4096)}
PATHS = [pytest.param(("cpu", simd), id=f"cpu-{simd}") for simd in ("best", "avx2", "scalar")]
PATHS += [pytest.param(("cuda", None), id="cuda")] if "cuda" in DEVICES else []
WITH_PATH = pytest.mark.parametrize("path", PATHS, indirect=True)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a small shared machine a parallel region waits for every core.
    test_threads_agree checks that more threads give the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def path(request, monkeypatch):
    """(device) with the CPU SIMD path capped as the param says."""
    device, simd = request.param
    if simd not in (None, "best"):
        monkeypatch.setenv("TINYKERN_CPU_SIMD", simd)
    return device


def make_weight(gen, fmt, n, k):
    """Rows for k features; the row padding holds random weights too (they must never count)."""
    block = _FORMATS[fmt].BLOCK
    padded = -(-k // block) * block
    return _FORMATS[fmt].quantize(torch.randn(n, padded, generator=gen) * 0.5)


def random_blocks(gen, fmt, shape):
    """Random bytes with a finite fp16 d (and dmin) in every block: any code, any scale byte,
    subnormal, negative or huge scales."""
    fm = _FORMATS[fmt]
    blocks = torch.randint(0, 256, (*shape, fm.BLOCK_BYTES), dtype=torch.uint8, generator=gen)
    scales = 2 if fmt == "q4k" else 1
    bits = torch.randint(0, 1 << 16, (*shape, scales), generator=gen, dtype=torch.int32)
    bits = torch.where((bits >> 10 & 31) == 31, bits & ~0x4000, bits)  # exponent 31 is inf/NaN
    blocks[..., : 2 * scales] = bits.to(torch.int16).view(torch.uint8).reshape(*shape, 2 * scales)
    return blocks.reshape(*shape[:-1], shape[-1] * fm.BLOCK_BYTES)


def same_bits(a, b):
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    a, b = a.cpu(), b.cpu()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints[a.dtype]), b.view(ints[b.dtype]))


# ----------------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("fmt", _FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("source", ["quantized", "random_bytes"])
@WITH_PATH
def test_dequantize_is_bit_exact(path, fmt, dtype, source, gen):
    if source == "quantized":
        blocks = make_weight(gen, fmt, 15, 3 * _FORMATS[fmt].BLOCK).reshape(3, 5, -1)
    else:
        blocks = random_blocks(gen, fmt, (3, 5, 7))
    expected = _FORMATS[fmt].dequantize(blocks, dtype)
    got = getattr(torch.ops.tinykern, f"{fmt}_dequantize")(blocks.to(path), dtype)
    assert same_bits(got, expected)


@pytest.mark.parametrize("fmt", _FORMATS)
@WITH_PATH
def test_dequantize_reads_unaligned_views(path, fmt, gen):
    blocks = random_blocks(gen, fmt, (4, 3))
    storage = torch.zeros(blocks.numel() + 1, dtype=torch.uint8)
    storage[1:] = blocks.reshape(-1)
    view = storage.to(path)[1:].view(blocks.shape)  # one byte past an aligned address
    got = getattr(torch.ops.tinykern, f"{fmt}_dequantize")(view, torch.float32)
    assert same_bits(got, _FORMATS[fmt].dequantize(blocks))


# ----------------------------------------------------------------------------------------- matmul


def reference(x, w, fmt, k, bias):
    y = x.double().cpu() @ _FORMATS[fmt].dequantize(w.cpu(), torch.float64)[:, :k].T
    return y if bias is None else y + bias.double().cpu()


def matmul_cases(fmt):
    """Every M (decoding GEMVs 1, 3; the CPU tiles for BLAS and the CUDA cuBLAS path 17, 64, 200)
    against every K at N = 33, then M = 13 (GEMV, rows of x 4 + 4 + 4 + 1) and N = 1 and 7 on a
    few; bias on odd sums."""
    cases = [(m, k, 33, (m + k) % 2 == 1) for m in (1, 3, 17, 64, 200) for k in K_VALUES[fmt]]
    cases += [(13, K_VALUES[fmt][2], 33, True), (1, K_VALUES[fmt][1], 1, True), (3, K_VALUES[fmt][2], 7, False),
              (64, 256, 7, True), (17, 256, 1, False)]
    return [pytest.param(fmt, *c, id=f"{fmt}-M{c[0]}-K{c[1]}-N{c[2]}{'-bias' if c[3] else ''}") for c in cases]


@pytest.mark.parametrize("fmt,m,k,n,with_bias", matmul_cases("q4k") + matmul_cases("q8_0"))
@WITH_PATH
def test_matmul_fp32(path, fmt, m, k, n, with_bias, gen):
    w = make_weight(gen, fmt, n, k)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    got = getattr(torch.ops.tinykern, f"{fmt}_matmul")(x.to(path), w.to(path), None if bias is None else bias.to(path))
    assert got.dtype == torch.float32 and got.shape == (m, n) and got.device.type == path
    assert relative_error(got, reference(x, w, fmt, k, bias)) < FP32_BOUND


@pytest.mark.parametrize("fmt", _FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 64])
@WITH_PATH
def test_matmul_half_within_twice_torch_error(path, fmt, dtype, m, gen):
    k, n = K_VALUES[fmt][2], 40
    w = make_weight(gen, fmt, n, k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    expected = reference(x, w, fmt, k, bias)
    dense = _FORMATS[fmt].dequantize(w, dtype)[:, :k].to(path)
    torch_error = relative_error(torch.nn.functional.linear(x.to(path), dense, bias.to(path)), expected)
    got = getattr(torch.ops.tinykern, f"{fmt}_matmul")(x.to(path), w.to(path), bias.to(path))
    assert got.dtype == dtype
    assert relative_error(got, expected) <= 2 * torch_error


@pytest.mark.parametrize("fmt", _FORMATS)
@WITH_PATH
def test_matmul_takes_any_float_bias_and_unaligned_weights(path, fmt, gen):
    k, n = K_VALUES[fmt][1], 9
    w = make_weight(gen, fmt, n, k)
    storage = torch.zeros(w.numel() + 3, dtype=torch.uint8)
    storage[3:] = w.reshape(-1)
    w_view = storage.to(path)[3:].view(w.shape)
    x = torch.randn(2, k, generator=gen)
    bias = torch.randn(n, generator=gen).to(torch.float16)
    got = getattr(torch.ops.tinykern, f"{fmt}_matmul")(x.to(path), w_view, bias.to(path))
    assert relative_error(got, reference(x, w, fmt, k, bias)) < FP32_BOUND


@pytest.mark.parametrize("fmt", _FORMATS)
@WITH_PATH
def test_matmul_empty_shapes(path, fmt, gen):
    matmul = getattr(torch.ops.tinykern, f"{fmt}_matmul")
    bias = torch.randn(5, generator=gen).to(path)
    w = make_weight(gen, fmt, 5, 64).to(path)
    assert matmul(torch.randn(0, 64, device=path), w, bias).shape == (0, 5)
    no_blocks = torch.empty(5, 0, dtype=torch.uint8, device=path)  # K = 0: the output is the bias
    for m in (3, 20):
        assert torch.equal(matmul(torch.randn(m, 0, device=path), no_blocks, bias).cpu(), bias.cpu().expand(m, 5))


# ------------------------------------------------------------------------------------------- RVQ


def check_encoding(x, codebooks, codes, quantized):
    """Level by level along the chosen path, in float64: the chosen code is the nearest, or
    within 1e-5 * (||r||^2 + ||c||^2) of it (fp32 ties); at most 2% of choices differ from the
    brute-force argmin at all. quantized is the sum of the chosen codewords."""
    r = x.double().cpu()
    cb = codebooks.double().cpu()
    codes = codes.cpu()
    differ = 0
    for level in range(cb.shape[0]):
        c = cb[level]
        dist = (r * r).sum(1, keepdim=True) - 2 * r @ c.T + (c * c).sum(1)
        best, argbest = dist.min(1)
        chosen = dist.gather(1, codes[:, level : level + 1]).squeeze(1)
        scale = (r * r).sum(1) + (c * c).sum(1).max()
        assert bool(((chosen - best) <= 1e-5 * scale).all()), f"level {level}: a code is not the nearest"
        differ += int((codes[:, level] != argbest).sum())
        r = r - c[codes[:, level]]
    assert differ <= 0.02 * codes.numel()
    assert quantized.dtype == torch.float32
    assert relative_error(quantized, x.double().cpu() - r) < 1e-5


RVQ_CASES = [(1, 3, 1), (7, 3, 8), (7, 64, 3), (1024, 3, 2), (1024, 64, 8), (1024, 256, 4), (37, 256, 1)]


@pytest.mark.parametrize("k,d,levels", RVQ_CASES, ids=[f"K{k}-D{d}-L{lv}" for k, d, lv in RVQ_CASES])
@WITH_PATH
def test_rvq_encode_matches_brute_force(path, k, d, levels, gen):
    n = 301  # not a multiple of any row tile
    codebooks = torch.randn(levels, k, d, generator=gen) * torch.logspace(0, -1, levels)[:, None, None]
    x = torch.randn(n, d, generator=gen)
    codes, quantized = torch.ops.tinykern.rvq_encode(x.to(path), codebooks.to(path))
    assert codes.dtype == torch.int64 and codes.shape == (n, levels)
    check_encoding(x, codebooks, codes, quantized)
    # Summed in level order from zero, exactly as rvq_decode sums.
    assert same_bits(quantized, torch.ops.tinykern.rvq_decode(codes, codebooks.to(path)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@WITH_PATH
def test_rvq_encode_half_input_and_shared_codebook(path, dtype, gen):
    shared = torch.randn(100, 48, generator=gen)
    codebooks = shared[None].expand(4, -1, -1)  # one codebook for every level, as RQ-VAE does
    x = torch.randn(77, 48, generator=gen).to(dtype)
    codes, quantized = torch.ops.tinykern.rvq_encode(x.to(path), codebooks.to(path))
    check_encoding(x, codebooks, codes, quantized)


@WITH_PATH
def test_rvq_ties_go_to_the_lowest_index(path, gen):
    codebooks = torch.randn(2, 100, 16, generator=gen)
    # Copies of codeword 2 in the same 32-codeword tile and in later ones.
    for twin in (5, 34, 66, 99):
        codebooks[0, twin] = codebooks[0, 2]
    x = codebooks[0, 2] + 1e-3 * torch.randn(50, 16, generator=gen)
    codes, _ = torch.ops.tinykern.rvq_encode(x.to(path), codebooks.to(path))
    assert (codes[:, 0].cpu() == 2).all()
    # Exact ties at level 1 too: zero residual against duplicate zero codewords.
    codebooks[1, :] = 1.0
    codebooks[1, 3] = codebooks[1, 7] = codebooks[1, 70] = 0.0
    codes, _ = torch.ops.tinykern.rvq_encode(codebooks[0, 2].expand(5, -1).to(path), codebooks.to(path))
    assert codes.cpu().tolist() == [[2, 3]] * 5


@pytest.mark.parametrize("code_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@WITH_PATH
def test_rvq_decode_is_bit_exact_with_the_reference(path, code_dtype, dtype, gen):
    codebooks = torch.randn(6, 50, 40, generator=gen).to(dtype)
    codes = torch.randint(-1, 50, (123, 4), generator=gen)  # L' = 4 < L = 6, -1 adds nothing
    codes[0] = -1
    got = torch.ops.tinykern.rvq_decode(codes.to(code_dtype).to(path), codebooks.to(path))
    assert same_bits(got, rvq_reference.rvq_decode(codes, codebooks))
    assert bool((got[0] == 0).all())


# The fast (exact=False) wide path's bound: ggml's own relative error with 8-bit activations.
FAST_BOUND = 7e-3


@pytest.mark.parametrize("simd", ["best", "avx512", "avx2", "scalar"])
@pytest.mark.parametrize("fmt", _FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matmul_fast_path(simd, fmt, dtype, monkeypatch, gen):
    """exact=False from 256 rows: bf16 on bf16 hardware (within FAST_BOUND of float64, or 2x torch's
    own error for bf16 x), fp32 bits identical to exact=True where it is capped off or missing and
    for fp16 x; from 128 to 255 rows the same bits as exact=True (below 128 rows the int8 path:
    tests/test_cpu_int8.py)."""
    if simd != "best":
        monkeypatch.setenv("TINYKERN_CPU_SIMD", simd)
    amx = _ext.runtime_info()["bf16_gemm"] and dtype != torch.float16  # under the cap set above
    tk = getattr(torch.ops.tinykern, f"{fmt}_matmul")
    k, n = (1001, 37) if fmt == "q4k" else (300, 37)
    w = make_weight(gen, fmt, n, k)
    bias = torch.randn(n, generator=gen)
    for m in (255, 256, 300):
        x = torch.randn(m, k, generator=gen).to(dtype)
        exact = tk(x, w, bias, True)
        fast = tk(x, w, bias, False)
        assert fast.shape == (m, n) and fast.dtype == dtype and bool(torch.isfinite(fast).all())
        if not amx or m < 256:
            assert same_bits(fast, exact), (m, simd)
            continue
        expected = reference(x, w, fmt, k, bias)
        bound = FAST_BOUND
        if dtype == torch.bfloat16:
            dense = _FORMATS[fmt].dequantize(w)[:, :k].bfloat16()
            bound = 2 * relative_error(torch.nn.functional.linear(x, dense, bias.bfloat16()), expected) + 1e-5
        assert relative_error(fast, expected) < bound, (m, relative_error(fast, expected), bound)


@pytest.mark.parametrize("simd", ["best", "avx2", "scalar"])
def test_threads_agree(simd, monkeypatch, gen):
    """Work is split by output rows (row blocks for RVQ), so two threads give the same bits as
    one; the large-M path hands tiles to the BLAS, whose bits may depend on threading."""
    monkeypatch.setenv("TINYKERN_CPU_SIMD", simd)
    tk = torch.ops.tinykern
    w4, w8 = make_weight(gen, "q4k", 70, 1001), make_weight(gen, "q8_0", 70, 300)
    codebooks = torch.randn(3, 40, 24, generator=gen)
    calls = [(tk.q4k_dequantize, (w4, torch.bfloat16)), (tk.q8_0_dequantize, (w8, torch.float32)),
             (tk.rvq_encode, (torch.randn(61, 24, generator=gen), codebooks))]
    for m in (1, 6, 64):
        calls.append((tk.q4k_matmul, (torch.randn(m, 1001, generator=gen), w4, None)))
        calls.append((tk.q8_0_matmul, (torch.randn(m, 300, generator=gen).half(), w8, None)))
    single = [fn(*args) for fn, args in calls]
    torch.set_num_threads(2)
    for (fn, args), expected in zip(calls, single):
        got = fn(*args)
        got, expected = (got, expected) if isinstance(got, tuple) else ((got,), (expected,))
        for a, b in zip(got, expected):
            if args[0].shape[0] == 64:
                assert relative_error(a, b) < (1e-6 if a.dtype == torch.float32 else 1e-3), fn
            else:
                assert torch.equal(a, b), fn


# --------------------------------------------------------------------- opcheck and registration


def op_samples(device, gen):
    w4 = make_weight(gen, "q4k", 9, 320).to(device)
    w8 = make_weight(gen, "q8_0", 9, 300).to(device)
    codebooks = torch.randn(3, 20, 8, generator=gen).to(device)
    bias = torch.randn(9, generator=gen).to(device)
    x = torch.randn(3, 320, generator=gen).to(device)
    return [
        ("q4k_dequantize", (w4, torch.float32)),
        ("q4k_dequantize", (w4.reshape(3, 3, -1), torch.bfloat16)),
        ("q4k_matmul", (x, w4, bias)),
        ("q4k_matmul", (x[:1].half(), w4, None)),
        ("q4k_matmul", (torch.randn(20, 320, generator=gen).to(device), w4, bias)),
        ("q8_0_dequantize", (w8, torch.float16)),
        ("q8_0_matmul", (x[:, :300].contiguous(), w8, bias)),
        ("q8_0_matmul", (torch.randn(20, 300, generator=gen).to(device).bfloat16(), w8, None)),
        ("rvq_encode", (torch.randn(10, 8, generator=gen).to(device), codebooks)),
        ("rvq_decode", (torch.randint(-1, 20, (10, 2), generator=gen).to(device), codebooks)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, gen):
    for name, args in op_samples(device, gen):
        torch.library.opcheck(getattr(torch.ops.tinykern, name), args)


@pytest.mark.parametrize("device", DEVICES)
def test_registered_for_the_native_backend(device, gen):
    backend = "cuda" if device == "cuda" else "cpu"
    names = [fmt.op(kind) for fmt in FORMATS.values() for kind in ("dequantize", "matmul", "conv2d", "conv2d_grouped")]
    for name in names + ["rvq_encode", "rvq_decode"]:
        assert backends.unavailable_reason(backend, device, name) is None, name
    w = make_weight(gen, "q4k", 12, 2 * 3 * 3)
    x = torch.randn(2, 4, 9, 9, generator=gen).to(device)
    bias = torch.randn(12, generator=gen).to(device)
    for groups, in_channels in ((1, 2), (2, 4)):
        xg = x[:, :in_channels]
        args = (xg, w.to(device), bias, in_channels, 3)
        kwargs = dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=groups)
        with forced("q4k_conv2d", "torch", device):
            expected = ops.q4k_conv2d(*args, **kwargs)
        with forced("q4k_conv2d", backend, device, exact=True):
            got = ops.q4k_conv2d(*args, **kwargs)
        assert got.shape == expected.shape and got.is_contiguous()
        assert relative_error(got, expected) < FP32_BOUND
        with forced("q4k_conv2d", backend, device, exact=True):
            nhwc = ops.q4k_conv2d(xg.contiguous(memory_format=torch.channels_last), *args[1:], **kwargs)
        assert nhwc.is_contiguous(memory_format=torch.channels_last)
        assert relative_error(nhwc, expected) < FP32_BOUND
    x2 = torch.randn(5, 18, generator=gen)
    with forced("q4k_matmul", backend, device, exact=True):  # the default rounds x to int8 on CPU
        y = ops.q4k_matmul(x2.to(device), w.to(device), bias)
    assert relative_error(y, reference(x2, w, "q4k", 18, bias)) < FP32_BOUND


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("device", DEVICES)
def test_errors_name_the_shapes_and_dtypes(device, gen):
    tk = torch.ops.tinykern
    w = make_weight(gen, "q4k", 4, 512).to(device)
    x = torch.randn(3, 512, generator=gen).to(device)
    with pytest.raises(RuntimeError, match=r"x of shape \[3, 200\] has 200 features but w of shape \[4, 288\]"):
        tk.q4k_matmul(x[:, :200], w, None)
    with pytest.raises(RuntimeError, match=r"x must be 2-D \[M, K\], got shape \[512\]"):
        tk.q4k_matmul(x[0], w, None)
    with pytest.raises(RuntimeError, match=r"x must be float32, float16 or bfloat16, got Int"):
        tk.q4k_matmul(x.int(), w, None)
    with pytest.raises(RuntimeError, match=r"w must be uint8 \[N, nb\*144\], got Byte with shape \[4, 280\]"):
        tk.q4k_matmul(x, w[:, :280], None)
    with pytest.raises(RuntimeError, match=r"bias must be a float vector \[4\], got Float with shape \[5\]"):
        tk.q4k_matmul(x, w, torch.zeros(5, device=device))
    with pytest.raises(RuntimeError, match=r"q8_0_matmul: w must be uint8 \[N, nb\*34\]"):
        tk.q8_0_matmul(x, w.float(), None)
    with pytest.raises(RuntimeError, match=r"blocks of shape \[4, 100\] must end in a dim that is a multiple of 34"):
        tk.q8_0_dequantize(w[:, :100], torch.float32)
    with pytest.raises(RuntimeError, match=r"dtype must be float32, float16 or bfloat16, got Double"):
        tk.q4k_dequantize(w, torch.float64)
    codebooks = torch.randn(2, 5, 8, device=device)
    with pytest.raises(RuntimeError, match=r"codebooks \[L, K, D\], got shapes \[3, 512\] and \[2, 5, 8\]"):
        tk.rvq_encode(x, codebooks)
    with pytest.raises(RuntimeError, match=r"codebooks float32, got Float and Half"):
        tk.rvq_encode(x[:, :8].contiguous(), codebooks.half())
    with pytest.raises(RuntimeError, match=r"with L' <= L, got shapes \[3, 3\] and \[2, 5, 8\]"):
        tk.rvq_decode(torch.zeros(3, 3, dtype=torch.long, device=device), codebooks)
    with pytest.raises(RuntimeError, match=r"codes must be int32 or int64"):
        tk.rvq_decode(torch.zeros(3, 2, device=device), codebooks)


def test_decode_rejects_codes_out_of_range_on_cpu():
    codebooks = torch.randn(2, 5, 8)
    codes = torch.zeros(3, 2, dtype=torch.long)
    codes[1, 1] = 5
    with pytest.raises(RuntimeError, match=r"code 5 at \[1, 1\] is out of range for codebooks of shape \[2, 5, 8\]"):
        torch.ops.tinykern.rvq_decode(codes, codebooks)
    codes[1, 1] = -2
    with pytest.raises(RuntimeError, match=r"code -2 at \[1, 1\]"):
        torch.ops.tinykern.rvq_decode(codes, codebooks)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device")
def test_cuda_kernels_reject_tensors_on_other_devices(gen):
    w = make_weight(gen, "q4k", 4, 256)
    x = torch.randn(2, 256, generator=gen)
    with pytest.raises(RuntimeError, match=r"needs every tensor on one cuda device, got x on cuda:0, w on cpu"):
        torch.ops.tinykern.q4k_matmul(x.cuda(), w, None)
    with pytest.raises(RuntimeError, match=r"got x on cuda:0, w on cuda:0, bias on cpu"):
        torch.ops.tinykern.q4k_matmul(x.cuda(), w.cuda(), torch.zeros(4))
