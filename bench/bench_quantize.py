"""Quantization throughput (weights/s) on an SD1.5 UNet-sized weight, and for Q4_K the time that
rate gives for the whole UNet against the 60 s target."""

from tinykern.bench import sd15, suite


def test_q4k_quantize(run_row, case, impl, benchmark, note):
    run_row("q4k_quantize", case, impl)
    extra = benchmark.extra_info
    if "weights_per_s" not in extra:  # --benchmark-disable
        return
    unet = sd15.sizes()
    rate = extra["weights_per_s"]
    extra.update(sd15_parameters=unet["parameters"], sd15_seconds_for_parameters=unet["parameters"] / rate,
                 sd15_packed_weights=unet["packed_weights"], sd15_seconds=unet["packed_weights"] / rate,
                 target_s=suite.QUANTIZE_TARGET_S)
    note(f"Q4_K quantize ({impl}, {case.id}): {rate / 1e6:.1f} M weights/s -> "
         f"{unet['parameters'] / rate:.0f} s for SD1.5's {unet['parameters']:,} UNet parameters "
         f"({unet['packed_weights'] / rate:.0f} s for the {unet['packed_weights']:,} weights quantize_ packs); "
         f"target {suite.QUANTIZE_TARGET_S} s")


def test_q8_0_quantize(run_row, case, impl):
    run_row("q8_0_quantize", case, impl)
