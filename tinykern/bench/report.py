"""Turns a results dict (see suite.run) into <slug>.json, <slug>.md and, with matplotlib, a
roofline plot <slug>.png."""

import itertools
import json
import math
import os

from tinykern.bench import cases

MATPLOTLIB_MISSING = ("matplotlib is not installed: no roofline plot. Install it with "
                      "`pip install matplotlib` (the `bench` extra) and run again.")


def write(results, out_dir):
    """Write the JSON, the Markdown table and the plot; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, results["device"]["slug"])
    plot = plot_roofline(results, base + ".png")
    results["plot"] = os.path.basename(plot) if plot else MATPLOTLIB_MISSING
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(results))
    return [base + ".json", base + ".md"] + ([plot] if plot else [])


def markdown(results):
    dev, ceil = results["device"], results["ceilings"]
    lines = [
        f"# tinykern benchmarks: {dev['name']}",
        "",
        f"{results['date']} · torch {results['versions']['torch']} · CUDA {results['versions']['cuda'] or 'none'} · "
        f"triton {results['versions']['triton'] or 'none'} · tinykern {results['versions']['tinykern']} · "
        f"shape set `{results['shape_set']}`{' (quick timing)' if results['quick'] else ''}"
        + (f" · formats {', '.join(results['formats'])}" if results.get("formats") else ""),
        "",
    ]
    load = results.get("machine_load")
    if load:
        lines += [f"Machine load: {load['note']}.", ""]
    lines += [
        "## Ceilings measured in this run",
        "",
        "| ceiling | value | how |",
        "|---|---|---|",
        f"| memory bandwidth (read + write) | {_num(ceil['bandwidth_GBps'])} GB/s | {ceil['copy']['method']}, "
        f"{ceil['copy']['bytes_each_way'] / 2**20:.0f} MiB each way |",
        f"| {ceil['dtype']} matmul | {_num(ceil['flops_TFLOPs'])} TFLOP/s | {ceil['gemm']['method']} |",
        "",
    ]
    headline = results.get("headline") or []
    if headline:
        lines += ["## Headline", ""] + [f"- {h}" for h in headline] + [""]
    if results.get("quantize_sd15"):
        q = results["quantize_sd15"]
        lines += [
            f"## Quantizing the SD1.5 UNet to {q['format'].upper()}", "",
            f"{q['weights_per_s'] / 1e6:.1f} M weights/s on `{q['case']}` -> {q['seconds_for_parameters']:.0f} s for "
            f"its {q['parameters']:,} parameters ({q['seconds_for_packed_weights']:.0f} s for the "
            f"{q['packed_weights']:,} weights quantize_ packs, rows padded to 256); target {q['target_s']} s: "
            f"{'met' if q['meets_target'] else 'not met'}.", "",
        ]
    for op in cases.OPS:
        rows = [r for r in results["rows"] if r["op"] == op]
        if rows:
            lines += _op_table(op, rows, results.get("auto", {}).get(op))
    if results["skipped"]:
        lines += ["## Not run", "", "| op | implementation | cases | why |", "|---|---|---|---|"]
        grouped = {}
        for s in results["skipped"]:
            grouped.setdefault((s["op"], s["impl"], s["reason"]), []).append(s["case"])
        for (op, impl, reason), ids in grouped.items():
            lines.append(f"| {op} | {impl} | {len(ids)} | {_cell(reason)} |")
        lines.append("")
    lines += ["## Roofline", ""]
    plot = results.get("plot", "")
    lines += [f"![roofline]({plot})" if plot.endswith(".png") else plot, ""]
    lines += [
        "## How to read this", "",
        "- time: median of the timed calls (GPU: device time from CUDA events with L2 flushed; CPU: wall time).",
        "- GB/s counts the op's compulsory bytes: packed weights with their scales (dense weights for "
        "`dense`), activations, bias, outputs, each once. `dequant_then_matmul` is charged the packed "
        "weight only; its extra round trip through a dense copy is what it wastes.",
        "- % of ceiling: the larger of achieved GB/s over the measured bandwidth and achieved FLOP/s over "
        "the measured matmul rate (roofline), with the bound it is measured against. Above 100% means "
        "the kernel beats the measured ceiling (e.g. its working set fits in cache).",
        "- vs X: time of baseline X over the row's time (above 1: faster than X). Ratios come from the same process.",
        "- peak mem: extra memory allocated during one call, output included "
        f"({results.get('memory_method', 'see JSON')}).",
        "",
    ]
    return "\n".join(lines)


def _op_table(op, rows, auto):
    baselines = cases.BASELINES[op]
    quantize = cases.kind(op) == "quantize"
    head = ["case", "implementation", "time", "GB/s", "M weights/s" if quantize else "TFLOP/s", "% of ceiling"]
    head += [f"vs {b}" for b in baselines] + ["peak mem"]
    lines = [f"## {op}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['impl']} | failed: {_cell(r['error'])} |" + " |" * (len(head) - 3))
            continue
        name = r["impl"] + (" (auto)" if r["impl"] == auto else "")
        rate = r["weights_per_s"] / 1e6 if quantize else r["TFLOPs"]
        cells = [r["case"], name, format_time(r["seconds"]), _num(r["GBps"]), _num(rate),
                 f"{_num(r['percent_of_ceiling'])}% ({r['bound']})"]
        cells += [f"{r['speedup'][b]:.2f}x" if b in r.get("speedup", {}) else "" for b in baselines]
        cells.append(format_bytes(r.get("peak_memory_bytes")))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def plot_roofline(results, path):
    """Arithmetic intensity vs achieved TFLOP/s with the measured roofs; returns the path, or None
    without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    ceil = results["ceilings"]
    bw, peak = ceil["bandwidth_GBps"] * 1e9, ceil["flops_TFLOPs"] * 1e12
    rows = [r for r in results["rows"] if "error" not in r and r["flops"] > 0]
    fig = Figure(figsize=(12, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if rows:
        intensities = [r["flops"] / r["bytes"] for r in rows]
        lo, hi = min(intensities) / 2, max(intensities) * 2
        lo, hi = min(lo, peak / bw / 10), max(hi, peak / bw * 10)
    else:
        lo, hi = peak / bw / 100, peak / bw * 100
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [min(peak, x * bw) / 1e12 for x in xs], color="black", linewidth=1.5,
            label=f"measured roof: {bw / 1e9:.3g} GB/s, {peak / 1e12:.3g} TFLOP/s ({ceil['dtype']})")
    ops = [op for op in cases.OPS if any(r["op"] == op for r in rows)]
    markers = dict(zip(ops, itertools.cycle("osD^vP<>hX*pd")))
    impls = sorted({r["impl"] for r in rows})
    colors = {impl: f"C{i % 10}" for i, impl in enumerate(impls)}
    for impl in impls:
        for op in ops:
            pts = [r for r in rows if r["impl"] == impl and r["op"] == op]
            if pts:
                ax.scatter([r["flops"] / r["bytes"] for r in pts], [r["TFLOPs"] for r in pts], s=28,
                           marker=markers[op], color=colors[impl], alpha=0.8, label=f"{op} · {impl}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per compulsory byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"tinykern roofline: {results['device']['name']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _num(x):
    """Three significant digits, without scientific notation for everyday magnitudes."""
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def format_time(s):
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def format_bytes(n):
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _cell(text):
    return str(text).replace("|", "/").replace("\n", " ")


def geomean(values):
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None
