"""SD1.5 in the low-VRAM layout: component bytes (always, from the real architecture built on
the meta device) and, on a GPU, a full 512x512 generation with random weights: peak VRAM and
seconds per step against diffusers in fp16 on the same GPU.

    python -m pytest bench/bench_sd.py --benchmark-only -rs   # with the other benchmarks
    python bench/bench_sd.py [--steps 20]                     # standalone; GPU figures -> bench/results/
"""

import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from tinykern.pipelines.sd import SDQuantConfig, TinySDPipeline, clip_tokenizer, make_scheduler, sd15_config_dir  # noqa: E402
from tinykern.pipelines.sd.layout import move, quantize_on  # noqa: E402
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
    quantized, norms/embeddings/biases in fp16), computed on the meta device."""
    unet, text_encoder, vae = _build("meta")
    layout = SDQuantConfig()
    result = {"unet_fp16": _bytes(unet), "text_encoder_fp16": _bytes(text_encoder), "vae_decoder_fp16": _bytes(vae.decoder)}
    quantize_(unet, layout.unet_config())
    quantize_(text_encoder, layout.text_encoder_config())
    result.update(unet_tinykern=_bytes(unet), text_encoder_tinykern=_bytes(text_encoder))
    return result


def _random_pipeline(quantized):
    """SD1.5 with diffusers' random initialization: tinykern's layout (quantized on the GPU block
    by block, VAE on the CPU) or diffusers' fp16 everything-on-GPU."""
    unet, text_encoder, vae = _build("cpu", torch.float32)
    layout = SDQuantConfig() if quantized else SDQuantConfig(None, None)
    quantize_on(unet, layout.unet_config(), "cuda", torch.float16)
    quantize_on(text_encoder, layout.text_encoder_config(), "cuda", torch.float16)
    move(vae, "cpu" if quantized else "cuda", torch.float32 if quantized else torch.float16)
    scheduler = make_scheduler("ddim", _configs()[3])
    pipe = TinySDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generation(quantized, steps=20):
    """Peak VRAM (bytes) and seconds per denoising step of one 512x512 image with CFG."""
    pipe = _random_pipeline(quantized)
    call = dict(num_inference_steps=steps, guidance_scale=7.5, height=512, width=512, output_type="np")
    pipe("warm-up", **{**call, "num_inference_steps": 2})
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ends = []

    def on_step_end(pipe_, step, timestep, kwargs):
        torch.cuda.synchronize()
        ends.append(time.perf_counter())
        return kwargs

    pipe("a photo of an astronaut riding a horse", callback_on_step_end=on_step_end, **call)
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


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    size = sizes()
    for key, value in size.items():
        print(f"{key:<24} {value / 1e6:10.1f} MB")
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
