"""Whole-model figures. For now: the SD1.5 UNet's bytes in fp16 and in Q4_K, from its real layer
inventory built on the meta device (no weights, no diffusers). The pipeline benchmarks extend
this file."""

from tinykern.bench import sd15


def test_sd15_unet_bytes(benchmark, note):
    benchmark.group = "pipelines"
    sizes = benchmark.pedantic(sd15.sizes, rounds=1, iterations=1)
    assert sizes["parameters"] == sd15.PARAMETERS, "the layer inventory no longer matches SD1.5's UNet"
    ratio = sizes["fp16_bytes"] / sizes["q4k_bytes"]
    benchmark.extra_info.update(sizes, fp16_over_q4k=ratio, model="SD1.5 UNet", config="QuantConfig() defaults")
    note(f"SD1.5 UNet: {sizes['fp16_bytes'] / 1e6:.1f} MB in fp16 -> {sizes['q4k_bytes'] / 1e6:.1f} MB with "
         f"Q4_K ({ratio:.2f}x smaller; {sizes['q4k_layers']} layers packed, "
         f"kept dense: {', '.join(sizes['dense_layers']) or 'none'})")
