"""tinykern.quantize_: which layers it swaps, what it reports, and how close the model stays."""

import pytest
import torch
from conftest import relative_error
from torch import nn

from tinykern import Q4Conv2d, Q4Linear, Q8Linear, QuantConfig, QuantConv2d, QuantReport, quantize_
from tinykern.quantize import quantized_modules


class Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x):
        q, k = self.to_q(x), self.to_k(x)
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.to_out(attn @ x)


class Block(nn.Module):
    """A small UNet-ish block: convs (one depthwise), a time projection, attention, a narrow
    head that min_features keeps dense, and a norm that is not a Linear at all."""

    def __init__(self, channels=32, time_dim=320):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)  # row 288
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)  # depthwise
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=2)  # row 144
        self.time_proj = nn.Linear(time_dim, channels)
        self.norm = nn.GroupNorm(4, channels)
        self.attn = Attention(channels * 4)  # 128 features
        self.small = nn.Linear(channels, channels)  # row 32 < min_features

    def forward(self, img, t):
        h = self.conv1(img) + self.time_proj(t)[:, :, None, None]
        h = self.conv2(self.dw(torch.nn.functional.gelu(self.norm(h))))
        b, c, hh, ww = h.shape
        tokens = h.reshape(b, c * 4, hh * ww // 4).transpose(1, 2)
        tokens = tokens + self.attn(tokens)
        h = tokens.transpose(1, 2).reshape(b, c, hh, ww)
        return img + self.small(h.mean((2, 3)))[:, :, None, None]


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(320, 64)

    def forward(self, img, t):
        for block in self.blocks:
            img = block(img, t)
        return img, self.head(t)


LINEAR_NAMES = [f"blocks.{i}.{n}" for i in (0, 1) for n in ("time_proj", "attn.to_q", "attn.to_k", "attn.to_out", "small")] + ["head"]
CONV_NAMES = [f"blocks.{i}.{n}" for i in (0, 1) for n in ("conv1", "dw", "conv2")]


def make_model(gen):
    model = Model()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def inputs(gen):
    return torch.randn(2, 32, 8, 8, generator=gen), torch.randn(2, 320, generator=gen)


def rows(report):
    return {r.name: r for r in report}


def test_default_config_replaces_layers_and_reports(gen):
    model = make_model(gen)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    report = quantize_(model)
    assert isinstance(report, QuantReport)
    by_name = rows(report)
    assert set(by_name) == set(LINEAR_NAMES + CONV_NAMES)  # every Linear/Conv2d, nothing else
    for i in (0, 1):
        b = model.blocks[i]
        assert type(b.conv1) is Q4Conv2d and type(b.conv2) is Q4Conv2d
        assert type(b.dw) is nn.Conv2d
        assert type(b.time_proj) is Q4Linear and type(b.attn.to_q) is Q4Linear and type(b.attn.to_out) is Q4Linear
        assert type(b.small) is nn.Linear
        assert type(b.norm) is nn.GroupNorm
    assert type(model.head) is Q4Linear

    for name, r in by_name.items():
        module = model.get_submodule(name)
        assert r.kind == ("Conv2d" if "conv" in name or "dw" in name else "Linear")
        assert r.bytes_before == weights[name].numel() * 4
        if r.format == "dense":
            assert r.bytes_after == r.bytes_before and r.rel_error is None and r.note
        else:
            assert r.format == "q4_k"
            assert r.bytes_after == module.qweight.numel()
            # The reported error is the weight's own, measured independently here.
            expected = relative_error(module.dequantize().reshape(weights[name].shape), weights[name])
            assert r.rel_error == pytest.approx(expected, rel=1e-4)
            assert 0.02 < r.rel_error < 0.1
    assert by_name["blocks.0.dw"].note == "depthwise conv"
    assert "min_features" in by_name["blocks.1.small"].note
    before, after = report.totals()
    assert before == sum(r.bytes_before for r in report) and after < before / 3
    table = str(report)
    lines = table.splitlines()
    assert "layer" in lines[0] and "format" in lines[0] and "rel err" in lines[0]
    assert len(lines) == len(report) + 2
    assert lines[-1].startswith("total") and f"{before:,}" in lines[-1] and f"{after:,}" in lines[-1]
    assert any("blocks.0.attn.to_q" in line and "q4_k" in line for line in lines)


def test_quantized_model_output_close_to_dense(gen):
    model = make_model(gen)
    img, t = inputs(gen)
    with torch.no_grad():
        ref_img, ref_head = model(img, t)
        quantize_(model)
        out_img, out_head = model(img, t)
    # The residual image path would hide errors: compare what the blocks add to it.
    assert 0 < relative_error(out_img - img, ref_img - img) < 0.1
    assert 0 < relative_error(out_head, ref_head) < 0.1


def test_skip_globs(gen):
    model = make_model(gen)
    report = quantize_(model, QuantConfig(skip=["*.attn.*", "head"]))
    by_name = rows(report)
    for i in (0, 1):
        assert type(model.blocks[i].attn.to_q) is nn.Linear
        assert by_name[f"blocks.{i}.attn.to_q"].note == "skipped by config"
        assert type(model.blocks[i].time_proj) is Q4Linear
    assert type(model.head) is nn.Linear and by_name["head"].format == "dense"


def test_overrides_q8_0_and_fp16(gen):
    model = make_model(gen)
    config = QuantConfig(overrides={"*.to_q": "q8_0", "head": "fp16", "blocks.1.conv1": "q8_0"})
    report = quantize_(model, config)
    by_name = rows(report)
    assert type(model.blocks[0].attn.to_q) is Q8Linear and by_name["blocks.0.attn.to_q"].format == "q8_0"
    assert by_name["blocks.0.attn.to_q"].rel_error < 0.01
    assert by_name["blocks.0.attn.to_q"].bytes_after == 128 * 4 * 34
    assert type(model.blocks[0].attn.to_k) is Q4Linear
    assert type(model.head) is nn.Linear and by_name["head"].note == "kept dense by override"
    # Every format has a conv: the generic QuantConv2d holds Q8_0.
    assert type(model.blocks[1].conv1) is QuantConv2d and model.blocks[1].conv1.format.name == "q8_0"
    assert by_name["blocks.1.conv1"].format == "q8_0" and by_name["blocks.1.conv1"].rel_error < 0.01
    assert type(model.blocks[0].conv1) is Q4Conv2d


def test_first_matching_override_wins(gen):
    model = make_model(gen)
    quantize_(model, QuantConfig(overrides={"*.to_q": "fp16", "*": "q8_0"}, convs=False))
    assert type(model.blocks[0].attn.to_q) is nn.Linear
    assert type(model.blocks[0].attn.to_k) is Q8Linear and type(model.head) is Q8Linear
    assert type(model.blocks[0].conv1) is nn.Conv2d


def test_weight_format_q8_0(gen):
    model = make_model(gen)
    report = quantize_(model, QuantConfig(weight="q8_0"))
    assert type(model.head) is Q8Linear
    assert rows(report)["blocks.0.conv1"].format == "q8_0"


def test_min_features(gen):
    model = make_model(gen)
    quantize_(model, QuantConfig(min_features=16))
    assert type(model.blocks[0].small) is Q4Linear  # 32 features, padded to one block
    assert model.blocks[0].small.qweight.shape == (32, 144)
    model = make_model(gen)
    report = quantize_(model, QuantConfig(min_features=300))
    assert type(model.blocks[0].conv2) is nn.Conv2d  # row 16*9 = 144
    assert type(model.blocks[0].attn.to_q) is nn.Linear  # 128
    assert type(model.blocks[0].time_proj) is Q4Linear  # 320
    assert "144" in rows(report)["blocks.0.conv2"].note


def test_convs_false_keeps_convs_dense(gen):
    model = make_model(gen)
    report = quantize_(model, QuantConfig(convs=False))
    assert all(type(model.get_submodule(n)) is nn.Conv2d for n in CONV_NAMES)
    assert all(rows(report)[n].format == "dense" for n in CONV_NAMES)


def test_convs_q4conv2d_cannot_run_stay_dense(gen):
    """A legal model whose convs Q4Conv2d cannot express (reflect padding, the asymmetric
    padding='same' of an even kernel) is still quantized: those layers stay dense, with a note."""
    model = nn.Sequential()
    model.add_module("reflect", nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect"))
    model.add_module("even_same", nn.Conv2d(16, 16, 4, padding="same"))
    model.add_module("plain", nn.Conv2d(16, 16, 3, padding=1))
    report = quantize_(model)
    by_name = rows(report)
    assert type(model.plain) is Q4Conv2d
    assert type(model.reflect) is nn.Conv2d and by_name["reflect"].format == "dense" and by_name["reflect"].note
    assert type(model.even_same) is nn.Conv2d and by_name["even_same"].format == "dense" and by_name["even_same"].note


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="unknown format 'q7_k'"):
        QuantConfig(weight="q7_k")
    with pytest.raises(ValueError, match="int4"):
        QuantConfig(overrides={"*": "int4"})


def test_skip_and_overrides_of_the_wrong_kind_are_rejected():
    with pytest.raises(ValueError, match="list of glob patterns"):
        QuantConfig(skip="*.conv_in")
    with pytest.raises(ValueError, match="must be a dict"):
        QuantConfig(overrides=[("*", "q8_0")])


def test_meta_model(gen):
    with torch.device("meta"):
        model = Model()
    report = quantize_(model)
    assert type(model.head) is Q4Linear and model.head.qweight.is_meta
    assert model.head.qweight.shape == (64, 2 * 144)
    assert all(r.rel_error is None for r in report)
    assert len(quantized_modules(model)) == sum(r.format != "dense" for r in report) == 13


@pytest.mark.parametrize("layer", ["blocks.1.attn.to_k", "blocks.0.conv1"])
def test_nan_weight_names_the_layer(layer, gen):
    model = make_model(gen)
    with torch.no_grad():
        model.get_submodule(layer).weight.view(-1)[5] = float("nan")
    with pytest.raises(ValueError, match=layer.replace(".", r"\.") + r"\.weight"):
        quantize_(model)


def test_bare_layer_is_rejected(gen):
    with pytest.raises(ValueError, match="container"):
        quantize_(nn.Linear(256, 8))


def test_quantized_modules_lists_replacements(gen):
    model = make_model(gen)
    quantize_(model)
    names = [n for n, _ in quantized_modules(model)]
    assert "head" in names and "blocks.0.conv1" in names and "blocks.0.dw" not in names


def test_refused_weight_leaves_the_model_untouched(gen):
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    with torch.no_grad():
        model[1].weight[3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"1\.weight"):
        quantize_(model)
    assert all(type(m) is nn.Linear for m in model)


def test_a_layer_shared_by_two_paths_is_quantized_once_and_replaced_at_both(gen):
    shared = nn.Linear(256, 256)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = quantize_(model)
    assert isinstance(model[0], Q4Linear) and model[0] is model[2]
    assert [r.name for r in report] == ["0"]


@pytest.mark.parametrize("layer", ["blocks.1.attn.to_out", "blocks.0.conv1"])
@pytest.mark.parametrize("what", ["weight", "bias"])
def test_weight_past_the_range_or_nan_bias_names_the_layer_and_changes_nothing(layer, what, gen):
    model = make_model(gen)
    before = dict(model.named_modules())
    with torch.no_grad():
        # 1e9 is past the range of every format (fp16 block scales).
        getattr(model.get_submodule(layer), what).view(-1)[3] = 1e9 if what == "weight" else float("nan")
    with pytest.raises(ValueError, match=layer.replace(".", r"\.") + rf"\.{what}: "):
        quantize_(model)
    assert dict(model.named_modules()) == before


class Frozen(nn.Module):
    """A parent whose `fc` cannot be replaced once built (as some wrappers guard their layers)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(256, 256)
        self.frozen = True

    def __setattr__(self, name, value):
        if name == "fc" and getattr(self, "frozen", False):
            raise TypeError("fc is frozen")
        super().__setattr__(name, value)


def test_a_failed_swap_puts_back_every_layer_and_names_it():
    model = nn.Sequential(nn.Linear(256, 256), Frozen(), nn.Linear(256, 256))
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"1\.fc \(TypeError: fc is frozen\)"):
        quantize_(model)
    assert dict(model.named_modules()) == before


class LoRALinear(nn.Linear):
    """A Linear whose forward adds a low-rank term: swapping it for Q4Linear would drop it."""

    def __init__(self, n):
        super().__init__(n, n)
        self.down = nn.Parameter(torch.zeros(4, n))

    def forward(self, x):
        return super().forward(x) + x @ self.down.T @ self.down


class WeightStandardizedConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


def test_subclasses_of_linear_and_conv_are_reported_as_skipped():
    model = nn.Sequential(LoRALinear(256), nn.Linear(256, 256), WeightStandardizedConv(32, 32, 3))
    model.attn = nn.MultiheadAttention(256, 4)  # its out_proj is a Linear subclass
    report = quantize_(model)
    by_name = rows(report)
    assert type(model[0]) is LoRALinear and type(model[2]) is WeightStandardizedConv and isinstance(model[1], Q4Linear)
    for name, cls, kind in (("0", "LoRALinear", "Linear"), ("2", "WeightStandardizedConv", "Conv2d"),
                            ("attn.out_proj", "NonDynamicallyQuantizableLinear", "Linear")):
        r = by_name[name]
        assert r.format == "dense" and r.kind == kind and r.rel_error is None and r.bytes_after == r.bytes_before
        assert r.note.startswith(f"subclass {cls} of nn.{kind}"), r.note


def test_lazy_layers_not_yet_initialized_are_reported_as_dense():
    model = nn.Sequential(nn.Linear(256, 64), nn.LazyLinear(8), nn.LazyConv2d(16, 3))
    report = quantize_(model, QuantConfig(min_features=64))
    by_name = rows(report)
    assert isinstance(model[0], Q4Linear) and type(model[1]) is nn.LazyLinear and type(model[2]) is nn.LazyConv2d
    for name, kind in (("1", "Linear"), ("2", "Conv2d")):
        r = by_name[name]
        assert (r.kind, r.format, r.bytes_before, r.bytes_after, r.rel_error) == (kind, "dense", 0, 0, None), r
        assert r.note == "lazy, not initialized"
    assert model[1](model[0](torch.randn(2, 256))).shape == (2, 8)  # the lazy layer still initializes on its first call
