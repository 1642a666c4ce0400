"""`python -m tinykern.bench.cpu_vs_ggml`: tinykern's CPU kernels side by side with ggml's CPU code
(libggml-python: Q4_K mul_mat on plain and repacked q4_K_8x8 weights, the reference quantizers)
and dense torch (F.linear in fp32 and in bf16), in one process with the same threads. The calls of
a case run interleaved, one of each per round, so that a busy machine slows them alike; each
figure is the median over the rounds with the 20th-80th percentile spread. Writes
<out>/<cpu>-vs-ggml.md and .json.

Every matmul output is checked against float64 x @ dequant(w).T (relative Frobenius error in
the table); the quantizers' blocks against libggml's reference, byte for byte.
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from tinykern import _ext, ops
from tinykern.bench import cases, ggml, machine, sd15
from tinykern.formats import q4k, q8_0
from tinykern.quantize import QuantConfig

# (name, M, K, N): issue #18's shapes. 4096x4096 GEMV/GEMM, CLIP-L (77 tokens, K 768), and the
# SD1.5 UNet's transformer linears at 64x64, 32x32 and 16x16 latents (M 4096/1024/256).
MATMUL_CASES = [
    ("4096x4096", 1, 4096, 4096), ("4096x4096", 4, 4096, 4096), ("4096x4096", 16, 4096, 4096),
    ("4096x4096", 64, 4096, 4096),
    ("clip.q_proj", 1, 768, 768), ("clip.fc1", 1, 768, 3072), ("clip.q_proj", 77, 768, 768),
    ("clip.fc1", 77, 768, 3072),
    ("sd15.geglu.proj@64x64", 4096, 320, 2560), ("sd15.ff.out@64x64", 4096, 1280, 320),
    ("sd15.attn1.to_q@64x64", 4096, 320, 320),
    ("sd15.geglu.proj@32x32", 1024, 640, 5120), ("sd15.ff.out@32x32", 1024, 2560, 640),
    ("sd15.geglu.proj@16x16", 256, 1280, 10240), ("sd15.ff.out@16x16", 256, 5120, 1280),
]


# (name, channels, latent size): SD1.5 UNet resnet 3x3 convs, batch 1 (M = 4096/1024/256 pixels).
CONV_CASES = [("sd15.resnet.conv@64x64", 320, 64), ("sd15.resnet.conv@32x32", 640, 32),
              ("sd15.resnet.conv@16x16", 1280, 16)]


def timed_rounds(fns, rounds):
    """{name: [seconds]} of `rounds` interleaved rounds, one call of each fn per round (after
    one warm-up call each)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def summary(seconds):
    s = sorted(seconds)
    q = statistics.quantiles(s, n=5, method="inclusive") if len(s) >= 2 else [s[0]] * 4
    return {"median": statistics.median(s), "p20": q[0], "p80": q[3], "runs": len(s)}


def rel_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def _measured(fns, ref, ref16, rounds, **shape):
    """The case's result: `shape` (case, M, K, N), each fn's relative error against ref (ref16 for
    "tinykern bf16 x") and its timed_rounds summary."""
    errors = {impl: rel_error(fn(), ref16 if impl == "tinykern bf16 x" else ref) for impl, fn in fns.items()}
    times = timed_rounds(fns, rounds)
    return {**shape, "rel_error": errors, "seconds": {impl: summary(t) for impl, t in times.items()}}


def _tinykern_fns(op_fn, x, x16, *args):
    """The three tinykern calls of a case: fp32 x (default and exact) and bf16 x, on the cpu backend."""
    return {"tinykern": cases._backend_call("cpu", op_fn, x, *args),
            "tinykern exact": cases._backend_call("cpu", op_fn, x, *args, exact=True),
            "tinykern bf16 x": cases._backend_call("cpu", op_fn, x16, *args)}


def matmul_case(name, m, k, n, threads, rounds, gen):
    kp = -(-k // q4k.BLOCK) * q4k.BLOCK
    w = q4k.quantize(0.02 * torch.randn(n, kp, generator=gen))
    dense = q4k.dequantize(w)[:, :k].contiguous()
    dense16 = dense.bfloat16()
    x = torch.randn(m, k, generator=gen)
    x16 = x.bfloat16()
    ref = x.double() @ dense.double().T
    ref16 = x16.double() @ dense.double().T
    fns = {**_tinykern_fns(ops.q4k_matmul, x, x16, w),
           "dense fp32": lambda: F.linear(x, dense), "dense bf16": lambda: F.linear(x16, dense16)}
    if k % q4k.BLOCK == 0:
        for repack in (False, True):
            try:
                mm = ggml.MulMat("q4k", w, m, threads, repack)
            except ggml.Unavailable:
                continue
            fns["ggml repacked" if repack else "ggml"] = (lambda mm=mm: mm(x))
    return _measured(fns, ref, ref16, rounds, case=name, M=m, K=k, N=n)


def conv_case(name, channels, size, rounds, gen):
    cols = channels * 9
    w = q4k.quantize(0.02 * torch.randn(channels, -(-cols // q4k.BLOCK) * q4k.BLOCK, generator=gen))
    dense = q4k.dequantize(w)[:, :cols].reshape(channels, channels, 3, 3).contiguous()
    dense16 = dense.bfloat16()
    x = torch.randn(1, channels, size, size, generator=gen)
    x16 = x.bfloat16()
    ref = F.conv2d(x.double(), dense.double(), None, 1, 1)
    ref16 = F.conv2d(x16.double(), dense.double(), None, 1, 1)
    fns = {**_tinykern_fns(ops.q4k_conv2d, x, x16, w, None, channels, 3, 1, 1),
           "dense fp32": lambda: F.conv2d(x, dense, None, 1, 1), "dense bf16": lambda: F.conv2d(x16, dense16, None, 1, 1)}
    return _measured(fns, ref, ref16, rounds, case=name, M=size * size, K=cols, N=channels)


def quantize_case(rows, cols, rounds, gen):
    w = 0.02 * torch.randn(rows, cols, generator=gen)
    fns = {"tinykern q4k": lambda: q4k.quantize(w), "ggml ref q4k (1 thread)": lambda: ggml.quantize_ref("q4k", w),
           "tinykern q8_0": lambda: q8_0.quantize(w), "ggml ref q8_0 (1 thread)": lambda: ggml.quantize_ref("q8_0", w)}
    identical = {"q4k": torch.equal(q4k.quantize(w), ggml.quantize_ref("q4k", w)),
                 "q8_0": torch.equal(q8_0.quantize(w), ggml.quantize_ref("q8_0", w))}
    fns["tinykern q4k, torch search"] = cases._backend_call("torch", q4k.quantize, w)
    times = timed_rounds(fns, rounds)
    return {"rows": rows, "cols": cols, "identical_to_ggml": identical,
            "seconds": {impl: summary(t) for impl, t in times.items()}}


def quantize_unet(gen):
    """Seconds q4k.quantize takes over every weight of the SD1.5 UNet that quantize_ packs (rows
    zero-padded to whole blocks), one layer at a time on random data; only the quantize calls
    are timed."""
    model, _ = sd15.unet()
    config = QuantConfig()
    total, weights = 0.0, 0
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or config.format_for(name, module)[0] is None:
            continue
        rows = module.weight.shape[0]
        cols = module.weight[0].numel()
        padded = -(-cols // q4k.BLOCK) * q4k.BLOCK
        w = 0.02 * torch.randn(rows, padded, generator=gen)
        t = time.perf_counter()
        q4k.quantize(w)
        total += time.perf_counter() - t
        weights += w.numel()
    return {"weights": weights, "parameters": sd15.PARAMETERS, "seconds": total, "weights_per_s": weights / total}


def markdown(res):
    lines = [f"# tinykern CPU kernels vs ggml and dense torch: {res['cpu']}", "",
             f"{res['date']}; torch {res['versions']['torch']}, libggml-python {res['versions']['libggml-python']}, "
             f"{res['threads']} threads (torch and ggml alike), tinykern._C SIMD {res['simd']}; "
             f"{res['rounds']} interleaved rounds per case, median (20th-80th percentile). "
             f"`{res['command']}`", ""]
    if res.get("load"):
        lines += [f"Machine load: {res['load']}", ""]
    q = res["quantize"]
    lines += [f"## Quantize {q['rows']}x{q['cols']} (N(0, 0.02))", "",
              f"Blocks identical to libggml's reference: Q4_K {q['identical_to_ggml']['q4k']}, "
              f"Q8_0 {q['identical_to_ggml']['q8_0']}.", "",
              "| quantizer | time | M weights/s | SD1.5 UNet (859.5 M) at this rate |", "|---|---|---|---|"]
    for impl, s in q["seconds"].items():
        rate = q["rows"] * q["cols"] / s["median"]
        lines.append(f"| {impl} | {s['median'] * 1e3:.0f} ms ({s['p20'] * 1e3:.0f}-{s['p80'] * 1e3:.0f}) | "
                     f"{rate / 1e6:.1f} | {sd15.PARAMETERS / rate:.0f} s |")
    if res.get("unet_quantize"):
        u = res["unet_quantize"]
        lines += ["", f"Every SD1.5 UNet weight quantize_ packs ({u['weights']:,} with padded rows), one layer at a "
                  f"time: {u['seconds']:.1f} s, {u['weights_per_s'] / 1e6:.1f} M weights/s (target: 859.5 M in 45 s)."]
    impls = ["tinykern", "tinykern exact", "tinykern bf16 x", "ggml", "ggml repacked", "dense fp32", "dense bf16"]
    lines += ["", "## Q4_K matmul", "",
              "`tinykern`: `ops.q4k_matmul` on the cpu backend, fp32 x (the default: bf16 on AMX from 256 rows); "
              "`exact`: `backend('cpu', exact=True)`; `bf16 x`: bf16 x in and out; ggml: its CPU backend "
              "(activations quantized to Q8_K), plain or repacked weights; dense: `F.linear` on the dequantized "
              "weight. Ratios are speedups of `tinykern` (fp32 x; `bf16 x` for the bf16 ratio) over each.", "",
              "| case | M | K | N | " + " | ".join(impls) + " | vs ggml repacked | vs dense fp32 | vs dense bf16 (bf16 x) |",
              "|" + "---|" * (len(impls) + 7)]
    for r in res["matmul"]:
        s = r["seconds"]
        cells = []
        for impl in impls:
            if impl in s:
                cells.append(f"{s[impl]['median'] * 1e3:.2f} ({s[impl]['p20'] * 1e3:.2f}-{s[impl]['p80'] * 1e3:.2f}) "
                             f"err {r['rel_error'][impl]:.1e}")
            else:
                cells.append("-")

        def ratio(base, own="tinykern"):
            return f"{s[base]['median'] / s[own]['median']:.2f}x" if base in s else "-"

        lines.append(f"| {r['case']} | {r['M']} | {r['K']} | {r['N']} | " + " | ".join(cells) +
                     f" | {ratio('ggml repacked')} | {ratio('dense fp32')} | {ratio('dense bf16', 'tinykern bf16 x')} |")
    lines += ["", "Times in ms; err: relative Frobenius error against float64 x @ dequant(w).T "
              "(bf16 x: against the bf16-rounded x)."]
    if res.get("conv"):
        lines += ["", "## Q4_K conv2d (3x3, stride 1, batch 1; M = pixels, K = C*9)", "",
                  "`ops.q4k_conv2d` on the cpu backend (dequantize, then oneDNN's conv: bf16 on AMX unless exact) "
                  "against dense `F.conv2d`; ggml has no conv here.", "",
                  "| case | M | K | N | " + " | ".join(impls[:3] + impls[5:]) + " | vs dense fp32 | vs dense bf16 (bf16 x) |",
                  "|" + "---|" * (len(impls) + 4)]
        for r in res["conv"]:
            s = r["seconds"]
            cells = [f"{s[i]['median'] * 1e3:.2f} ({s[i]['p20'] * 1e3:.2f}-{s[i]['p80'] * 1e3:.2f}) "
                     f"err {r['rel_error'][i]:.1e}" for i in impls[:3] + impls[5:]]
            lines.append(f"| {r['case']} | {r['M']} | {r['K']} | {r['N']} | " + " | ".join(cells) +
                         f" | {s['dense fp32']['median'] / s['tinykern']['median']:.2f}x"
                         f" | {s['dense bf16']['median'] / s['tinykern bf16 x']['median']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tinykern.bench.cpu_vs_ggml", description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--unet-quantize", action="store_true", help="also quantize every SD1.5 UNet weight (about a minute)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    load = machine.CpuLoad().start()
    matmuls = [c for c in MATMUL_CASES if args.cases is None or c[0] in args.cases.split(",")]
    res = {"cpu": machine.device_name(torch.device("cpu")), "date": machine.now(), "threads": args.threads,
           "rounds": args.rounds, "simd": _ext.runtime_info()["simd"] if _ext.available() else None,
           "versions": {"torch": torch.__version__, "libggml-python": ggml.version()},
           "command": "python -m tinykern.bench.cpu_vs_ggml " + " ".join(argv if argv is not None else os.sys.argv[1:])}
    res["quantize"] = quantize_case(4096, 4096, max(3, args.rounds // 2), gen)
    print(json.dumps(res["quantize"]), flush=True)
    if args.unet_quantize:
        res["unet_quantize"] = quantize_unet(gen)
        print(json.dumps(res["unet_quantize"]), flush=True)
    res["matmul"] = []
    for name, m, k, n in matmuls:
        res["matmul"].append(matmul_case(name, m, k, n, args.threads, args.rounds, gen))
        print(json.dumps(res["matmul"][-1]), flush=True)
    res["conv"] = []
    for name, channels, size in CONV_CASES:
        if args.cases is None or name in args.cases.split(","):
            res["conv"].append(conv_case(name, channels, size, args.rounds, gen))
            print(json.dumps(res["conv"][-1]), flush=True)
    stats = load.stop()
    res["load"] = stats["note"] if stats else None
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, machine.slug(res["cpu"]) + "-vs-ggml")
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(res))
    print(f"wrote {base}.md and .json")


if __name__ == "__main__":
    main()
