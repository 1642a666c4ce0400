"""`python -m tinykern.bench`: measure this machine's ceilings, then every op, shape and
implementation of the selected formats, and write <out>/<device>.json, .md and a roofline .png."""

import argparse
import sys

import torch

from tinykern.bench import cases, report, shapes, suite
from tinykern.formats import FORMATS


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tinykern.bench", description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="short timings and smaller ceiling runs (a smoke run)")
    parser.add_argument("--shapes", choices=shapes.SETS, default=None,
                        help="shape set; default: full on cuda (or with TINYKERN_BENCH_FULL=1), small on cpu")
    parser.add_argument("--formats", default=None,
                        help=f"comma-separated formats whose matmul, conv2d and quantize ops run, or 'all' "
                             f"(every one of {','.join(FORMATS)}); default: the formats of --ops when given, "
                             f"else {','.join(cases.DEFAULT_FORMATS)}")
    parser.add_argument("--ops", default=None,
                        help="comma-separated ops: each format's matmul, conv2d and quantize, named as the backends "
                             "name them (q4k_matmul, q8_0_conv2d, q5_k_quantize, ...), and rvq_encode; "
                             "default: every op of --formats")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON, Markdown and PNG files")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice); recorded in the JSON")
    args = parser.parse_args(argv)

    try:
        ops = _select(args.formats, args.ops)
    except ValueError as e:
        # One line, before any measuring: a typo should not cost a ceilings run.
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
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


def _select(formats, op_list):
    """The ops to run from --formats and --ops; ValueError (one line) for an unknown name or an
    op outside the selected formats."""
    ops = None if op_list is None else tuple(dict.fromkeys(o.strip() for o in op_list.split(",") if o.strip()))
    if ops is not None:
        unknown = [o for o in ops if o not in cases.OPS]
        if unknown or not ops:
            raise ValueError(f"unknown ops {unknown or [op_list]}; expected some of {','.join(cases.OPS)}")
    if formats is None:
        if ops is not None:
            return ops
        return cases.ops_for(cases.DEFAULT_FORMATS)
    selected = cases.ops_for(cases.parse_formats(formats))
    if ops is None:
        return selected
    outside = [o for o in ops if o not in selected]
    if outside:
        raise ValueError(f"ops {outside} are not ops of --formats {formats}")
    return ops


if __name__ == "__main__":
    sys.exit(main())
