"""Predicted peak GPU memory of SD1.5 (tinykern's layout, CFG 7.5, VAE decoder on the GPU) per
configuration, from the memory planner (meta-device traces, no GPU needed): no slicing,
per-operator slicing (diffusers' feed-forward chunking), tinykern's slicing + operator grouping;
512x512 and 1024x1024; and issue #20's bar (rank-64 LoRA on every UNet and text-encoder Linear
and Conv). Writes bench/results/sd15-memory-plan.json and .png.

    python bench/plot_sd_memory.py
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bench_sd  # noqa: E402

MiB = 2**20


def collect():
    rows = []
    for size in (512, 1024):
        for label, options in bench_sd.CONFIGS.items():
            rows.append((label, size, 0, "fp16", bench_sd.planned(0, size=size, **options)))
    for fmt in ("fp16", "q8_0"):
        rows.append((f"slicing + grouping\n+ rank-64 LoRA {fmt}", 512, 64, fmt,
                     bench_sd.planned(64, True, 512, lora_format=fmt)))
    return rows


def main():
    rows = collect()
    record = {"what": __doc__.splitlines()[0], "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "plans": [{"config": label, "size": size, "lora_rank": rank, "lora_format": fmt, **plan.to_json()}
                        for label, size, rank, fmt, plan in rows]}
    out = bench_sd.RESULTS
    out.mkdir(exist_ok=True)
    (out / "sd15-memory-plan.json").write_text(json.dumps(record, indent=1))
    for label, size, rank, fmt, plan in rows:
        phases = ", ".join(f"{p.name} {p.peak / MiB:.1f}" for p in plan.phases)
        print(f"{label.replace(chr(10), ' '):<48} {size:>5}  weights {plan.weight_bytes / MiB:7.1f} MiB, activations ({phases}) MiB, "
              f"peak {plan.peak / MiB:7.1f} MiB = {plan.peak / 1e9:.3f} GB")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.6))
    names = [f"{label}\n{size}x{size}" for label, size, *_ in rows]
    weights = [plan.weight_bytes / 1e9 for *_, plan in rows]
    unet = [plan.phase("denoise").peak / 1e9 for *_, plan in rows]
    decode = [max(0, plan.peak_phase.peak - plan.phase("denoise").peak) / 1e9 for *_, plan in rows]
    work = [sum(plan.workspace.values()) / 1e9 for *_, plan in rows]
    x = range(len(rows))
    ax.bar(x, weights, label="weights (UNet, text encoder, VAE decoder, LoRA)", color="#9aa5b1")
    ax.bar(x, work, bottom=weights, label="cuBLAS workspace", color="#cbd2d9")
    base = [w + k for w, k in zip(weights, work)]
    ax.bar(x, unet, bottom=base, label="UNet activations (denoise peak)", color="#3e7cb1")
    ax.bar(x, decode, bottom=[b + u for b, u in zip(base, unet)], label="more in VAE decode", color="#f0a202")
    for i, (*_, plan) in enumerate(rows):
        ax.text(i, plan.peak / 1e9 + 0.02, f"{plan.peak / 1e9:.2f}", ha="center", fontsize=8)
    ax.axhline(1.0, color="red", lw=0.8, ls="--")
    ax.text(len(rows) - 0.5, 1.01, "1.0 GB", color="red", fontsize=8, ha="right")
    ax.set_xticks(list(x), names, fontsize=7)
    ax.set_ylabel("predicted peak allocated (GB)")
    ax.set_title("SD1.5 in tinykern's layout, CFG 7.5, VAE decoder on the GPU: predicted peak (memory planner)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "sd15-memory-plan.png", dpi=120)
    print(f"written to {out / 'sd15-memory-plan.json'} and {out / 'sd15-memory-plan.png'}")


if __name__ == "__main__":
    main()
