"""`python -m tinykern demo`: quantize the Linear and Conv layers of an SD1.5-shaped UNet block
stack (random weights, real shapes) and print what Q4_K saves and what it costs in accuracy."""

import copy
import time

import torch
from torch import nn

import tinykern
from tinykern import backends

CROSS_DIM, TIME_DIM = 768, 1280  # CLIP-L hidden size; SD1.5's time-embedding width


def sd15_block_stack():
    """One ResNet block, one transformer block and one downsampler per UNet level, with
    SD1.5's layer shapes at every level (320, 640, 1280 channels)."""
    layers = {}
    for c in (320, 640, 1280):
        p = f"level{c}"
        layers[f"{p}.resnet.conv1"] = nn.Conv2d(c, c, 3, padding=1)
        layers[f"{p}.resnet.conv2"] = nn.Conv2d(c, c, 3, padding=1)
        layers[f"{p}.resnet.time_emb_proj"] = nn.Linear(TIME_DIM, c)
        layers[f"{p}.attn.proj_in"] = nn.Conv2d(c, c, 1)
        for name in ("to_q", "to_k", "to_v", "to_out"):
            layers[f"{p}.attn.attn1.{name}"] = nn.Linear(c, c, bias=name == "to_out")
        layers[f"{p}.attn.attn2.to_q"] = nn.Linear(c, c, bias=False)
        layers[f"{p}.attn.attn2.to_k"] = nn.Linear(CROSS_DIM, c, bias=False)
        layers[f"{p}.attn.attn2.to_v"] = nn.Linear(CROSS_DIM, c, bias=False)
        layers[f"{p}.attn.attn2.to_out"] = nn.Linear(c, c)
        layers[f"{p}.attn.ff.geglu"] = nn.Linear(c, 8 * c)
        layers[f"{p}.attn.ff.out"] = nn.Linear(4 * c, c)
        layers[f"{p}.attn.proj_out"] = nn.Conv2d(c, c, 1)
        layers[f"{p}.downsample"] = nn.Conv2d(c, c, 3, stride=2, padding=1)
    return nn.ModuleDict({k.replace(".", "_"): v for k, v in layers.items()})


def run(device="cpu"):
    torch.manual_seed(0)
    device = torch.device(device)
    dense = sd15_block_stack().to(device)
    quant = copy.deepcopy(dense)
    start = time.perf_counter()
    report = tinykern.quantize_(quant)
    seconds = time.perf_counter() - start

    rows = {}
    with torch.no_grad():
        for (name, d), q in zip(dense.items(), quant.values()):
            kind = f"conv{d.kernel_size[0]}x{d.kernel_size[1]}" if isinstance(d, nn.Conv2d) else "linear"
            x = torch.randn(2, d.in_channels, 16, 16, device=device) if kind != "linear" else torch.randn(2, 77, d.in_features, device=device)
            ref, out = d(x), q(x)
            err = ((out - ref).norm() / ref.norm()).item()
            row = rows.setdefault(kind, [0, 0, 0, []])
            row[0] += 1
            row[1] += d.weight.numel() * 2
            row[2] += q.qweight.numel()
            row[3].append(err)

    print(f"SD1.5-shaped block stack, random weights, quantized to Q4_K in {seconds:.1f} s on {device}")
    print(f"{'layers':<10} {'count':>5} {'fp16 bytes':>14} {'Q4_K bytes':>14} {'ratio':>6} {'output rel err':>15}")
    total = [0, 0, 0]
    for kind, (count, fp16, q4, errs) in rows.items():
        print(f"{kind:<10} {count:>5} {fp16:>14,} {q4:>14,} {fp16 / q4:>6.2f} {sum(errs) / len(errs):>15.4f}")
        total = [total[0] + count, total[1] + fp16, total[2] + q4]
    print(f"{'total':<10} {total[0]:>5} {total[1]:>14,} {total[2]:>14,} {total[1] / total[2]:>6.2f}")
    print(f"backend: {backends.resolve('q4k_matmul', device)[0]} (linear), {backends.resolve('q4k_conv2d', device)[0]} (conv); "
          f"{sum(r.format != 'dense' for r in report)} of {len(report)} layers quantized")
