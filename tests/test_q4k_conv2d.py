"""q4k_conv2d on every backend against F.conv2d with the dequantized weight in float64 (kernel
error only, not quantization error), plus the Triton op's own checks: opcheck,
torch.compile, memory format, groups.

Shapes stay small: on a machine without a GPU the Triton kernels run in the interpreter.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKEND_CASES, DEVICES, forced, relative_error

from tinykern import ops
from tinykern.formats import q4k

# (B, C, H, W, out, kernel, stride, padding, dilation, channels_last, bias). C*kh*kw is never a
# multiple of 256: 36, 360 (two blocks), 8, 40, 54, 15.
CASES = [
    (2, 4, 9, 7, 7, 3, 1, 1, 1, False, True),
    (1, 40, 6, 6, 33, 3, 2, 1, 1, True, True),
    (2, 8, 5, 5, 6, 1, 1, 0, 1, True, False),
    (1, 4, 8, 8, 5, 3, 2, 0, 1, False, True),
    (1, 40, 5, 5, 17, 1, 2, 0, 1, False, True),
    (1, 6, 9, 9, 9, 3, 1, 2, 2, True, True),
    (1, 6, 7, 6, 10, 3, 2, 1, 2, False, False),
    (2, 5, 6, 7, 8, (1, 3), (1, 2), (0, 1), 1, True, True),
]


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def make_weight(gen, out_channels, per_group, kernel):
    """Q4_K rows of per_group*kh*kw weights in F.unfold order, padded to a multiple of 256 (with
    random weights, not zeros: they must not count), and the dequantized [out, per_group, kh, kw]
    float64."""
    kh, kw = pair(kernel)
    k = per_group * kh * kw
    w = q4k.quantize(torch.randn(out_channels, -(-k // q4k.BLOCK) * q4k.BLOCK, generator=gen))
    return w, q4k.dequantize(w, torch.float64)[:, :k].reshape(out_channels, per_group, kh, kw)


def make_input(gen, b, c, h, w, channels_last, dtype=torch.float32):
    x = torch.randn(b, c, h, w, generator=gen).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def reference(x, weight, bias, stride, padding, dilation, groups=1):
    b = None if bias is None else bias.double().cpu()
    return F.conv2d(x.double().cpu(), weight, b, stride, padding, dilation, groups)


# The most the default (not exact) CPU path may show: ggml's relative error with 8-bit
# activations (the CPU conv runs in bf16 on bf16 hardware).
FAST_BOUND = 7e-3


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("B,C,H,W,O,kernel,stride,padding,dilation,channels_last,has_bias", CASES)
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_fp32_matches_conv2d(device, backend, B, C, H, W, O, kernel, stride, padding, dilation,
                             channels_last, has_bias, exact, gen):
    w, weight = make_weight(gen, O, C, kernel)
    x = make_input(gen, B, C, H, W, channels_last)
    bias = torch.randn(O, generator=gen) if has_bias else None
    expected = reference(x, weight, bias, stride, padding, dilation)
    with forced("q4k_conv2d", backend, device, exact=exact):
        y = ops.q4k_conv2d(x.to(device), w.to(device), None if bias is None else bias.to(device), C, kernel,
                           stride, padding, dilation)
    assert y.shape == expected.shape and y.dtype == torch.float32 and y.device.type == device
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert relative_error(y, expected) < (1e-3 if exact else FAST_BOUND)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_low_precision_within_twice_torch_error(device, backend, dtype, gen):
    w, weight = make_weight(gen, 12, 6, 3)
    x = make_input(gen, 2, 6, 7, 7, False, dtype)
    bias = torch.randn(12, generator=gen)
    expected = reference(x, weight, bias, 1, 1, 1)
    x, bias = x.to(device), bias.to(device)
    torch_error = relative_error(F.conv2d(x, weight.to(device, dtype), bias.to(dtype), 1, 1), expected)
    with forced("q4k_conv2d", backend, device):
        y = ops.q4k_conv2d(x, w.to(device), bias, 6, 3, 1, 1)
    assert y.dtype == dtype
    assert relative_error(y, expected) <= 2 * torch_error + 1e-5


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_grouped_conv(device, backend, exact, gen):
    """Grouped convs are their own op (q4k_conv2d_grouped): the torch backend runs them, the
    Triton backend has no kernel for them and skips."""
    groups, C, O = 2, 8, 6
    w, weight = make_weight(gen, O, C // groups, 3)
    x = make_input(gen, 1, C, 6, 6, False)
    bias = torch.randn(O, generator=gen)
    with forced("q4k_conv2d_grouped", backend, device, exact=exact):
        y = ops.q4k_conv2d(x.to(device), w.to(device), bias.to(device), C, 3, 1, 1, 1, groups)
    assert relative_error(y, reference(x, weight, bias, 1, 1, 1, groups)) < (1e-3 if exact else FAST_BOUND)


def triton_module(device):
    """The Triton kernel module, or a skip when Triton cannot run on `device` here."""
    with forced("q4k_conv2d", "triton", device):
        from tinykern.kernels.triton import q4k_conv2d
    return q4k_conv2d


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, channels_last, gen):
    mod = triton_module(device)
    w, _ = make_weight(gen, 5, 4, 3)
    x = make_input(gen, 1, 4, 5, 6, channels_last).to(device)
    bias = torch.randn(5, generator=gen).to(device) if channels_last else None
    torch.library.opcheck(mod.q4k_conv2d_triton, (x, w.to(device), bias, [3, 3], [2, 1], [1, 1], [1, 1], 1))


@pytest.mark.parametrize("device", DEVICES)
def test_triton_op_refuses_groups(device, gen):
    mod = triton_module(device)
    w, _ = make_weight(gen, 4, 2, 1)
    x = make_input(gen, 1, 4, 3, 3, False).to(device)
    with pytest.raises(ValueError, match="groups=1"):
        mod.q4k_conv2d_triton(x, w.to(device), None, [1, 1], [1, 1], [0, 0], [1, 1], 2)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_matches_eager(device, gen):
    triton_module(device)
    w, _ = make_weight(gen, 6, 4, 3)
    w = w.to(device)
    x = make_input(gen, 1, 4, 5, 5, True).to(device)
    bias = torch.randn(6, generator=gen).to(device)

    def conv(x, w, bias):
        return ops.q4k_conv2d(x, w, bias, 4, 3, 1, 1)

    with forced("q4k_conv2d", "triton", device):
        eager = conv(x, w, bias)
        compiled = torch.compile(conv, fullgraph=True)(x, w, bias)
    assert compiled.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
