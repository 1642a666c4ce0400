"""SD1.5 in the low-VRAM layout: component bytes (always, from the real architecture built on
the meta device) and, on a GPU, a full 512x512 generation with random weights: peak VRAM and
seconds per step against diffusers in fp16 on the same GPU.

    python -m pytest bench/bench_sd.py --benchmark-only -rs   # with the other benchmarks
    python bench/bench_sd.py [--steps 20]                     # standalone; GPU figures -> bench/results/
    python bench/bench_sd.py --gpu                            # issue #20's bar on a GPU -> bench/results/
    python bench/bench_sd.py --cpu-rehash [--repeats 3]       # step rehash on the CPU -> bench/results/
    python bench/bench_sd.py --layouts                        # UNet size and SQNR per format layout -> bench/results/

--gpu: SD1.5 at 512x512, 25 steps, CFG 7.5, a rank-64 LoRA (Q8_0 factors, unmerged) on every
UNet and text-encoder Linear and Conv, VAE on the GPU, slicing on: torch.cuda.max_memory_allocated
against the memory planner's prediction, then the same run with step rehash 3 (UNet time
ratio), then peak memory without slicing / with diffusers' per-operator chunking / with
tinykern's slicing and grouping at 512 and 1024.
--layouts: the full-size UNet with diffusers' random initialization on the CPU, fixed inputs
(latent 1x4x32x32, one timestep, a random text context): the UNet's bytes and its output's SQNR
against the fp16 UNet for each uniform format and for mixed layouts (QuantConfig.overrides), and
the smallest layout whose SQNR is within 3 dB of uniform Q4_K.
--cpu-rehash: the full-size Q4_K UNet (random weights) at 256x256, CFG batch 2, 25 DDIM steps,
full and rehash runs interleaved: medians and spread of the UNet wall time, the final latent's
relative difference, and the UNet FLOPs saved (counted on the meta device).
"""

import json
import os
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from tinykern.pipelines.sd import SDQuantConfig, TinySDPipeline, clip_tokenizer, make_scheduler, sd15_config_dir  # noqa: E402
from tinykern.pipelines.sd.layout import move, quantize_on  # noqa: E402
from tinykern.formats import FORMATS  # noqa: E402
from tinykern.quantize import quantize_  # noqa: E402

UNET_TARGET_BYTES = 0.5e9
VRAM_TARGET_BYTES = 1.0e9
SPEED_TARGET = 1.1  # tinykern s/step over diffusers fp16 s/step
RESULTS = Path(__file__).parent / "results"


def _configs():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    root = sd15_config_dir()
    return (UNet2DConditionModel.load_config(root / "unet"), CLIPTextConfig.from_pretrained(root / "text_encoder"),
            AutoencoderKL.load_config(root / "vae"), json.loads((root / "scheduler" / "scheduler_config.json").read_text()))


def _build(device, dtype=torch.float16):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet_config, text_config, vae_config, _ = _configs()
    with torch.device(device):
        return (move(UNet2DConditionModel.from_config(unet_config), device, dtype),
                move(CLIPTextModel(text_config), device, dtype), move(AutoencoderKL.from_config(vae_config), device, dtype))


def _bytes(module):
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def sizes():
    """Bytes of each component, dense fp16 and in the low-VRAM layout (UNet and text encoder
    quantized, norms/embeddings/biases in fp16), and the UNet's bytes in each format's uniform
    layout (unet_<format>), computed on the meta device."""
    unet, text_encoder, vae = _build("meta")
    layout = SDQuantConfig()
    result = {"unet_fp16": _bytes(unet), "text_encoder_fp16": _bytes(text_encoder), "vae_decoder_fp16": _bytes(vae.decoder)}
    for fmt in FORMATS:
        copy = _build("meta")[0]
        quantize_(copy, SDQuantConfig(unet=fmt).unet_config())
        result[f"unet_{fmt}"] = _bytes(copy)
    quantize_(unet, layout.unet_config())
    quantize_(text_encoder, layout.text_encoder_config())
    result.update(unet_tinykern=_bytes(unet), text_encoder_tinykern=_bytes(text_encoder))
    return result


# Mixed layouts for --layouts: {label: (uniform format, {UNet module glob: format})}. The groups:
# the GEGLU feed-forwards hold 40% of the UNet's weights, the resnet convs 45%; the attention
# projections, proj_in/out, the samplers' convs and the time embeddings the rest.
FEED_FORWARD = "*.ff.net.*"
ATTENTION = "*.attn[12].*"
RESNET_CONVS = "*.resnets.*.conv[12]"
LAYOUTS = {
    "q3_k, feed-forward q2_k": ("q3_k", {FEED_FORWARD: "q2_k"}),
    "q3_k, resnet convs q2_k": ("q3_k", {RESNET_CONVS: "q2_k"}),
    "q3_k, attention q4_k": ("q3_k", {ATTENTION: "q4_k"}),
    "q2_k, attention q4_k": ("q2_k", {ATTENTION: "q4_k"}),
    "q2_k, resnet convs q4_k": ("q2_k", {RESNET_CONVS: "q4_k"}),
    "q2_k, resnet convs q4_k, attention q3_k": ("q2_k", {RESNET_CONVS: "q4_k", ATTENTION: "q3_k"}),
    "q3_k, resnet convs q4_k, feed-forward q2_k": ("q3_k", {RESNET_CONVS: "q4_k", FEED_FORWARD: "q2_k"}),
    "q4_k, resnet convs q3_k": ("q4_k", {RESNET_CONVS: "q3_k"}),
    "q4_k, feed-forward q3_k": ("q4_k", {FEED_FORWARD: "q3_k"}),
    "q4_k, feed-forward q2_k": ("q4_k", {FEED_FORWARD: "q2_k"}),
    "q4_0, feed-forward q3_k": ("q4_0", {FEED_FORWARD: "q3_k"}),
    "q4_k, feed-forward and attention q2_k": ("q4_k", {FEED_FORWARD: "q2_k", ATTENTION: "q2_k"}),
    "q4_k, feed-forward q2_k, attention q3_k": ("q4_k", {FEED_FORWARD: "q2_k", ATTENTION: "q3_k"}),
}


def _sqnr_db(reference, approx):
    return (10 * torch.log10(reference.double().pow(2).sum() / (approx - reference).double().pow(2).sum())).item()


def layouts_cpu(size=256, seed=0):
    """UNet bytes and output SQNR (dB, vs the fp16 UNet) of every uniform format and of LAYOUTS,
    on the full-size UNet with diffusers' random initialization, fixed inputs. Each format
    quantizes every layer once; a layout swaps the quantized layers it names into the UNet."""
    from tinykern import backends
    from tinykern.bench import machine
    from tinykern.quantize import QuantConfig, _replace

    torch.manual_seed(seed)  # diffusers' random initialization draws from the global generator
    unet, _, _ = _build("cpu", torch.float32)
    unet.eval()
    with torch.no_grad():  # the reference: fp16 weights, computed in fp32
        for p in unet.parameters():
            p.copy_(p.half().float())
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, size // 8, size // 8, generator=gen)
    context = torch.randn(1, 77, 768, generator=gen)

    def forward():
        # fp32-exact CPU matmuls: the SQNR is the formats', not the bf16 path's.
        with torch.inference_mode(), backends.backend("auto", exact=True):
            return unet(sample, 500, encoder_hidden_states=context).sample

    reference = forward()
    base = SDQuantConfig().unet_config()
    selected = {name: m for name, m in unet.named_modules()
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and base.format_for(name, m)[0] is not None}
    needed = sorted({fmt for uniform, overrides in [(f, {}) for f in FORMATS] + list(LAYOUTS.values())
                     for fmt in (uniform, *overrides.values())})
    quantized, quantize_seconds = {}, {}
    for fmt in needed:
        if FORMATS[fmt].quantize is None:
            continue
        start = time.perf_counter()
        record = FORMATS[fmt]
        quantized[fmt] = {name: (record.conv_class.from_conv(m, name, format=fmt) if isinstance(m, torch.nn.Conv2d)
                                 else record.linear_class.from_linear(m, name, format=fmt)) for name, m in selected.items()}
        quantize_seconds[fmt] = time.perf_counter() - start

    def run(uniform, overrides):
        config = QuantConfig(weight=uniform, overrides=overrides)
        chosen = {name: config.format_for(name, m)[0] or uniform for name, m in selected.items()}
        for name, fmt in chosen.items():
            _replace(unet, name, quantized[fmt][name])
        try:
            out = forward()
            nbytes = _bytes(unet)
        finally:
            for name, m in selected.items():
                _replace(unet, name, m)
        return {"uniform": uniform, "overrides": overrides, "unet_bytes": nbytes, "sqnr_db": _sqnr_db(reference, out),
                "layers_per_format": {f: sum(1 for c in chosen.values() if c == f) for f in sorted(set(chosen.values()))}}

    rows = {f"{fmt} (uniform)": run(fmt, {}) for fmt in quantized}
    rows.update({label: run(uniform, overrides) for label, (uniform, overrides) in LAYOUTS.items()
                 if all(f in quantized for f in (uniform, *overrides.values()))})
    floor = rows["q4_k (uniform)"]["sqnr_db"] - 3
    within = {label: r for label, r in rows.items() if r["sqnr_db"] >= floor}
    smallest = min(within, key=lambda label: within[label]["unet_bytes"])
    return {"size": size, "seed": seed, "rows": rows, "sqnr_floor_db": floor, "smallest_within_3db": smallest,
            "smallest_bytes": within[smallest]["unet_bytes"], "quantize_seconds": quantize_seconds,
            "cpu": machine.device_name("cpu"), "threads": torch.get_num_threads(), "versions": machine.versions(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _random_pipeline(quantized, vae_on_gpu=False):
    """SD1.5 with diffusers' random initialization: tinykern's layout (quantized on the GPU block
    by block, VAE on the CPU, or its decoder on the GPU) or diffusers' fp16 everything-on-GPU."""
    unet, text_encoder, vae = _build("cpu", torch.float32)
    layout = SDQuantConfig() if quantized else SDQuantConfig(None, None)
    quantize_on(unet, layout.unet_config(), "cuda", torch.float16)
    quantize_on(text_encoder, layout.text_encoder_config(), "cuda", torch.float16)
    move(vae, "cpu" if quantized else "cuda", torch.float32 if quantized else torch.float16)
    if quantized and vae_on_gpu:
        move(vae.decoder, "cuda", torch.float16)
        move(vae.post_quant_conv, "cuda", torch.float16)
    scheduler = make_scheduler("ddim", _configs()[3])
    pipe = TinySDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _timed_generation(pipe, call):
    """Run `pipe` once on a fixed prompt with fresh peak-memory statistics: (start time, the
    time each denoising step ended), synchronized with the GPU."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ends = []

    def on_step_end(pipe_, step, timestep, kwargs):
        torch.cuda.synchronize()
        ends.append(time.perf_counter())
        return kwargs

    start = time.perf_counter()
    pipe("a photo of an astronaut riding a horse", callback_on_step_end=on_step_end, **call)
    return start, ends


def generation(quantized, steps=20):
    """Peak VRAM (bytes) and seconds per denoising step of one 512x512 image with CFG."""
    pipe = _random_pipeline(quantized)
    call = dict(num_inference_steps=steps, guidance_scale=7.5, height=512, width=512, output_type="np")
    pipe("warm-up", **{**call, "num_inference_steps": 2})
    _, ends = _timed_generation(pipe, call)
    result = {"peak_vram_bytes": torch.cuda.max_memory_allocated(), "s_per_step": (ends[-1] - ends[0]) / (len(ends) - 1),
              "steps": steps}
    del pipe
    torch.cuda.empty_cache()
    return result


def test_sd15_component_bytes(benchmark, note):
    benchmark.group = "sd15"
    result = benchmark.pedantic(sizes, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    note(f"SD1.5 UNet {result['unet_fp16'] / 1e6:.0f} MB fp16 -> {result['unet_tinykern'] / 1e6:.0f} MB "
         f"(target {UNET_TARGET_BYTES / 1e6:.0f} MB); text encoder {result['text_encoder_fp16'] / 1e6:.0f} MB -> "
         f"{result['text_encoder_tinykern'] / 1e6:.0f} MB; VAE decoder {result['vae_decoder_fp16'] / 1e6:.0f} MB fp16 (CPU)")
    assert result["unet_tinykern"] <= UNET_TARGET_BYTES


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak VRAM and s/step need a CUDA GPU; unmeasured here")
def test_sd15_generation_512(benchmark, note):
    benchmark.group = "sd15"
    ours = benchmark.pedantic(generation, args=(True,), rounds=1, iterations=1)
    theirs = generation(False)
    benchmark.extra_info.update(tinykern=ours, diffusers_fp16=theirs, device=torch.cuda.get_device_name())
    note(f"SD1.5 512x512 CFG: tinykern {ours['peak_vram_bytes'] / 1e9:.2f} GB peak, {ours['s_per_step']:.3f} s/step; "
         f"diffusers fp16 {theirs['peak_vram_bytes'] / 1e9:.2f} GB, {theirs['s_per_step']:.3f} s/step")


# ---------------------------------------------------------------------------------------------
# Issue #20: memory planner, slicing, rehash


def chunk_feed_forward(unet, tokens=64):
    """diffusers' per-operator slicing: every feed-forward in chunks of `tokens` (64 divides
    every SD level's token count at 512 and 1024), outputs concatenated whole."""
    for module in unet.modules():
        if hasattr(module, "set_chunk_feed_forward"):
            module.set_chunk_feed_forward(tokens, 1)


def planned(lora_rank=64, slicing=True, size=512, guidance=7.5, rehash=None, chunking=False, lora_format="q8_0",
            vae_on_gpu=True):
    """The memory planner's MemoryPlan of SD1.5 in tinykern's layout (meta device)."""
    from tinykern.pipelines.sd import memory

    pipe = memory.planned_pipeline(vae_on_gpu=vae_on_gpu, lora_rank=lora_rank, slicing=slicing, rehash=rehash,
                                   factor_format=None if lora_format == "fp16" else lora_format)
    if chunking:
        chunk_feed_forward(pipe.unet)
    return memory.plan(pipe, size, size, guidance)


def rehash_flops(size=512, steps=25, interval=3, layers=None):
    """UNet FLOPs of `steps` CFG steps (batch 2) at size x size, full and with step rehash
    (recomputing the whole last up block, or its last `layers` resnets)."""
    from tinykern.pipelines.sd.rehash import unet_flops

    unet, _, _ = _build("meta", torch.float16)
    latent = size // 8
    x = torch.empty(2, 4, latent, latent, device="meta", dtype=torch.float16)
    context = torch.empty(2, 77, 768, device="meta", dtype=torch.float16)
    t = torch.tensor(999, device="meta")
    last = unet.up_blocks[-1]
    k = min(layers or len(last.resnets), len(last.resnets))
    channels = (last.resnets[0].in_channels - unet.config.block_out_channels[0] if k == len(last.resnets)
                else last.resnets[len(last.resnets) - k - 1].out_channels)
    deep = torch.empty(2, channels, latent, latent, device="meta", dtype=torch.float16)
    full, outer = unet_flops(unet, x, t, context), unet_flops(unet, x, t, context, deep=deep, layers=layers)
    full_steps = -(-steps // interval)
    total = full * steps
    rehashed = full * full_steps + outer * (steps - full_steps)
    return {"size": size, "steps": steps, "interval": interval, "layers": layers, "full_step_flops": full,
            "outer_step_flops": outer,
            "full_steps": full_steps, "saved_fraction": 1 - rehashed / total}


def _random_q4k_unet():
    """The full-size UNet in tinykern's layout on the CPU with random weights, built without the
    CPU quantizer (minutes at this size): every packed row holds valid Q4_K blocks of a Gaussian
    (the same 64 blocks tiled), dense weights are Gaussian, norms 1 and 0."""
    from diffusers import UNet2DConditionModel

    from tinykern.formats import q4k

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_configs()[0])
    quantize_(unet, SDQuantConfig().unet_config())
    unet = unet.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    blocks = q4k.quantize(torch.randn(64, q4k.BLOCK, generator=gen) * 0.02)
    with torch.no_grad():
        for name, tensor in [*unet.named_parameters(), *unet.named_buffers()]:
            if tensor.dtype == torch.uint8:
                rows = tensor.view(-1, q4k.BLOCK_BYTES)
                rows.copy_(blocks.repeat(-(-rows.shape[0] // 64), 1)[:rows.shape[0]])
            elif "norm" in name:
                tensor.fill_(1.0 if name.endswith("weight") else 0.0)
            elif tensor.is_floating_point():
                tensor.normal_(0, 0.02, generator=gen)
    return unet


def rehash_cpu(size=256, steps=25, interval=3, repeats=3, guidance=7.5):
    """Wall time of the full-size Q4_K UNet's `steps` DDIM steps with CFG on the CPU, full and
    with step rehash, runs interleaved (full, rehash, full, ...): medians, spread, latents."""
    from tinykern.bench import machine
    from tinykern.pipelines.sd import rehash

    unet = _random_q4k_unet()
    scheduler = make_scheduler("ddim", _configs()[3])
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(2, 77, 768, generator=gen)
    start = torch.randn(1, 4, size // 8, size // 8, generator=gen)

    def run(interval_):
        hook = rehash.enable(unet, interval_)
        scheduler.set_timesteps(steps)
        latents = start * scheduler.init_noise_sigma
        seconds = 0.0
        with torch.no_grad():
            for t in scheduler.timesteps:
                t0 = time.perf_counter()
                noise = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample
                seconds += time.perf_counter() - t0
                uncond, cond = noise.chunk(2)
                latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
        counts = (hook.full_steps, hook.partial_steps) if hook else (steps, 0)
        rehash.enable(unet, None)
        return seconds, latents, counts

    full, hashed = [], []
    for _ in range(repeats):
        full.append(run(None))
        hashed.append(run(interval))
    f, h = sorted(r[0] for r in full), sorted(r[0] for r in hashed)
    ref, approx = full[0][1], hashed[0][1]
    return {"size": size, "steps": steps, "interval": interval, "repeats": repeats, "guidance": guidance,
            "full_s": f, "rehash_s": h, "full_median_s": f[len(f) // 2], "rehash_median_s": h[len(h) // 2],
            "ratio_median": h[len(h) // 2] / f[len(f) // 2], "full_and_partial_steps": hashed[0][2],
            "latent_relative_difference": ((approx - ref).norm() / ref.norm()).item(),
            "latents_finite": bool(torch.isfinite(ref).all() and torch.isfinite(approx).all()),
            "cpu": machine.device_name("cpu"), "threads": torch.get_num_threads(), "loadavg_after": os.getloadavg(),
            "versions": machine.versions(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def gpu_bar(steps=25, lora_rank=64, size=512):
    """Issue #20's bar on the GPU: peak allocated (measured and predicted) and UNet seconds,
    full and with rehash 3."""
    from tinykern.pipelines.sd import memory

    pipe = _random_pipeline(True, vae_on_gpu=True)
    pipe.load_lora(memory.synthetic_lora(pipe, lora_rank, device="cpu"), factor_format="q8_0")
    pipe.enable_slicing(True)
    call = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, output_type="np")
    pipe("warm-up", **{**call, "num_inference_steps": 2})
    result = {}
    for label, interval, layers in (("full", None, None), ("rehash3", 3, None), ("rehash3_layers2", 3, 2)):
        pipe.enable_rehash(interval, layers)
        t0, ends = _timed_generation(pipe, call)
        torch.cuda.synchronize()
        result[label] = {"peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                         "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
                         "denoise_s": ends[-1] - t0, "total_s": time.perf_counter() - t0}
    predicted = planned(lora_rank, True, size)
    result["predicted_peak_bytes"] = predicted.peak
    result["predicted"] = predicted.to_json()
    result["unet_time_ratio_rehash3"] = result["rehash3"]["denoise_s"] / result["full"]["denoise_s"]
    result["unet_time_ratio_rehash3_layers2"] = result["rehash3_layers2"]["denoise_s"] / result["full"]["denoise_s"]
    del pipe
    torch.cuda.empty_cache()
    return result


CONFIGS = {"no slicing": dict(slicing=None), "slicing (per operator)": dict(slicing=None, chunking=True),
           "slicing + grouping": dict(slicing=True)}


def gpu_configs(steps=2, sizes=(512, 1024)):
    """Measured peak allocated per configuration (no LoRA, CFG, VAE decoder on the GPU)."""
    out = {}
    for size in sizes:
        for label, options in CONFIGS.items():
            pipe = _random_pipeline(True, vae_on_gpu=True)
            pipe.enable_slicing(options["slicing"])
            if options.get("chunking"):
                chunk_feed_forward(pipe.unet)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            pipe("a photo", num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, output_type="np")
            torch.cuda.synchronize()
            out[f"{label} @ {size}"] = {"measured": torch.cuda.max_memory_allocated(),
                                        "predicted": planned(0, size=size, **options).peak}
            del pipe
            torch.cuda.empty_cache()
    return out


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gpu", action="store_true", help="issue #20's bar and per-configuration peaks on the GPU")
    parser.add_argument("--cpu-rehash", action="store_true", help="step rehash wall time on the CPU (full-size UNet)")
    parser.add_argument("--size", type=int, default=256, help="--cpu-rehash image size")
    parser.add_argument("--repeats", type=int, default=3, help="--cpu-rehash runs of each kind")
    parser.add_argument("--rehash-steps", type=int, default=25, help="--cpu-rehash steps")
    parser.add_argument("--layouts", action="store_true", help="UNet size and output SQNR per format layout (CPU)")
    args = parser.parse_args(argv)
    if args.layouts:
        record = layouts_cpu()
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / "sd15-unet-layouts.json"
        path.write_text(json.dumps(record, indent=1))
        for label, row in sorted(record["rows"].items(), key=lambda item: item[1]["unet_bytes"]):
            print(f"{label:<42} {row['unet_bytes'] / 1e6:8.1f} MB  SQNR {row['sqnr_db']:6.2f} dB")
        print(f"smallest within 3 dB of uniform q4_k: {record['smallest_within_3db']} "
              f"({record['smallest_bytes'] / 1e6:.1f} MB); written to {path}")
        return
    if args.cpu_rehash:
        from tinykern.bench import machine

        record = rehash_cpu(args.size, args.rehash_steps, 3, args.repeats)
        record["flops"] = [rehash_flops(size, 25, 3, layers) for size in (args.size, 512) for layers in (None, 2, 1)]
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"sd15-rehash-cpu-{machine.slug(record['cpu'])}.json"
        path.write_text(json.dumps(record, indent=1))
        print(json.dumps({k: v for k, v in record.items() if k != "versions"}, indent=1))
        print(f"written to {path}")
        return
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA GPU")
        bar = gpu_bar()
        configs = gpu_configs()
        record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "bar": bar, "configs": configs,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"sd15-memory-{torch.cuda.get_device_name().replace(' ', '_')}.json"
        path.write_text(json.dumps(record, indent=1))
        ok = bar["full"]["peak_allocated_bytes"] <= VRAM_TARGET_BYTES
        print(f"bar: measured {bar['full']['peak_allocated_bytes'] / 1e9:.3f} GB ({'met' if ok else 'MISSED'}), "
              f"predicted {bar['predicted_peak_bytes'] / 1e9:.3f} GB; UNet time rehash 3 / full "
              f"{bar['unet_time_ratio_rehash3']:.2f}, with --rehash-layers 2 {bar['unet_time_ratio_rehash3_layers2']:.2f} "
              "(target 0.6)")
        for label, value in configs.items():
            print(f"{label:<32} measured {value['measured'] / 2**20:8.1f} MiB, predicted {value['predicted'] / 2**20:8.1f} MiB")
        print(f"written to {path}")
        return
    size = sizes()
    for key, value in size.items():
        if not key.startswith("unet_q"):
            print(f"{key:<24} {value / 1e6:10.1f} MB")
    print("UNet per format: " + ", ".join(f"{fmt} {size[f'unet_{fmt}'] / 1e6:.1f} MB" for fmt in FORMATS))
    print(f"UNet target <= {UNET_TARGET_BYTES / 1e6:.0f} MB: {'met' if size['unet_tinykern'] <= UNET_TARGET_BYTES else 'MISSED'}")
    if not torch.cuda.is_available():
        print("peak VRAM and s/step: unmeasured (no CUDA GPU on this machine)")
        return
    ours, theirs = generation(True, args.steps), generation(False, args.steps)
    ratio = ours["s_per_step"] / theirs["s_per_step"]
    print(f"tinykern: peak {ours['peak_vram_bytes'] / 1e9:.2f} GB (target {VRAM_TARGET_BYTES / 1e9:.1f}), "
          f"{ours['s_per_step']:.3f} s/step; diffusers fp16: peak {theirs['peak_vram_bytes'] / 1e9:.2f} GB, "
          f"{theirs['s_per_step']:.3f} s/step; ratio {ratio:.2f} (target {SPEED_TARGET})")
    RESULTS.mkdir(exist_ok=True)
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "sizes": size, "tinykern": ours,
              "diffusers_fp16": theirs, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = RESULTS / f"sd15-{torch.cuda.get_device_name().replace(' ', '_')}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
