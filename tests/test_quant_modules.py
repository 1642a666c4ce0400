"""Every format of tinykern.formats.FORMATS through the generic pieces: tinykern.ops.dequantize /
matmul / conv2d on each backend against a float64 reference, QuantLinear / QuantConv2d, quantize_
with mixed layouts, save/load and GGUF round trips byte for byte.

The kernels are checked against the float64 product with the format's own dequantized weight,
which isolates the kernel's error from the quantization error (tests/test_format_records.py
holds the quantizers to libggml's error).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKEND_CASES, forced, relative_error
from torch import nn

import tinykern
from tinykern import QuantConfig, QuantConv2d, QuantLinear, backends, ops, quantize_
from tinykern.formats import FORMATS
from tinykern.io.gguf import GGUFTensor, read_gguf, write_gguf

FORMAT_NAMES = list(FORMATS)
WRITABLE = [name for name, fmt in FORMATS.items() if fmt.quantize is not None]
# fp32 x: the kernels differ from float64 by summation order (and the tl.dot path of Triton's
# interpreter by its own fp32 order); fp16/bf16 x round the inputs and outputs.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
POISON = float("nan")


@pytest.fixture(autouse=True)
def exact_cpu_matmuls():
    """fp32-exact CPU matmuls (the bf16 path has its own bound in test_block_ops_cpu.py)."""
    with backends.backend("auto", exact=True):
        yield


def random_rows(gen, fmt, rows, features):
    """Valid blocks of `fmt` for `rows` rows of `features` weights (zero-padded), quantized from
    Gaussian data where the format has a quantizer, else random bytes with finite fp16 fields
    (made by decoding: a code field of any value is valid)."""
    dense = torch.randn(rows, fmt.padded(features), generator=gen) / features**0.5
    dense[:, features:] = 0
    if fmt.quantize is not None:
        return fmt.quantize(dense)
    raw = torch.randint(0, 256, (rows, fmt.row_bytes(features)), generator=gen, dtype=torch.uint8)
    # Replace non-finite decodes (an fp16 field of NaN/Inf bits) by re-drawing those blocks as zeros.
    decoded = fmt.dequantize(raw).reshape(rows, -1, fmt.block)
    bad = ~torch.isfinite(decoded).all(dim=-1)
    raw.view(rows, -1, fmt.block_bytes)[bad] = 0
    return raw


def reference(x, blocks, fmt, bias, features):
    w = fmt.dequantize(blocks, torch.float64)[:, :features]
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_matmul_every_format(device, backend, name, rows, gen):
    fmt = FORMATS[name]
    features = 2 * fmt.block - 5  # not a multiple of the block: the padding never meets x
    blocks = random_rows(gen, fmt, 13, features).to(device)
    x = torch.randn(rows, features, generator=gen).to(device)
    bias = torch.randn(13, generator=gen).to(device)
    expected = reference(x, blocks, fmt, bias, features)
    with forced(fmt.op("matmul"), backend, device, exact=True):
        got = ops.matmul(x, blocks, name, bias)
    assert got.shape == (rows, 13) and got.dtype == x.dtype
    assert relative_error(got, expected) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_dequantize_every_format(device, backend, name, gen):
    fmt = FORMATS[name]
    blocks = random_rows(gen, fmt, 5, 3 * fmt.block).to(device)
    with forced(fmt.op("dequantize"), backend, device):
        got = ops.dequantize(blocks, name)
    expected = fmt.dequantize(blocks.cpu())
    assert torch.equal(got.cpu().view(torch.int32), expected.view(torch.int32))  # bit for bit


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_conv2d_every_format(device, backend, name, gen):
    fmt = FORMATS[name]
    in_channels, out_channels, kernel = 5, 6, 3
    blocks = random_rows(gen, fmt, out_channels, in_channels * kernel * kernel).to(device)
    x = torch.randn(2, in_channels, 7, 6, generator=gen).to(device)
    bias = torch.randn(out_channels, generator=gen).to(device)
    weight = fmt.dequantize(blocks.cpu(), torch.float64)[:, : in_channels * kernel * kernel]
    weight = weight.reshape(out_channels, in_channels, kernel, kernel)
    expected = F.conv2d(x.double().cpu(), weight, bias.double().cpu(), 1, 1)
    with forced(fmt.op("conv2d"), backend, device, exact=True):
        got = ops.conv2d(x, blocks, name, kernel, bias, padding=1)
    assert relative_error(got, expected) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_matmul_half_inputs(name, dtype, gen):
    fmt = FORMATS[name]
    blocks = random_rows(gen, fmt, 9, fmt.block + 7)
    x = torch.randn(4, fmt.block + 7, generator=gen).to(dtype)
    got = ops.matmul(x, blocks, name)
    assert got.dtype == dtype
    assert relative_error(got, reference(x, blocks, fmt, None, fmt.block + 7)) < TOLERANCE[dtype]


def test_generic_ops_name_the_format():
    with pytest.raises(ValueError, match="unknown format 'q7_x'"):
        ops.matmul(torch.randn(2, 32), torch.zeros(3, 18, dtype=torch.uint8), "q7_x")
    with pytest.raises(ValueError, match="q4_0_matmul: x has 40 features"):
        ops.matmul(torch.randn(2, 40), torch.zeros(3, 18, dtype=torch.uint8), "q4_0")


@pytest.mark.parametrize("name", WRITABLE)
def test_quant_linear_and_conv_every_format(name, gen):
    linear = nn.Linear(300, 24)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    x = torch.randn(5, 300, generator=gen)
    image = torch.randn(1, 6, 9, 9, generator=gen)
    qlinear = FORMATS[name].linear_class.from_linear(linear, "lin", format=name)
    qconv = FORMATS[name].conv_class.from_conv(conv, "conv", format=name)
    assert isinstance(qlinear, QuantLinear) and qlinear.format is FORMATS[name]
    assert isinstance(qconv, QuantConv2d) and f"format={name}" in repr(qconv)
    assert relative_error(qlinear(x), F.linear(x.double(), qlinear.dequantize(torch.float64), linear.bias.double())) < 1e-5
    expected = F.conv2d(image.double(), qconv.dequantize(torch.float64), conv.bias.double(), padding=1)
    assert relative_error(qconv(image), expected) < 1e-5
    # The quantization error itself: far below the weight, as for any working quantizer.
    assert relative_error(qlinear.dequantize(), linear.weight.detach()) < 0.6


def test_named_classes_hold_their_format_only():
    with pytest.raises(ValueError, match="Q4Linear holds q4_k only"):
        tinykern.Q4Linear(256, 8, format="q5_k")
    with pytest.raises(ValueError, match="needs format="):
        QuantLinear(256, 8)
    assert tinykern.Q8Linear(64, 8, format="q8_0").format.name == "q8_0"


def make_model(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return nn.Sequential(nn.Linear(256, 320), nn.GELU(), nn.Linear(320, 256), nn.Conv2d(16, 32, 3, padding=1))


def test_mixed_layout_save_load_round_trip(tmp_path, gen):
    model = nn.Sequential(nn.Linear(256, 320), nn.GELU(), nn.Linear(320, 256))
    overrides = {"0": "q3_k", "2": "q5_0"}
    report = quantize_(model, QuantConfig(weight="q6_k", overrides=overrides, min_features=0))
    assert [r.format for r in report] == ["q3_k", "q5_0"]
    x = torch.randn(3, 256, generator=gen)
    tinykern.save_quantized(model, tmp_path / "m")
    fresh = nn.Sequential(nn.Linear(256, 320), nn.GELU(), nn.Linear(320, 256))
    tinykern.load_quantized(fresh, tmp_path / "m")
    for a, b in zip(model, fresh):
        if isinstance(a, QuantLinear):
            assert type(b) is type(a) and b.format is a.format and torch.equal(a.qweight, b.qweight)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_gguf_round_trip_byte_exact(tmp_path, name, gen):
    fmt = FORMATS[name]
    blocks = random_rows(gen, fmt, 4, 2 * fmt.block)
    path = tmp_path / "w.gguf"
    write_gguf(path, [GGUFTensor("w", name.upper(), (4, 2 * fmt.block), blocks)])
    (t,) = read_gguf(path)
    assert t.format is fmt and t.rows_aligned and torch.equal(t.data, blocks)
    module = fmt.linear_class.from_packed(t.data, 2 * fmt.block, format=fmt)
    assert torch.equal(module.qweight, blocks)


@pytest.mark.parametrize("bad", [["q5_k"], "q9_x", None, 5])
def test_forged_format_in_a_spec_is_a_value_error(tmp_path, bad, gen):
    from test_serialization import forged, rewrite

    model = nn.Sequential(nn.Linear(256, 8))
    quantize_(model, QuantConfig(weight="q5_k", min_features=0))
    assert type(model[0]) is QuantLinear  # the generic class: its spec names the format
    tinykern.save_quantized(model, tmp_path / "m.safetensors")
    path = rewrite(tmp_path / "m.safetensors", tmp_path / "forged.safetensors",
                   forged("tinykern.modules", lambda specs: {**specs, "0": {**specs["0"], "format": bad}}))
    fresh = nn.Sequential(nn.Linear(256, 8))
    with pytest.raises(ValueError, match="forged.safetensors: quantized module '0'"):
        tinykern.load_quantized(fresh, path)
    assert type(fresh[0]) is nn.Linear
