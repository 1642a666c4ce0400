"""`python -m tinykern.bench`: ceilings first, then every op x case x implementation, then the
report (see report.py). Every ratio it prints comes from timings taken in this one process."""

import torch

from tinykern import backends
from tinykern.bench import cases, ceilings, machine, report, sd15, timing
from tinykern.formats import FORMATS
from tinykern.quantize import QuantConfig

QUANTIZE_TARGET_S = 45  # seconds to quantize the whole SD1.5 UNet to its default format (issue #18)


def unet_format():
    """The format quantize_ gives the SD1.5 UNet's layers by default (the QuantConfig default)."""
    return FORMATS[QuantConfig().weight]


def run(device, shape_set, quick=False, ops=None, log=print):
    """Measure `ops` (default: those of cases.DEFAULT_FORMATS); returns the results dict that
    report.write turns into files."""
    ops = cases.ops_for(cases.DEFAULT_FORMATS) if ops is None else tuple(ops)
    device = torch.device(device)
    timing.prepare(device)
    budget = timing.BUDGET_S / 4 if quick else timing.BUDGET_S
    min_reps = 2 if quick else timing.MIN_REPS
    load = machine.CpuLoad().start()

    log(f"measuring the ceilings of {machine.device_name(device)} ...")
    ceil = ceilings.measure(device, quick)
    log(f"  copy {ceil.bandwidth / 1e9:.1f} GB/s (read + write), {ceil.dtype} matmul {ceil.flops / 1e12:.3f} TFLOP/s")

    rows, skipped = [], []
    workspace = cases.Workspace()
    for op in ops:
        for case in cases.CASES[op](shape_set):
            for impl in cases.impls(op):
                try:
                    row = cases.prepare(op, case, impl, device, workspace)
                except cases.Unavailable as e:
                    skipped.append({"op": op, "case": case.id, "impl": impl, "reason": str(e)})
                    continue
                result = _measure(row, device, budget, min_reps, ceil, skipped)
                if result is not None:
                    rows.append(result)
                    log(_progress(result))
            workspace.clear()

    _add_speedups(rows)
    auto = {op: _auto(op, device) for op in ops}
    results = {
        "device": {**machine.describe(device), "slug": machine.slug(machine.device_name(device))},
        "versions": machine.versions(),
        "date": machine.now(),
        "shape_set": shape_set,
        "formats": sorted({cases.format_of(op).name for op in ops if cases.format_of(op) is not None},
                          key=list(FORMATS).index),
        "quick": quick,
        "ceilings": ceil.as_dict(),
        "memory_method": timing.memory_method(device),
        "settings": timing.settings(device),
        "auto": auto,
        "rows": rows,
        "skipped": skipped,
    }
    if unet_format().op("quantize") in ops:
        results["quantize_sd15"] = _quantize_sd15(rows)
    results["headline"] = _headline(results)
    results["machine_load"] = load.stop()
    return results


def _measure(row, device, budget, min_reps, ceil, skipped):
    """The row's result dict, or None when it was skipped. The first call warms up, measures
    peak memory and is checked against the reference; a ValueError there (the op refusing the
    shape) or a NotImplementedError (a backend registered without this format's kernel) is a
    skip, a wrong result a failed row."""
    info = row.info()
    try:
        out, peak = timing.peak_memory(row.fn, device)
    except ValueError as e:
        skipped.append({"op": row.op, "case": row.case.id, "impl": row.impl, "reason": f"refused the shape: {e}"})
        return None
    except NotImplementedError as e:
        skipped.append({"op": row.op, "case": row.case.id, "impl": row.impl, "reason": f"not implemented: {e}"})
        return None
    try:
        accuracy = row.check(out)
    except AssertionError as e:
        return {**info, "error": str(e)}
    output_bytes = sum(t.numel() * t.element_size() for t in (out if isinstance(out, tuple) else (out,))
                       if isinstance(t, torch.Tensor))
    del out
    t = timing.measure(row.fn, device, budget, min_reps)
    pct, bound = ceil.percent(row.bytes, max(row.flops, 0), t.seconds)
    result = {**info, "seconds": t.seconds, "timing": t.as_dict(), "GBps": row.bytes / t.seconds / 1e9,
              "TFLOPs": row.flops / t.seconds / 1e12, "percent_of_ceiling": pct, "bound": bound,
              "peak_memory_bytes": peak if row.torch_memory else None, "output_bytes": output_bytes,
              "accuracy": accuracy}
    if cases.kind(row.op) == "quantize":
        result["weights_per_s"] = row.case.rows * row.case.cols / t.seconds
    return result


def _add_speedups(rows):
    by_case = {}
    for r in rows:
        if "error" not in r:
            by_case.setdefault((r["op"], r["case"]), {})[r["impl"]] = r["seconds"]
    for r in rows:
        if "error" in r:
            continue
        times = by_case[(r["op"], r["case"])]
        r["speedup"] = {b: times[b] / r["seconds"] for b in cases.BASELINES[r["op"]] if b in times and b != r["impl"]}


def _auto(op, device):
    """The backend `auto` picks for op on this device (None for the quantizers: not backend ops)."""
    if cases.kind(op) == "quantize":
        return None
    with backends.backend("auto"):
        return backends.resolve(op, device)[0]


def _quantize_sd15(rows):
    # The largest weight timed stands for the UNet: its rate is the one that matters.
    fmt = unet_format()
    timed = [r for r in rows if r["op"] == fmt.op("quantize") and r["impl"] == "tinykern" and "error" not in r]
    if not timed:
        return None
    best = max(timed, key=lambda r: r["shape"]["rows"] * r["shape"]["cols"])
    unet = sd15.sizes()
    rate = best["weights_per_s"]
    return {"format": fmt.name, "case": best["case"], "weights_per_s": rate, "parameters": unet["parameters"],
            "seconds_for_parameters": unet["parameters"] / rate, "packed_weights": unet["packed_weights"],
            "seconds_for_packed_weights": unet["packed_weights"] / rate, "target_s": QUANTIZE_TARGET_S,
            "meets_target": unet["packed_weights"] / rate <= QUANTIZE_TARGET_S}


def _headline(results):
    """One-line summaries computed from the rows: how auto's pick compares with each baseline
    (geometric mean over the cases both ran), the GEMV's bandwidth, RVQ's memory."""
    lines = []
    rows = [r for r in results["rows"] if "error" not in r]
    bw = results["ceilings"]["bandwidth_GBps"]
    for op, auto in results["auto"].items():
        mine = [r for r in rows if r["op"] == op and r["impl"] == auto]
        if not mine or cases.kind(op) == "quantize":
            continue
        parts = []
        for b in cases.BASELINES[op]:
            ratios = [r["speedup"][b] for r in mine if b in r["speedup"]]
            if ratios:
                parts.append(f"{report.geomean(ratios):.2f}x {b}")
        if parts:
            lines.append(f"{op}: auto's pick ({auto}) runs at " + ", ".join(parts) +
                         f" (geometric mean of time ratios over {len(mine)} cases; above 1 = faster)")
        wide = [r["speedup"]["dense"] for r in mine if r["shape"].get("M", 0) >= 512 and "dense" in r["speedup"]]
        if wide and cases.kind(op) == "matmul":
            lines.append(f"{op} wide (M >= 512, {len(wide)} cases): {auto} at {report.geomean(wide):.2f}x dense "
                         f"(geometric mean)")
        for r in mine:
            if r["shape"].get("M") == 1:
                lines.append(f"{op} GEMV {r['case']} ({auto}): {r['GBps']:.1f} GB/s = {100 * r['GBps'] / bw:.0f}% "
                             f"of the measured copy bandwidth")
        if op == "rvq_encode":
            for r in mine:
                others = {x["impl"]: x["peak_memory_bytes"] for x in rows if x["op"] == op and x["case"] == r["case"]}
                if "vector_quantize_pytorch" in others:
                    lines.append(f"rvq_encode {r['case']}: peak extra memory {report.format_bytes(r['peak_memory_bytes'])} "
                                 f"({auto}; its outputs, codes and quantized sum, are "
                                 f"{report.format_bytes(r['output_bytes'])} of it) vs "
                                 f"{report.format_bytes(others['vector_quantize_pytorch'])} (vector_quantize_pytorch)")
    q = results.get("quantize_sd15")
    if q:
        lines.append(f"{q['format'].upper()} quantization: {q['weights_per_s'] / 1e6:.1f} M weights/s -> about "
                     f"{q['seconds_for_packed_weights']:.0f} s for the SD1.5 UNet (target {q['target_s']} s)")
    return lines


def _progress(r):
    if "error" in r:
        return f"  {r['op']:<14} {r['case']:<52} {r['impl']:<24} FAILED: {r['error']}"
    return (f"  {r['op']:<14} {r['case']:<52} {r['impl']:<24} {report.format_time(r['seconds']):>10} "
            f"{r['GBps']:8.2f} GB/s {r['TFLOPs']:8.4f} TFLOP/s {r['percent_of_ceiling']:5.0f}% ({r['bound']})")
