"""The generic Triton conv2d (tinykern/kernels/triton/block_conv2d.py) for every format in
DECODERS but Q4_K (tests/test_q4k_conv2d.py covers its tuned kernel): against F.conv2d in
float64 on the format's own dequantized weight (kernel error only), plus registration,
opcheck, torch.compile, low precisions and the groups refusal.

Nothing a kernel must not touch is harmless: outputs start as NaN, each weight row ends in a
block of NaN scales, the partial block's padding holds random weights, and the NCHW inputs are
views inside a NaN frame, so a read past K or outside the image shows up. Shapes stay tiny:
without a GPU the kernels run in the interpreter.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, forced, relative_error

from tinykern import backends, ops
from tinykern.formats import FORMATS

block_conv2d = pytest.importorskip("tinykern.kernels.triton.block_conv2d")
from tinykern.kernels.triton.decode import DECODERS  # noqa: E402

NAMES = [n for n in DECODERS if n not in block_conv2d.TUNED]
# fp32 x goes through tl.dot (3xTF32 on a GPU): the bound of the Q4_K conv's tests.
TOL = 1e-3

# (B, C, H, W, out, kernel, stride, padding, dilation, channels_last, bias). C*kh*kw: 45 (two
# 32-blocks, one partial 256-block), 5, 270 (two 256-blocks), 6, 20.
CASES = [
    (2, 5, 7, 6, 6, 3, 1, 1, 1, False, True),
    (2, 5, 7, 6, 6, 3, 2, 1, 1, True, False),
    (2, 5, 7, 6, 6, 1, 1, 0, 1, False, False),
    (1, 30, 4, 5, 3, 3, 1, 1, 1, False, True),
    (1, 2, 7, 6, 5, (1, 3), (2, 1), (0, 1), 1, True, True),
    (1, 5, 6, 6, 4, (2, 2), 1, 2, 2, False, True),
]


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def make_weight(gen, name, out_channels, per_group, kernel):
    """Rows of per_group*kh*kw weights in F.unfold order (the partial block's padding random, not
    zero: it must not count), then one block of 0xFF bytes (NaN fp16 fields, in every format)
    that no kernel may read; and the dequantized [out, per_group, kh, kw] float64."""
    fmt = FORMATS[name]
    kh, kw = pair(kernel)
    k = per_group * kh * kw
    w = fmt.quantize(torch.randn(out_channels, fmt.padded(k), generator=gen) / k**0.5)
    weight = fmt.dequantize(w, torch.float64)[:, :k].reshape(out_channels, per_group, kh, kw)
    poison = torch.full((out_channels, fmt.block_bytes), 0xFF, dtype=torch.uint8)
    return torch.cat([w, poison], dim=1), weight


def make_input(gen, b, c, h, w, channels_last, dtype=torch.float32):
    """x, channels_last or else a view inside a frame of NaN two pixels wide."""
    x = torch.randn(b, c, h, w, generator=gen).to(dtype)
    if channels_last:
        return x.to(memory_format=torch.channels_last)
    frame = torch.full((b, c, h + 4, w + 4), float("nan"), dtype=dtype)
    frame[:, :, 2:-2, 2:-2] = x
    return frame[:, :, 2:-2, 2:-2]


def reference(x, weight, bias, stride, padding, dilation):
    b = None if bias is None else bias.double().cpu()
    return F.conv2d(x.double().cpu(), weight, b, stride, padding, dilation)


def triton_device(device):
    """Skip unless Triton runs on `device` here (the interpreter on CPU)."""
    reason = backends.unavailable_reason("triton", torch.device(device).type)
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every floating torch.empty comes back full of NaN: an output element a kernel leaves
    unwritten shows up."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.mark.parametrize("B,C,H,W,O,kernel,stride,padding,dilation,channels_last,has_bias", CASES)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("device", DEVICES)
def test_fp32_matches_conv2d(device, name, B, C, H, W, O, kernel, stride, padding, dilation,
                             channels_last, has_bias, gen, poisoned_outputs):
    triton_device(device)
    w, weight = make_weight(gen, name, O, C, kernel)
    x = make_input(gen, B, C, H, W, channels_last)
    bias = torch.randn(O, generator=gen) if has_bias else None
    expected = reference(x, weight, bias, pair(stride), pair(padding), pair(dilation))
    y = block_conv2d.block_conv2d_triton(name, x.to(device), w.to(device), None if bias is None else bias.to(device),
                                         pair(kernel), pair(stride), pair(padding), pair(dilation), 1)
    assert y.shape == expected.shape and y.dtype == torch.float32 and y.device.type == device
    # The output takes x's memory format (the framed NCHW views give contiguous outputs).
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert relative_error(y, expected) < TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["q5_1", "q3_k"])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_within_twice_torch_error(device, name, dtype, gen):
    triton_device(device)
    w, weight = make_weight(gen, name, 7, 6, 3)
    x = torch.randn(2, 6, 6, 5, generator=gen).to(dtype)
    bias = torch.randn(7, generator=gen)
    expected = reference(x, weight, bias, 1, 1, 1)
    torch_error = relative_error(F.conv2d(x, weight.to(dtype), bias.to(dtype), 1, 1), expected)
    y = block_conv2d.block_conv2d_triton(name, x.to(device), w.to(device), bias.to(device), (3, 3), (1, 1),
                                         (1, 1), (1, 1), 1)
    assert y.dtype == dtype
    assert relative_error(y, expected) <= 2 * torch_error + 1e-5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("device", DEVICES)
def test_registered_through_ops(device, name, gen):
    """Registered under the format's conv2d op, reached through tinykern.ops.conv2d; grouped
    convs stay unregistered (the torch backend runs them)."""
    triton_device(device)
    fmt = FORMATS[name]
    kind = torch.device(device).type
    assert backends.unavailable_reason("triton", kind, fmt.op("conv2d")) is None
    assert backends.unavailable_reason("triton", kind, fmt.op("conv2d_grouped")) is not None
    w, weight = make_weight(gen, name, 4, 3, 3)
    x = torch.randn(1, 3, 5, 5, generator=gen)
    with forced(fmt.op("conv2d"), "triton", device):
        y = ops.conv2d(x.to(device), w[:, :-fmt.block_bytes].to(device), name, 3, padding=1)
    assert relative_error(y, reference(x, weight, None, 1, 1, 1)) < TOL


def test_q4_k_keeps_its_kernel():
    from tinykern.kernels.triton import q4k_conv2d

    backends.preload("triton", ("cpu",))
    assert backends._IMPLS[("q4k_conv2d", "triton")] is q4k_conv2d.q4k_conv2d_triton


@pytest.mark.parametrize("device", DEVICES)
def test_refuses_groups(device, gen):
    triton_device(device)
    w, _ = make_weight(gen, "q8_0", 4, 2, 1)
    x = torch.randn(1, 4, 3, 3, generator=gen).to(device)
    with pytest.raises(ValueError, match="q8_0_conv2d: the triton backend supports groups=1 only"):
        block_conv2d.block_conv2d_triton("q8_0", x, w.to(device), None, (1, 1), (1, 1), (0, 0), (1, 1), 2)


def test_unknown_format_refused():
    with pytest.raises(ValueError, match="no Triton decoder"):
        block_conv2d.block_conv2d_triton("iq2_xxs", torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, dtype=torch.uint8),
                                         None, (1, 1), (1, 1), (0, 0), (1, 1), 1)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, channels_last, gen):
    triton_device(device)
    w, _ = make_weight(gen, "q5_k", 5, 4, 3)
    x = make_input(gen, 1, 4, 5, 6, channels_last).to(device)
    bias = torch.randn(5, generator=gen).to(device) if channels_last else None
    torch.library.opcheck(block_conv2d._conv2d_op, ("q5_k", x, w.to(device), bias, [3, 3], [2, 1], [1, 1], [1, 1], 1))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_matches_eager(device, gen):
    triton_device(device)
    w, _ = make_weight(gen, "q4_1", 6, 4, 3)
    w = w[:, :-FORMATS["q4_1"].block_bytes].to(device)
    x = make_input(gen, 1, 4, 5, 5, True).to(device)
    bias = torch.randn(6, generator=gen).to(device)

    def conv(x, w, bias):
        return ops.conv2d(x, w, "q4_1", 3, bias, 1, 1)

    with forced("q4_1_conv2d", "triton", device):
        eager = conv(x, w, bias)
        compiled = torch.compile(conv, fullgraph=True)(x, w, bias)
    assert compiled.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
