"""RQ-VAE text-to-image throughput: images/s and peak memory of the shipped pipeline at batch 16
(Q4_K and fp32 generator), on CUDA when present, else CPU.

`pytest bench/bench_rqvae.py --benchmark-only` times one batch per device; `python
bench/bench_rqvae.py [--device cuda] [--batch 16]` prints a table and appends it, with the device
name and versions, to bench/results/rqvae.jsonl."""

import argparse
import json
import time
from pathlib import Path

import pytest
import torch

import tinykern
from tinykern.bench import machine
from tinykern.pipelines.rqvae import data as rqdata
from tinykern.pipelines.rqvae.generate import Pipeline

RESULTS = Path(__file__).parent / "results" / "rqvae.jsonl"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def prompts(batch):
    base = rqdata.heldout_prompts(8)
    return [base[i % len(base)] for i in range(batch)]


def measure(device, batch=16, quantize=True, repeats=3):
    pipe = Pipeline.load(quantize=quantize, device=device)
    batch_prompts = prompts(batch)
    pipe.generate(batch_prompts, seed=0)  # warm-up: allocator, kernel selection, Triton compiles
    best = None
    for r in range(repeats):
        _, stats = pipe.generate(batch_prompts, seed=r)
        if best is None or stats["seconds"] < best["seconds"]:
            best = stats
    return {"device": machine.device_name(device), "batch": batch, "generator": "q4_k" if quantize else "fp32", **best,
            "torch": torch.__version__, "tinykern": tinykern.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantize", [True, False], ids=["q4_k", "fp32"])
def test_bench_rqvae(benchmark, device, quantize):
    pipe = Pipeline.load(quantize=quantize, device=device)
    batch = prompts(16 if device == "cuda" else 4)
    pipe.generate(batch, seed=0)
    benchmark.pedantic(lambda: pipe.generate(batch, seed=0), rounds=3, iterations=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'device':<28} {'generator':<9} {'batch':>5} {'images/s':>9} {'peak MB':>9}  memory")
    for quantize in (True, False):
        row = measure(args.device, args.batch, quantize)
        print(f"{row['device'][:28]:<28} {row['generator']:<9} {row['batch']:>5} {row['images_per_s']:>9.2f} "
              f"{row['peak_memory_mb']:>9.0f}  {row['memory_kind']}")
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
