"""LoRA key layouts, unmerged branches vs fp32 merges, on tiny SD-shaped models."""

import copy
import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

import tinykern  # noqa: E402
from tinykern.nn import Q4Conv2d, Q4Linear, Q8Linear  # noqa: E402
from tinykern.pipelines.sd import SDQuantConfig, load_lora  # noqa: E402
from tinykern.pipelines.sd import ldm  # noqa: E402
from tinykern.pipelines.sd.layout import quantize_on  # noqa: E402
from tinykern.pipelines.sd.testing import tiny_components  # noqa: E402
from conftest import relative_error  # noqa: E402

# Linear layers, a 3x3 conv (LoRA down 3x3, up 1x1), a strided 3x3 conv, a 1x1 conv
UNET_TARGETS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
                "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2",
                "down_blocks.0.resnets.1.conv1", "down_blocks.0.downsamplers.0.conv",
                "mid_block.attentions.0.proj_in"]
TEXT_TARGETS = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"]
RANK, ALPHA = 4, 2.0


@pytest.fixture(scope="module")
def models():
    unet, text_encoder, _, _ = tiny_components(seed=1)
    return unet, text_encoder


def _lora_weights(unet, text_encoder, seed=0):
    """{(component, module): (down, up)} with float16-exact values, so the fp16 branch and the
    fp32 merge see the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for component, model, names in (("unet", unet, UNET_TARGETS), ("text_encoder", text_encoder, TEXT_TARGETS)):
        for name in names:
            layer = model.get_submodule(name)
            if isinstance(layer, torch.nn.Conv2d):
                down = torch.randn(RANK, layer.in_channels, *layer.kernel_size, generator=gen)
                up = torch.randn(layer.out_channels, RANK, 1, 1, generator=gen)
            else:
                down = torch.randn(RANK, layer.in_features, generator=gen)
                up = torch.randn(layer.out_features, RANK, generator=gen)
            weights[component, name] = ((down * 0.1).half().float(), (up * 0.1).half().float())
    return weights


def _write(weights, layout, unet_config):
    """A LoRA state dict in one of the key layouts found in the wild."""
    state = {}
    for (component, name), (down, up) in weights.items():
        text_name = "text_model." + name if component == "text_encoder" else name
        if layout == "kohya":
            key = ("lora_unet_" + name if component == "unet" else "lora_te_" + text_name).replace(".", "_")
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)})
        elif layout == "kohya_ldm":
            path = ldm.diffusers_to_ldm(name, unet_config) if component == "unet" else text_name
            key = ("lora_unet_" if component == "unet" else "lora_te_") + path.replace(".", "_")
            state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)})
        elif layout == "diffusers":
            key = f"{component}.{text_name if component == 'text_encoder' else name}"
            state.update({f"{key}.lora.down.weight": down, f"{key}.lora.up.weight": up})
        elif layout == "peft":
            key = f"{component}.{name}"
            state.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
        elif layout == "peft_base_model":
            key = f"base_model.model.{name}"
            state.update({f"{key}.lora_A.default.weight": down, f"{key}.lora_B.default.weight": up})
    return state


def _factor(layout):
    return ALPHA / RANK if layout.startswith("kohya") else 1.0


def _merged(model, weights, component, factor):
    """A copy of the dense model with the LoRA added into its weights in float32."""
    merged = copy.deepcopy(model)
    for (c, name), (down, up) in weights.items():
        if c == component:
            layer = merged.get_submodule(name)
            delta = (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
            layer.weight.data += factor * delta
    return merged


def _unet_inputs():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.tensor(500), torch.randn(2, 77, 32, generator=gen)


@torch.no_grad()
def _run_unet(unet):
    sample, t, context = _unet_inputs()
    return unet(sample, t, encoder_hidden_states=context).sample


@torch.no_grad()
def _run_text(text_encoder):
    return text_encoder(torch.arange(49400 - 77, 49400)[None]).last_hidden_state


@pytest.mark.parametrize("layout", ["kohya", "kohya_ldm", "diffusers", "peft", "peft_base_model"])
def test_each_layout_matches_dense_merge(models, layout):
    unet, text_encoder = models
    weights = _lora_weights(unet, text_encoder)
    if layout == "peft_base_model":  # one model per PEFT adapter: UNet only
        weights = {k: v for k, v in weights.items() if k[0] == "unet"}
    unet_l, text_l = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    lora = load_lora({"unet": unet_l, "text_encoder": text_l}, _write(weights, layout, unet.config))
    assert len(lora.branches) == len(weights)
    factor = _factor(layout)
    torch.testing.assert_close(_run_unet(unet_l), _run_unet(_merged(unet, weights, "unet", factor)), rtol=1e-4, atol=1e-4)
    if layout != "peft_base_model":
        torch.testing.assert_close(_run_text(text_l), _run_text(_merged(text_encoder, weights, "text_encoder", factor)),
                                   rtol=1e-4, atol=1e-4)


def test_attention_processor_layout(models):
    unet, _ = models
    name = UNET_TARGETS[1]  # attn1.to_out.0
    down, up = _lora_weights(unet, models[1])["unet", name]
    key = name.replace("attn1.to_out.0", "attn1.processor.to_out_lora")
    lora = load_lora({"unet": copy.deepcopy(unet)}, {f"{key}.down.weight": down, f"{key}.up.weight": up})
    assert list(lora.branches) == [f"unet.{name}"]


@pytest.fixture(scope="module")
def quantized(models):
    unet, text_encoder = models
    config = SDQuantConfig(min_features=0)
    q_unet, _ = quantize_on(copy.deepcopy(unet), config.unet_config(), "cpu", torch.float32)
    q_text, _ = quantize_on(copy.deepcopy(text_encoder), config.text_encoder_config(), "cpu", torch.float32)
    return q_unet, q_text


def test_merge_matches_unmerged_on_quantized(models, quantized):
    weights = _lora_weights(*models)
    state = _write(weights, "kohya", models[0].config)
    q_unet, q_text = quantized
    assert isinstance(q_unet.get_submodule(UNET_TARGETS[0]), Q4Linear)
    assert isinstance(q_unet.get_submodule(UNET_TARGETS[3]), Q4Conv2d)
    assert isinstance(q_text.get_submodule(TEXT_TARGETS[0]), Q8Linear)
    unmerged = {"unet": copy.deepcopy(q_unet), "text_encoder": copy.deepcopy(q_text)}
    merged = {"unet": copy.deepcopy(q_unet), "text_encoder": copy.deepcopy(q_text)}
    load_lora(unmerged, state)
    lora = load_lora(merged, state, merge=True)
    before = merged["unet"].get_submodule(UNET_TARGETS[3]).qweight.clone()
    a, b = _run_unet(unmerged["unet"]), _run_unet(merged["unet"])
    # Merging re-quantizes W + delta: it differs from the branch by one more Q4_K rounding.
    assert 10 * torch.log10(a.pow(2).mean() / (a - b).pow(2).mean()) > 25
    text_a, text_b = _run_text(unmerged["text_encoder"]), _run_text(merged["text_encoder"])
    assert 10 * torch.log10(text_a.pow(2).mean() / (text_a - text_b).pow(2).mean()) > 30
    assert torch.equal(before, merged["unet"].get_submodule(UNET_TARGETS[3]).qweight)
    with pytest.raises(ValueError, match="cannot be removed"):
        lora.remove()


def test_several_loras_scales_and_removal(models, quantized):
    q_unet = copy.deepcopy(quantized[0])
    base = _run_unet(q_unet)
    first = _write(_lora_weights(*models, seed=0), "peft", models[0].config)
    second = _write(_lora_weights(*models, seed=1), "kohya", models[0].config)
    a = load_lora({"unet": q_unet, "text_encoder": None}, {k: v for k, v in first.items() if k.startswith("unet.")})
    only_first = _run_unet(q_unet)
    b = load_lora({"unet": q_unet, "text_encoder": None},
                  {k: v for k, v in second.items() if k.startswith("lora_unet_")}, scale=0.5)
    both = _run_unet(q_unet)
    assert not torch.allclose(both, only_first)
    b.set_scale(0.0)
    torch.testing.assert_close(_run_unet(q_unet), only_first, rtol=1e-5, atol=1e-5)
    b.set_scale(0.5)
    torch.testing.assert_close(_run_unet(q_unet), both, rtol=0, atol=0)
    a.remove()
    b.remove()
    torch.testing.assert_close(_run_unet(q_unet), base, rtol=0, atol=0)


def test_unknown_layout_lists_keys(models):
    unet, text_encoder = models
    state = {"lora_unet_no_such_block.lora_down.weight": torch.zeros(4, 32),
             "lora_unet_no_such_block.lora_up.weight": torch.zeros(32, 4),
             "some_model.hada_w1_a": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match="3 of 3 keys") as info:
        load_lora({"unet": unet, "text_encoder": text_encoder}, state, name="odd")
    assert "lora_unet_no_such_block.lora_down.weight" in str(info.value) and "some_model.hada_w1_a" in str(info.value)


def test_shape_mismatch_is_an_error(models):
    unet, text_encoder = models
    key = "lora_unet_" + UNET_TARGETS[3].replace(".", "_")
    state = {f"{key}.lora_down.weight": torch.zeros(4, 32), f"{key}.lora_up.weight": torch.zeros(32, 4)}  # 3x3 conv
    with pytest.raises(ValueError, match="do not fit"):
        load_lora({"unet": copy.deepcopy(unet), "text_encoder": text_encoder}, state)


def _one_layer_lora(n, rank, ratio, gen):
    """A Q4_K layer (n x n, fp32), its dense source, and LoRA factors (not float16-exact) whose
    product is `ratio` of the quantized weight's norm, as a state dict for the layer "proj"."""
    dense = torch.nn.Linear(n, n)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(n, n, generator=gen) / n**0.5)
        dense.bias.copy_(torch.randn(n, generator=gen))
    weight = Q4Linear.from_linear(dense).dequantize(torch.float64)
    down, up = torch.randn(rank, n, generator=gen), torch.randn(n, rank, generator=gen)
    up *= float(ratio * weight.norm() / (up.double() @ down.double()).norm())
    state = {"text_encoder.proj.lora.down.weight": down, "text_encoder.proj.lora.up.weight": up}
    return dense, weight, up.double() @ down.double(), state


def test_unmerged_lora_in_an_fp32_model_is_exact_to_fp32(gen):
    """Against a float64 reference of x @ dequant(W).T + b + x @ (up @ down).T, the layer with
    its LoRA branch must be as close as torch's own float32 computation of the same (float16
    factors were 50-200x further off)."""
    dense, weight, delta, state = _one_layer_lora(256, 8, 0.2, gen)
    model = torch.nn.ModuleDict({"proj": Q4Linear.from_linear(dense)})
    lora = load_lora({"text_encoder": model}, state)
    assert {b.down.dtype for b in lora.branches.values()} == {torch.float32}
    x = torch.randn(32, 256, generator=gen)
    bias = dense.bias.detach()
    reference = x.double() @ (weight + delta).T + bias.double()
    down, up = state["text_encoder.proj.lora.down.weight"], state["text_encoder.proj.lora.up.weight"]
    torch_fp32 = x @ weight.float().T + bias + (x @ down.T) @ up.T
    # exact: fp32 products, as the claim is about fp32 (the default rounds x to int8 on CPU).
    with torch.no_grad(), tinykern.backend("auto", exact=True):
        ours = model["proj"](x)
    assert relative_error(ours, reference) <= 2 * relative_error(torch_fp32, reference)


def test_lora_factors_take_the_models_dtype(models):
    unet, text_encoder = models
    state = _write(_lora_weights(unet, text_encoder), "peft", unet.config)
    half = copy.deepcopy(text_encoder).half()
    lora = load_lora({"unet": copy.deepcopy(unet), "text_encoder": half}, state)
    dtypes = {key.partition(".")[0]: branch.down.dtype for key, branch in lora.branches.items()}
    assert dtypes == {"unet": torch.float32, "text_encoder": torch.float16}


def test_merge_into_q4k_changes_the_loras_effect(gen):
    """The figures in lora.py's docstring: merged into Q4_K, the LoRA's effect is off by about
    the format's error on W over ||delta|| / ||W|| (one more rounding), unmerged by float32
    rounding only."""
    ratio = 0.2
    dense, weight, delta, state = _one_layer_lora(512, 8, ratio, gen)
    x = torch.randn(64, 512, generator=gen)
    effect = x.double() @ delta.T
    base = Q4Linear.from_linear(dense)
    errors = {}
    for merge in (False, True):
        model = torch.nn.ModuleDict({"proj": Q4Linear.from_linear(dense)})
        load_lora({"text_encoder": model}, state, merge=merge)
        with torch.no_grad():
            errors[merge] = relative_error(model["proj"](x) - base(x), effect)
    format_error = relative_error(weight, dense.weight.detach())
    assert 0.5 < errors[True] / (format_error / ratio) < 2, (errors, format_error)
    assert errors[False] < 1e-5 < errors[True] / 1000, errors


def test_lora_file_path_expands_the_home_folder(models, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    unet, text_encoder = models
    save_file(_write(_lora_weights(unet, text_encoder), "kohya", unet.config), tmp_path / "style.safetensors")
    monkeypatch.setenv("HOME", str(tmp_path))
    lora = load_lora({"unet": copy.deepcopy(unet), "text_encoder": copy.deepcopy(text_encoder)}, "~/style.safetensors")
    assert lora.name == "style" and len(lora.branches) == len(UNET_TARGETS) + len(TEXT_TARGETS)
