"""Quantization throughput (weights/s) of every selected format tinykern writes
(TINYKERN_BENCH_FORMATS) on SD1.5 UNet-sized weights, and for the UNet's default format the time
that rate gives for the whole UNet against the target."""

from tinykern.bench import sd15, suite


def test_quantize(run_row, op, case, impl, benchmark, note):
    run_row(op, case, impl)
    extra = benchmark.extra_info
    fmt = suite.unet_format()
    if op != fmt.op("quantize") or "weights_per_s" not in extra:  # another format, or --benchmark-disable
        return
    unet = sd15.sizes()
    rate = extra["weights_per_s"]
    extra.update(sd15_parameters=unet["parameters"], sd15_seconds_for_parameters=unet["parameters"] / rate,
                 sd15_packed_weights=unet["packed_weights"], sd15_seconds=unet["packed_weights"] / rate,
                 target_s=suite.QUANTIZE_TARGET_S)
    note(f"{fmt.name.upper()} quantize ({impl}, {case.id}): {rate / 1e6:.1f} M weights/s -> "
         f"{unet['parameters'] / rate:.0f} s for SD1.5's {unet['parameters']:,} UNet parameters "
         f"({unet['packed_weights'] / rate:.0f} s for the {unet['packed_weights']:,} weights quantize_ packs); "
         f"target {suite.QUANTIZE_TARGET_S} s")
