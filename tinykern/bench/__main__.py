"""`python -m tinykern.bench`: measure this machine's ceilings, then every op, shape and
implementation, and write <out>/<device>.json, .md and a roofline .png."""

import argparse
import sys

import torch

from tinykern.bench import cases, report, shapes, suite


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tinykern.bench", description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="short timings and smaller ceiling runs (a smoke run)")
    parser.add_argument("--shapes", choices=shapes.SETS, default=None,
                        help="shape set; default: full on cuda (or with TINYKERN_BENCH_FULL=1), small on cpu")
    parser.add_argument("--ops", default=",".join(cases.OPS), help=f"comma-separated subset of {','.join(cases.OPS)}")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON, Markdown and PNG files")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice); recorded in the JSON")
    args = parser.parse_args(argv)

    ops = tuple(o for o in args.ops.split(",") if o)
    unknown = [o for o in ops if o not in cases.OPS]
    if unknown:
        parser.error(f"unknown ops {unknown}; expected some of {list(cases.OPS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape_set = args.shapes or shapes.default_set(args.device)
    results = suite.run(args.device, shape_set, quick=args.quick, ops=ops)
    for path in report.write(results, args.out):
        print(f"wrote {path}")
    if results["plot"] == report.MATPLOTLIB_MISSING:
        print(report.MATPLOTLIB_MISSING, file=sys.stderr)
    for line in results["headline"]:
        print(line)
    if results["machine_load"] and results["machine_load"]["shared"]:
        print(f"note: {results['machine_load']['note']}")
    return 1 if any("error" in r for r in results["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
