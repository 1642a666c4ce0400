"""The memory planner (tinykern.memtrace, tinykern.pipelines.sd.memory), feature slicing with
operator grouping, step rehash and Q8_0 LoRA factors, on tiny SD-shaped models."""

import copy
import os

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

from tinykern import backends  # noqa: E402
from tinykern.memtrace import MemoryTrace, rounded  # noqa: E402
from tinykern.pipelines.sd import SDQuantConfig, clip_tokenizer, memory, slicing  # noqa: E402
from tinykern.pipelines.sd.pipeline import TinySDPipeline  # noqa: E402
from tinykern.pipelines.sd.testing import tiny_components, write_config_dir  # noqa: E402
from tinykern.quantize import quantize_  # noqa: E402

@pytest.fixture(autouse=True)
def exact_cpu_matmuls():
    """Sliced, rehashed and traced runs are compared with whole ones: the CPU matmuls run
    fp32-exact here, since the bf16 path rounds differently with the number of rows."""
    with backends.backend("auto", exact=True):
        yield


TINY_QUANT = SDQuantConfig(min_features=0)
SMALL = slicing.Slicing(unet_tokens=20, vae_pixels=50)


def tiny_pipeline(quantized=True, seed=0):
    unet, text_encoder, vae, scheduler = tiny_components(seed)
    if quantized:
        quantize_(unet, TINY_QUANT.unet_config())
        quantize_(text_encoder, TINY_QUANT.text_encoder_config())
    pipe = TinySDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, steps=4, size=(24, 40), guidance=7.5):
    height, width = size
    return pipe("a cat", generator=torch.Generator().manual_seed(0), num_inference_steps=steps, guidance_scale=guidance,
                height=height, width=width, output_type="latent").images


# ---------------------------------------------------------------------------------------------
# MemoryTrace: exact on models whose activations are known


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_trace_of_a_chain_is_the_hand_computed_peak(device):
    # Linear(64->256), GELU, Linear(256->32) on 3 rows, float32: nn.Sequential drops each
    # output once the next exists, so the peak is two [3, 256] tensors (3072 bytes each).
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 32)).to(device)
    x = torch.randn(3, 64, device=device) if device == "cpu" else torch.empty(3, 64, device="meta")
    with torch.no_grad(), MemoryTrace(device, {m: n for n, m in model.named_modules()}) as trace:
        y = model(x)
    assert trace.peak == 2 * 3072
    assert trace.current == rounded(3 * 32 * 4) == 512  # only y is left
    assert [a.module for a in trace.at_peak] == ["0", "1"]
    assert trace.count == 3
    del y
    assert trace.current == 0


def test_rounding_is_the_caching_allocators():
    assert [rounded(n) for n in (0, 1, 511, 512, 513, 1024, 1025)] == [0, 512, 512, 512, 1024, 1024, 1536]


def test_views_and_inplace_results_are_not_allocations():
    x = torch.empty(1000, device="meta")  # made before the trace: never counted
    with MemoryTrace("meta") as trace:
        v = x.view(10, 100).t()
        x.add_(1)
        y = x * 2  # 4000 bytes -> 4096
        z = y[::2]  # a view of y
        del y
        assert trace.current == 4096  # z keeps y's storage
        del z
    assert (trace.peak, trace.current, trace.count) == (4096, 0, 1)
    del v


@pytest.mark.parametrize("sliced", [False, True], ids=["unsliced", "sliced"])
def test_meta_trace_equals_a_real_cpu_run(sliced):
    """The same trace on a real CPU run of the tiny Q4_K UNet (CFG batch 2, odd latent size)
    and on its meta-device copy, with the CPU kernels modelled on meta: byte for byte."""
    unet, _, vae, _ = tiny_components()
    quantize_(unet, TINY_QUANT.unet_config())
    results = []
    for device in ("cpu", "meta"):
        model = unet if device == "cpu" else copy.deepcopy(unet).to("meta")
        slicing.enable(model, vae, SMALL if sliced else None)
        make = (lambda *s: torch.randn(*s)) if device == "cpu" else (lambda *s: torch.empty(*s, device="meta"))
        x, context, t = make(2, 4, 13, 11), make(2, 77, 32), torch.tensor(500, device=device)
        names = {m: n for n, m in model.named_modules()}
        with (torch.no_grad(), backends.meta_implementations(memory.kernel_models("cpu")), memory.AttentionModel("cpu"),
              MemoryTrace(device, names) as trace):
            out = model(x, t, encoder_hidden_states=context).sample
            del out
        results.append((trace.peak, trace.count, [(a.module, a.shape, a.nbytes) for a in trace.at_peak]))
        slicing.enable(model, vae, None)
    assert results[0] == results[1]
    assert results[0][0] > 0


# ---------------------------------------------------------------------------------------------
# The planner


@pytest.fixture(scope="module")
def meta_tiny(tmp_path_factory):
    folder = write_config_dir(tmp_path_factory.mktemp("sdmem") / "config", *tiny_components())
    return folder


def test_plan_books_every_weight_once_rounded(meta_tiny):
    pipe = memory.meta_pipeline(meta_tiny, quantize=TINY_QUANT)
    plan = memory.plan(pipe, 64, 48, guidance=7.5)
    expected = sum(rounded(t.numel() * t.element_size()) for t in [*pipe.unet.parameters(), *pipe.unet.buffers()])
    assert plan.weights["unet"] == expected
    decoder = [*pipe.vae.decoder.parameters(), *pipe.vae.post_quant_conv.parameters()]
    assert plan.weights["vae decoder"] == sum(rounded(t.numel() * t.element_size()) for t in decoder)
    assert plan.peak == plan.weight_bytes + plan.peak_phase.peak + sum(plan.workspace.values())
    assert [p.name for p in plan.phases] == list(memory.PHASES)
    assert "predicted peak allocated" in plan.report()


def test_a_saved_folder_is_planned_in_its_own_layout(tmp_path):
    """`sd quantize --weight q8_0 --override ...` folders: the planner builds the modules the
    files record (headers only), not the default Q4_K layout."""
    from tinykern.pipelines.sd import load_pipeline, save_pipeline
    from tinykern.pipelines.sd.testing import write_diffusers_folder

    write_diffusers_folder(tmp_path / "diffusers", *tiny_components())
    layout = SDQuantConfig(unet="q8_0", text_encoder="q5_k", min_features=0, unet_overrides={"*.ff.net.*": "q3_k"})
    pipe = load_pipeline(tmp_path / "diffusers", device="cpu", quantize=layout)
    save_pipeline(pipe, tmp_path / "saved")
    planned = memory.meta_pipeline(tmp_path / "saved", quantize=True)
    for part in ("unet", "text_encoder"):
        real = {n: (type(m).__name__, getattr(m, "format", None)) for n, m in getattr(pipe, part).named_modules()}
        meta = {n: (type(m).__name__, getattr(m, "format", None)) for n, m in getattr(planned, part).named_modules()}
        assert meta == real, part
    assert any(m.format.name == "q3_k" for m in planned.unet.modules() if hasattr(m, "format"))


def test_plan_sees_the_options_that_change_memory(meta_tiny):
    pipe = memory.meta_pipeline(meta_tiny, quantize=TINY_QUANT)
    base = memory.plan(pipe, 256, 256, guidance=7.5)
    pipe.enable_sequential_cfg()
    sequential = memory.plan(pipe, 256, 256, guidance=7.5)
    pipe.enable_sequential_cfg(False)
    pipe.enable_slicing(slicing.Slicing(unet_tokens=64, vae_pixels=256))
    sliced = memory.plan(pipe, 256, 256, guidance=7.5)
    assert sequential.phase("denoise").peak < base.phase("denoise").peak
    assert sliced.phase("denoise").peak < base.phase("denoise").peak
    assert sliced.phase("decode").peak < base.phase("decode").peak
    pipe.load_lora(memory.synthetic_lora(pipe, 4))
    with_lora = memory.plan(pipe, 64, 64, guidance=7.5)
    assert with_lora.weights["lora branches"] > 0


def test_math_attention_books_the_score_matrix(meta_tiny):
    pipe = memory.meta_pipeline(meta_tiny, quantize=TINY_QUANT)
    flash = memory.plan(pipe, 64, 64, guidance=7.5, attention="flash")
    math = memory.plan(pipe, 64, 64, guidance=7.5, attention="math")
    assert math.phase("denoise").peak > flash.phase("denoise").peak


def test_cuda_backend_books_the_dequantized_weight(meta_tiny):
    pipe = memory.meta_pipeline(meta_tiny, quantize=TINY_QUANT)
    triton = memory.plan(pipe, 64, 64, guidance=0, backend="triton")
    cuda = memory.plan(pipe, 64, 64, guidance=0, backend="cuda")
    assert cuda.phase("denoise").peak > triton.phase("denoise").peak


# ---------------------------------------------------------------------------------------------
# Feature slicing with operator grouping: the unsliced results up to float rounding


@pytest.mark.parametrize("size, quantized", [((16, 16), False), ((13, 11), False), ((13, 11), True)],
                         ids=["even", "odd", "odd-q4k"])
def test_sliced_unet_equals_unsliced(size, quantized):
    pipe = tiny_pipeline(quantized)
    torch.manual_seed(1)
    x, context, t = torch.randn(2, 4, *size), torch.randn(2, 77, 32), torch.tensor(700)  # CFG: batch 2
    with torch.no_grad():
        expected = pipe.unet(x, t, encoder_hidden_states=context).sample
        pipe.enable_slicing(SMALL)
        actual = pipe.unet(x, t, encoder_hidden_states=context).sample
        pipe.enable_slicing(None)
        again = pipe.unet(x, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(again, expected)  # disabling restores the plain blocks


@pytest.mark.parametrize("recompute", [False, True], ids=["grouped", "recomputed"])
@pytest.mark.parametrize("pixels", [1, 50, 4096])
@pytest.mark.parametrize("size", [(16, 16), (13, 11)], ids=["even", "odd"])
def test_sliced_vae_decoder_equals_unsliced(recompute, pixels, size):
    pipe = tiny_pipeline(False)
    z = torch.randn(1, 4, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = pipe.vae.decode(z).sample
        pipe.enable_slicing(slicing.Slicing(unet_tokens=20, vae_pixels=pixels, vae_recompute=recompute))
        actual = pipe.vae.decode(z).sample
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_pipeline_with_slicing_gives_the_same_latents():
    pipe = tiny_pipeline()
    expected = latents(pipe, steps=2, size=(16, 24))
    pipe.enable_slicing(slicing.Slicing(unet_tokens=64, vae_pixels=64))
    assert pipe.slicing == slicing.Slicing(unet_tokens=64, vae_pixels=64)
    torch.testing.assert_close(latents(pipe, steps=2, size=(16, 24)), expected, rtol=1e-4, atol=1e-4)


def test_slicing_runs_the_sliced_blocks():
    """Every resnet, transformer and upsampler of the UNet and the VAE decoder takes the
    sliced path (their unsliced norm is never called on a whole feature map)."""
    pipe = tiny_pipeline(False)
    pipe.enable_slicing(SMALL)
    whole = []
    for module in [*pipe.unet.modules(), *pipe.vae.decoder.modules()]:
        if isinstance(module, nn.GroupNorm):
            module.register_forward_hook(lambda m, a, o: whole.append(m))
    with torch.no_grad():
        pipe.unet(torch.randn(2, 4, 8, 8), torch.tensor(1), encoder_hidden_states=torch.randn(2, 77, 32))
        pipe.vae.decode(torch.randn(1, 4, 8, 8))
    # Left whole: the VAE's mid-block attention norm and the UNet's norm_out (latent size, 320 channels).
    unsliced = {id(m) for m in pipe.vae.decoder.mid_block.attentions.modules()} | {id(pipe.unet.conv_norm_out)}
    assert [m for m in whole if id(m) not in unsliced] == []


def test_parse_slice():
    assert slicing.parse("off") is None
    assert slicing.parse("on") == slicing.Slicing()
    assert slicing.parse("unet=512,vae=1024") == slicing.Slicing(512, 1024)
    with pytest.raises(ValueError, match="unet=TOKENS"):
        slicing.parse("rows=3")


# ---------------------------------------------------------------------------------------------
# Step rehash


@pytest.mark.parametrize("sequential", [False, True], ids=["batched", "sequential-cfg"])
def test_rehash_1_is_the_plain_run(sequential):
    pipe = tiny_pipeline()
    pipe.enable_sequential_cfg(sequential)
    expected = latents(pipe, size=(16, 16))
    pipe.enable_rehash(1)
    assert torch.equal(latents(pipe, size=(16, 16)), expected)
    hook = pipe.unet._tinykern_rehash
    assert hook.partial_steps == 0 and hook.full_steps > 0


def test_rehash_reuses_deep_features_between_full_steps():
    pipe = tiny_pipeline()
    expected = latents(pipe, steps=6, size=(16, 16))
    pipe.enable_rehash(3)
    actual = latents(pipe, steps=6, size=(16, 16))
    hook = pipe.unet._tinykern_rehash
    steps = hook.full_steps + hook.partial_steps
    assert hook.full_steps == -(-steps // 3) and hook.partial_steps > 0
    relative = ((actual - expected).norm() / expected.norm()).item()
    assert 0 < relative < 0.2
    # The same run again: reset at each call, so the same result.
    assert torch.equal(latents(pipe, steps=6, size=(16, 16)), actual)
    pipe.enable_sequential_cfg()
    torch.testing.assert_close(latents(pipe, steps=6, size=(16, 16)), actual, rtol=1e-3, atol=1e-3)
    pipe.enable_rehash(None)
    assert pipe.rehash is None


def test_rehash_outer_blocks_cost_less(meta_tiny):
    pipe = memory.meta_pipeline(meta_tiny, quantize=False)
    half = dict(device="meta", dtype=torch.float16)
    x, context, t = torch.empty(2, 4, 16, 16, **half), torch.empty(2, 77, 32, **half), torch.tensor(1, device="meta")
    deep = torch.empty(2, 64, 16, 16, **half)
    from tinykern.pipelines.sd.rehash import unet_flops

    assert 0 < unet_flops(pipe.unet, x, t, context, deep=deep) < unet_flops(pipe.unet, x, t, context)


# ---------------------------------------------------------------------------------------------
# LoRA factors in Q8_0


def factor_bytes(pipe):
    return sum(t.numel() * t.element_size() for lora in pipe.loras for b in lora.branches.values() for t in b.buffers())


def test_q8_lora_is_close_to_the_fp_lora_in_a_third_of_the_bytes():
    pipe = tiny_pipeline()
    state = memory.synthetic_lora(pipe, 32, device="cpu", dtype=torch.float32)  # rows of whole Q8_0 blocks
    dense = pipe.load_lora(state)
    dense_bytes = factor_bytes(pipe)
    q8 = pipe.load_lora(state, factor_format="q8_0")
    assert factor_bytes(pipe) - dense_bytes < 0.3 * dense_bytes  # float32 factors here: 4 bytes a weight against 34/32
    generator = torch.Generator().manual_seed(3)
    for key, branch in dense.branches.items():
        features = branch.down.shape[1]
        x = torch.randn(2, features, 6, 6, generator=generator) if branch.conv else torch.randn(5, features, generator=generator)
        expected, actual = branch(x), q8.branches[key](x)
        assert (actual - expected).norm() < 0.02 * expected.norm(), key  # Q8_0 rounds each factor by ~0.3%
        torch.testing.assert_close(q8.branches[key].delta(), branch.delta(), rtol=0.05, atol=0.02 * branch.delta().abs().max().item())
    pipe.remove_loras()
    assert pipe.loras == []


def test_q8_factor_format_is_checked():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="factor_format"):
        pipe.load_lora(memory.synthetic_lora(pipe, 2, device="cpu"), factor_format="q4_k")


@pytest.mark.parametrize("layers", [None, 1, 2])
def test_outer_blocks_on_their_own_steps_features_give_the_full_step(layers):
    """The partial step's code, fed the deep features its own full step kept, is the full step."""
    from tinykern.pipelines.sd import rehash

    pipe = tiny_pipeline(False)
    hook = rehash.enable(pipe.unet, 2, layers)
    torch.manual_seed(4)
    x, context, t = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32), torch.tensor(300)
    with torch.no_grad():
        full = pipe.unet(x, t, encoder_hidden_states=context).sample
        outer = rehash.outer_forward(pipe.unet, x, t, context, hook.cache[0][0], layers=layers)
    torch.testing.assert_close(outer, full, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Command line


def _cli(*argv):
    import argparse

    from tinykern.pipelines.sd import cli

    parser = argparse.ArgumentParser(prog="tinykern")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sd", *map(str, argv)])
    args.func(args)


def test_cli_memory_prints_the_plan(meta_tiny, tmp_path, capsys):
    out = tmp_path / "plan.json"
    _cli("memory", "--model", meta_tiny, "--size", "64x48", "--guidance", "7.5", "--lora-rank", "4",
         "--lora-format", "q8_0", "--slice", "unet=16,vae=64", "--rehash", "3", "--json", out)
    text = capsys.readouterr().out
    for part in ("weights (resident on the GPU)", "lora branches", "largest activations in denoise",
                 "cuBLAS workspace", "predicted peak allocated"):
        assert part in text
    import json

    plan = json.loads(out.read_text())
    assert plan["settings"]["rehash"] == 3 and plan["weights"]["lora branches"] > 0


def test_cli_memory_refuses_a_bad_slice(meta_tiny, capsys):
    with pytest.raises(SystemExit) as e:
        _cli("memory", "--model", meta_tiny, "--slice", "rows=2")
    assert e.value.code == 2
    assert "--slice" in capsys.readouterr().err


def test_cli_generate_with_slicing_and_rehash(tmp_path, capsys):
    from tinykern.pipelines.sd.testing import write_diffusers_folder

    folder = write_diffusers_folder(tmp_path / "model", *tiny_components())
    out = tmp_path / "image.png"
    _cli("generate", "--model", folder, "--prompt", "a cat", "--steps", "3", "--size", "16x16", "--device", "cpu",
         "--dense", "--slice", "on", "--rehash", "2", "--out", out)
    assert out.exists()
    assert "16x16" in capsys.readouterr().out
