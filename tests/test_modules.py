"""Q4Linear, Q8Linear and Q4Conv2d as nn.Modules.

The forward pass is compared with the dense torch op on the module's own dequantized weight
(F.linear(x, module.dequantize(), bias), F.conv2d(...)), which isolates the kernel's error from the
quantization error; the quantization error is checked separately against the original layer.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKEND_CASES, forced, relative_error
from torch import nn

from tinykern import Q4Conv2d, Q4Linear, Q8Linear, backends, ops
from tinykern.formats import q4k, q8_0

LINEARS = [pytest.param(Q4Linear, id="q4_k"), pytest.param(Q8Linear, id="q8_0")]
# The kernel's fp32 error against F.linear on the same dense weight: summation order only.
FP32_TOL = 1e-5


@pytest.fixture(autouse=True)
def exact_cpu_matmuls():
    """The modules are checked against dense fp32 at FP32_TOL: their matmuls run fp32-exact here
    (the CPU kernels' bf16 path has its bound in test_q4k_matmul.py / test_q8_0_matmul.py)."""
    with backends.backend("auto", exact=True):
        yield


def make_linear(gen, in_features, out_features, bias=True, dtype=torch.float32):
    lin = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_features, in_features, generator=gen) / in_features**0.5)
        if bias:
            lin.bias.copy_(torch.randn(out_features, generator=gen))
    return lin.to(dtype)


def make_conv(gen, in_channels, out_channels, kernel_size, bias=True, **kwargs):
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=bias, **kwargs)
    with torch.no_grad():
        fan_in = conv.weight[0].numel()
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / fan_in**0.5)
        if bias:
            conv.bias.copy_(torch.randn(out_channels, generator=gen))
    return conv


def dense_linear(module, x):
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return F.linear(x, module.dequantize(x.dtype), bias)


def dense_conv(module, conv, x):
    """The dense conv on the module's dequantized weight, with the original conv's arguments
    (padding='same' stays a string: the module's numeric padding is not trusted here)."""
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return F.conv2d(x, module.dequantize(x.dtype), bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def low_precision_bound(out, dense_fn, x):
    """flash-attention's rule: our error in x's dtype at most twice torch's own error in that
    dtype, both against an fp64 reference (plus a hair for fp32)."""
    ref = dense_fn(x.double())
    own = dense_fn(x)
    return relative_error(out, ref), 2 * relative_error(own, ref) + 1e-6


# --- Linear ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", LINEARS)
@pytest.mark.parametrize("in_features", [320, 2880, 256, 100])
def test_linear_matches_dense_on_dequantized_weight(cls, in_features, gen):
    lin = make_linear(gen, in_features, 48)
    module = cls.from_linear(lin)
    for m in (1, 3, 17):
        x = torch.randn(m, in_features, generator=gen)
        y = module(x)
        assert y.shape == (m, 48) and y.dtype == torch.float32
        err = relative_error(y, dense_linear(module, x))
        assert err < FP32_TOL, f"M={m} K={in_features}: {err:.2e}"


@pytest.mark.parametrize("cls", LINEARS)
def test_linear_leading_batch_dims(cls, gen):
    module = cls.from_linear(make_linear(gen, 320, 24))
    x = torch.randn(2, 3, 320, generator=gen)
    y = module(x)
    assert y.shape == (2, 3, 24)
    assert relative_error(y, dense_linear(module, x)) < FP32_TOL
    # Row by row the same as the flattened batch.
    assert relative_error(y.reshape(6, 24), module(x.reshape(6, 320))) < FP32_TOL
    # A non-contiguous input.
    xt = torch.randn(320, 5, generator=gen).t()
    assert relative_error(module(xt), dense_linear(module, xt.contiguous())) < FP32_TOL


@pytest.mark.parametrize("cls", LINEARS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_returns_input_dtype(cls, dtype, gen):
    module = cls.from_linear(make_linear(gen, 320, 40))
    x = torch.randn(5, 320, generator=gen).to(dtype)
    y = module(x)
    assert y.dtype == dtype and y.shape == (5, 40)
    weight, bias = module.dequantize(torch.float64), module.bias

    def dense(inp):
        return F.linear(inp, weight.to(inp.dtype), bias.to(inp.dtype))

    err, bound = low_precision_bound(y, dense, x)
    assert err <= bound, f"{dtype}: {err:.2e} > {bound:.2e}"


@pytest.mark.parametrize("cls", LINEARS)
def test_linear_without_bias(cls, gen):
    module = cls.from_linear(make_linear(gen, 2880, 16, bias=False))
    assert module.bias is None
    assert "bias" not in dict(module.named_parameters())
    x = torch.randn(3, 2880, generator=gen)
    assert relative_error(module(x), F.linear(x, module.dequantize())) < FP32_TOL


@pytest.mark.parametrize("cls,bound", [pytest.param(Q4Linear, 0.1, id="q4_k"), pytest.param(Q8Linear, 0.01, id="q8_0")])
def test_linear_quantization_error_is_small(cls, bound, gen):
    lin = make_linear(gen, 640, 64, bias=False)
    module = cls.from_linear(lin)
    x = torch.randn(17, 640, generator=gen)
    with torch.no_grad():
        err = relative_error(module(x), lin(x))
    assert 0 < err < bound
    assert relative_error(module.dequantize(), lin.weight) < bound


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_from_linear_low_precision_layer(dtype, gen):
    lin = make_linear(gen, 256, 32, dtype=dtype)
    module = Q4Linear.from_linear(lin)
    # Biases stay fp16, bf16 becomes fp32.
    assert module.bias.dtype == (torch.float16 if dtype == torch.float16 else torch.float32)
    assert torch.equal(module.bias.to(dtype), lin.bias)
    assert torch.equal(module.qweight, q4k.quantize(lin.weight.float()))
    x = torch.randn(4, 256, generator=gen).to(dtype)
    assert module(x).dtype == dtype


@pytest.mark.parametrize("cls", LINEARS)
def test_linear_extra_repr(cls, gen):
    module = cls.from_linear(make_linear(gen, 100, 12))
    text = repr(module)
    assert cls.__name__ in text
    assert f"format={cls.FORMAT}" in text
    assert f"bytes={module.qweight.numel()}" in text
    assert "in_features=100" in text and "out_features=12" in text


@pytest.mark.parametrize("in_features", [1, 31, 32, 100, 256, 257, 320, 2880])
def test_qweight_shapes_are_exact(in_features):
    q4 = Q4Linear(in_features, 7, device="meta")
    assert q4.qweight.shape == (7, -(-in_features // 256) * 144) and q4.qweight.dtype == torch.uint8
    q8 = Q8Linear(in_features, 7, device="meta")
    assert q8.qweight.shape == (7, -(-in_features // 32) * 34) and q8.qweight.dtype == torch.uint8
    conv = Q4Conv2d(in_features, 6, 3, device="meta")
    assert conv.qweight.shape == (6, -(-in_features * 9 // 256) * 144)


def test_qweight_of_from_linear_is_the_padded_rows(gen):
    lin = make_linear(gen, 320, 9)
    module = Q4Linear.from_linear(lin)
    assert module.qweight.shape == (9, 288)
    padded = F.pad(lin.weight.detach(), (0, 512 - 320))
    assert torch.equal(module.qweight, q4k.quantize(padded))
    assert module.dequantize().shape == (9, 320)
    q8 = Q8Linear.from_linear(make_linear(gen, 100, 9))
    assert q8.qweight.shape == (9, 4 * 34)


@pytest.mark.parametrize("cls", LINEARS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_state_dict_round_trip(cls, bias, gen):
    module = cls.from_linear(make_linear(gen, 320, 24, bias=bias))
    state = module.state_dict()
    assert set(state) == ({"qweight", "bias"} if bias else {"qweight"})
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    x = torch.randn(3, 320, generator=gen)
    fresh = cls(320, 24, bias=bias)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), module(x))
    # Built on the meta device and filled by assignment: no full-precision copy ever.
    meta = cls(320, 24, bias=bias, device="meta")
    meta.load_state_dict(state, assign=True)
    assert not meta.qweight.is_meta
    assert torch.equal(meta(x), module(x))


def test_from_packed_adopts_blocks(gen):
    w = torch.randn(10, 300, generator=gen)
    blocks = q4k.quantize(F.pad(w, (0, 212)))
    bias = torch.randn(10, generator=gen)
    module = Q4Linear.from_packed(blocks, 300, bias)
    assert module.qweight.data_ptr() == blocks.data_ptr()  # adopted, not copied or re-quantized
    assert module.in_features == 300 and module.out_features == 10
    assert not module.qweight.is_meta and not module.bias.is_meta
    x = torch.randn(4, 300, generator=gen)
    expected = F.linear(x, q4k.dequantize(blocks)[:, :300], bias)
    assert relative_error(module(x), expected) < FP32_TOL
    q8_blocks = q8_0.quantize(F.pad(w, (0, 20)))
    q8 = Q8Linear.from_packed(q8_blocks, 300)
    assert q8.bias is None and q8.qweight.shape == (10, 10 * 34)
    assert relative_error(q8(x), F.linear(x, q8_0.dequantize(q8_blocks)[:, :300])) < FP32_TOL


def test_from_packed_rejects_wrong_shape_naming_shapes(gen):
    blocks = q4k.quantize(torch.randn(6, 512, generator=gen))
    with pytest.raises(ValueError, match=r"\[6, 288\].*\[6, 287\]"):
        Q4Linear.from_packed(blocks[:, :287], 512)
    with pytest.raises(ValueError, match=r"\[6, 144\].*\[6, 288\]"):
        Q4Linear.from_packed(blocks, 256)  # rows of 512 weights, told 256
    with pytest.raises(ValueError, match="int8"):
        Q4Linear.from_packed(blocks.view(torch.int8), 512)
    with pytest.raises(ValueError, match=r"\[6, 68\].*\[6, 288\]"):
        Q8Linear.from_packed(blocks, 64)


@pytest.mark.parametrize("cls,in_features,bad_k", [
    (Q4Linear, 320, 300), (Q4Linear, 320, 319), (Q4Linear, 320, 321), (Q4Linear, 320, 512), (Q4Linear, 320, 513),
    (Q4Linear, 320, 100), (Q8Linear, 100, 99), (Q8Linear, 100, 128), (Q8Linear, 100, 20),
])
def test_wrong_input_features_raise_naming_shapes(cls, in_features, bad_k, gen):
    """x must have exactly in_features features: a K that still fits the padded rows would
    silently multiply by the wrong (or padding) columns."""
    module = cls.from_linear(make_linear(gen, in_features, 8))
    x = torch.randn(2, bad_k, generator=gen)
    with pytest.raises(ValueError, match=rf"\[2, {bad_k}\]"):
        module(x)


def test_linear_rejects_integer_input(gen):
    module = Q4Linear.from_linear(make_linear(gen, 256, 8))
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        module(torch.randint(0, 5, (2, 256), generator=gen))


def test_build_on_meta_device():
    with torch.device("meta"):
        lin = nn.Linear(320, 64)
        conv = nn.Conv2d(32, 16, 3, padding=1)
    q4 = Q4Linear.from_linear(lin)
    assert q4.qweight.is_meta and q4.qweight.shape == (64, 288) and q4.qweight.dtype == torch.uint8
    assert q4.bias.is_meta and q4.bias.shape == (64,)
    q8 = Q8Linear.from_linear(lin)
    assert q8.qweight.is_meta and q8.qweight.shape == (64, 10 * 34)
    qc = Q4Conv2d.from_conv(conv)
    assert qc.qweight.is_meta and qc.qweight.shape == (16, 288)
    with torch.device("meta"):
        built = Q4Linear(100, 3)
    assert built.qweight.is_meta


def test_device_mismatch_names_devices(gen):
    module = Q4Linear.from_linear(make_linear(gen, 256, 8))
    x = torch.randn(2, 256, device="meta")
    with pytest.raises(ValueError, match=r"different devices.*meta.*cpu"):
        module(x)
    conv = Q4Conv2d.from_conv(make_conv(gen, 8, 4, 3))
    with pytest.raises(ValueError, match=r"different devices"):
        conv(torch.randn(1, 8, 5, 5, device="meta"))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"different devices.*cuda.*cpu"):
            module(torch.randn(2, 256, device="cuda"))


# --- Conv2d ----------------------------------------------------------------------------------

CONV_CASES = [
    # (in, out, kernel, kwargs, H, W)
    pytest.param(32, 24, 1, {}, 9, 7, id="1x1"),
    pytest.param(16, 8, 3, {"padding": 1}, 9, 9, id="3x3"),
    pytest.param(16, 8, 3, {"stride": 2, "padding": 1}, 11, 9, id="stride2-pad1"),
    pytest.param(8, 12, 3, {"padding": 2, "dilation": 2}, 10, 13, id="dilation2"),
    pytest.param(64, 32, 3, {"padding": 1, "groups": 2}, 7, 7, id="groups2"),
    pytest.param(40, 16, 3, {"padding": "same"}, 6, 9, id="same-3x3"),
    pytest.param(12, 10, 3, {"padding": "same", "dilation": 2}, 9, 8, id="same-dilation2"),
    pytest.param(12, 10, 3, {"padding": "valid"}, 9, 8, id="valid"),
    pytest.param(20, 6, (1, 3), {"padding": (0, 1), "bias": False}, 5, 8, id="1x3-nobias"),
    pytest.param(36, 8, 3, {"stride": (2, 1), "padding": 1, "groups": 4}, 9, 9, id="groups4-stride21"),
]


@pytest.mark.parametrize("in_c,out_c,kernel,kwargs,h,w", CONV_CASES)
def test_conv_matches_dense_on_dequantized_weight(in_c, out_c, kernel, kwargs, h, w, gen):
    conv = make_conv(gen, in_c, out_c, kernel, **kwargs)
    module = Q4Conv2d.from_conv(conv)
    x = torch.randn(2, in_c, h, w, generator=gen)
    with torch.no_grad():
        expected_shape = conv(x).shape
        y = module(x)
        assert y.shape == expected_shape and y.dtype == torch.float32
        assert relative_error(y, dense_conv(module, conv, x)) < FP32_TOL
        # And the quantization error against the original conv stays small.
        assert relative_error(y, conv(x)) < 0.1
    assert module.dequantize().shape == conv.weight.shape
    assert (module.bias is None) == (conv.bias is None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv_returns_input_dtype(dtype, gen):
    conv = make_conv(gen, 16, 8, 3, padding=1)
    module = Q4Conv2d.from_conv(conv)
    x = torch.randn(2, 16, 7, 7, generator=gen).to(dtype)
    y = module(x)
    assert y.dtype == dtype and y.shape == (2, 8, 7, 7)
    weight = module.dequantize(torch.float64)

    def dense(inp):
        return F.conv2d(inp, weight.to(inp.dtype), module.bias.to(inp.dtype), 1, 1)

    err, bound = low_precision_bound(y, dense, x)
    assert err <= bound, f"{dtype}: {err:.2e} > {bound:.2e}"


def test_conv_extra_repr_and_state_dict(gen):
    conv = make_conv(gen, 64, 32, 3, padding=1, groups=2, stride=2)
    module = Q4Conv2d.from_conv(conv)
    text = repr(module)
    assert "format=q4_k" in text and f"bytes={module.qweight.numel()}" in text and "groups=2" in text
    assert module.qweight.shape == (32, 2 * 144)  # 32*9 = 288 weights per row
    fresh = Q4Conv2d(64, 32, 3, stride=2, padding=1, groups=2, device="meta")
    fresh.load_state_dict(module.state_dict(), assign=True)
    x = torch.randn(1, 64, 9, 9, generator=gen)
    assert torch.equal(fresh(x), module(x))


def test_conv_rejects_what_it_cannot_run(gen):
    with pytest.raises(ValueError, match="padding_mode"):
        Q4Conv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), name="vae.conv_in.weight")
    with pytest.raises(ValueError, match="same"):
        Q4Conv2d.from_conv(nn.Conv2d(8, 8, 4, padding="same"))
    with pytest.raises(ValueError, match="groups"):
        Q4Conv2d(8, 6, 3, groups=4)
    module = Q4Conv2d.from_conv(make_conv(gen, 8, 4, 3))
    with pytest.raises(ValueError, match=r"\[B, 8, H, W\].*\[1, 7, 5, 5\]"):
        module(torch.randn(1, 7, 5, 5, generator=gen))
    with pytest.raises(ValueError, match=r"\[8, 5, 5\]"):
        module(torch.randn(8, 5, 5, generator=gen))


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_conv_padding_strings_as_torch_takes_them(padding, gen):
    conv = make_conv(gen, 16, 8, 3, padding=padding, dilation=2)
    x = torch.randn(2, 16, 9, 8, generator=gen)
    built = Q4Conv2d(16, 8, 3, padding=padding, dilation=2)
    built.load_state_dict(Q4Conv2d.from_conv(conv).state_dict())
    dense = F.conv2d(x, built.dequantize(), built.bias, 1, padding, 2)
    y = ops.q4k_conv2d(x, built.qweight, built.bias, 16, 3, padding=padding, dilation=2)
    assert built.padding == ((2, 2) if padding == "same" else (0, 0))
    assert y.shape == dense.shape and relative_error(y, dense) < FP32_TOL
    assert torch.equal(built(x), y)


def test_conv_padding_strings_it_cannot_take_say_why(gen):
    module = Q4Conv2d.from_conv(make_conv(gen, 8, 4, 3))
    x = torch.randn(1, 8, 6, 6, generator=gen)
    with pytest.raises(ValueError, match=r"q4k_conv2d: padding='same' needs stride 1.*stride=2"):
        ops.q4k_conv2d(x, module.qweight, module.bias, 8, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match=r"q4k_conv2d: padding='same' with kernel_size=\(4, 4\).*symmetric"):
        ops.q4k_conv2d(x, module.qweight, module.bias, 8, 4, padding="same")
    with pytest.raises(ValueError, match=r"q4k_conv2d: padding must be .*'full'"):
        ops.q4k_conv2d(x, module.qweight, module.bias, 8, 3, padding="full")
    with pytest.raises(ValueError, match=r"Q4Conv2d: padding='same' needs stride 1"):
        Q4Conv2d(8, 4, 3, stride=2, padding="same")


@pytest.mark.parametrize("cls,too_big", [pytest.param(Q4Linear, 2 * q4k.HIGHEST, id="q4_k"),
                                          pytest.param(Q8Linear, 2 * q8_0.MAX_ABS, id="q8_0")])
def test_from_linear_names_the_layer_of_a_weight_or_bias_it_cannot_hold(cls, too_big, gen):
    lin = make_linear(gen, 256, 8)
    with torch.no_grad():
        lin.weight[3, 4] = too_big
    with pytest.raises(ValueError, match=r"unet\.proj\.weight: .*holds weights in"):
        cls.from_linear(lin, "unet.proj")
    lin = make_linear(gen, 256, 8)
    with torch.no_grad():
        lin.bias[5] = float("nan")
    with pytest.raises(ValueError, match=r"unet\.proj\.bias: .*NaN or Inf \(1 of 8"):
        cls.from_linear(lin, "unet.proj")


def test_from_conv_names_the_layer_of_a_bias_it_cannot_keep(gen):
    conv = make_conv(gen, 16, 8, 3)
    with torch.no_grad():
        conv.bias[2] = float("-inf")
    with pytest.raises(ValueError, match=r"vae\.conv_in\.bias: .*NaN or Inf"):
        Q4Conv2d.from_conv(conv, "vae.conv_in")


def test_bias_of_another_dtype_is_refused_saying_what_is_wrong(gen):
    module = Q4Linear.from_linear(make_linear(gen, 256, 8))
    x = torch.randn(2, 256, generator=gen)
    with pytest.raises(ValueError, match=r"Q4Linear: bias must be float32 or float16 \[8\], got torch.float64 \[8\]"):
        Q4Linear.from_packed(module.qweight, 256, module.bias.double())
    with pytest.raises(ValueError, match=r"float32 or float16 \[8\], got torch.float32 \[7\]"):
        Q4Linear.from_packed(module.qweight, 256, module.bias[:7])
    with pytest.raises(ValueError, match=r"q4k_matmul: bias must be float32/float16/bfloat16 of shape \[8\], got torch.float64"):
        ops.q4k_matmul(x, module.qweight, module.bias.double())
    conv = Q4Conv2d.from_conv(make_conv(gen, 8, 4, 3))
    with pytest.raises(ValueError, match=r"q4k_conv2d: bias must be .*got torch.float64"):
        ops.q4k_conv2d(torch.randn(1, 8, 5, 5, generator=gen), conv.qweight, conv.bias.double(), 8, 3)


# --- Every backend -----------------------------------------------------------------------------

MODULE_CASES = {
    "q4linear": ("q4k_matmul", lambda g: Q4Linear.from_linear(make_linear(g, 320, 24)), (17, 320)),
    "q4linear-gemv": ("q4k_matmul", lambda g: Q4Linear.from_linear(make_linear(g, 100, 24)), (3, 100)),
    "q8linear": ("q8_0_matmul", lambda g: Q8Linear.from_linear(make_linear(g, 100, 24)), (3, 100)),
    "q4conv": ("q4k_conv2d", lambda g: Q4Conv2d.from_conv(make_conv(g, 16, 8, 3, stride=2, padding=1)), (2, 16, 9, 9)),
    "q4conv-grouped": ("q4k_conv2d_grouped", lambda g: Q4Conv2d.from_conv(make_conv(g, 16, 8, 3, padding=1, groups=2)),
                       (2, 16, 7, 7)),
}


@pytest.mark.parametrize("case", list(MODULE_CASES))
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_modules_on_every_backend(device, backend, case, gen):
    op, build, shape = MODULE_CASES[case]
    module = build(gen).to(device)
    x = torch.randn(shape, generator=gen).to(device)
    if isinstance(module, Q4Conv2d):
        expected = F.conv2d(x, module.dequantize(), module.bias, module.stride, module.padding, module.dilation, module.groups)
    else:
        expected = dense_linear(module, x)
    with forced(op, backend, device, exact=True):
        y = module(x)
        empty = module(x[:0])
        single = module(x[0]) if not isinstance(module, Q4Conv2d) else None
    assert y.shape == expected.shape and y.device == expected.device
    assert relative_error(y, expected) < FP32_TOL
    # An empty batch, and (Linear) a 1-D input, as nn.Linear accepts.
    assert empty.shape == (0, *expected.shape[1:])
    if single is not None:
        assert single.shape == expected.shape[1:]
        assert relative_error(single, expected[0]) < FP32_TOL
