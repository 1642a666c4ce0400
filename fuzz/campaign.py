"""Run fuzz targets under atheris for a while each and print what they found (`make fuzz`).

    python fuzz/campaign.py [--seconds 60] [--timeout 10] [--workdir DIR] fuzz/fuzz_<target>.py...

Each target fuzzes from its own seeds (harness.py) in DIR/<target> (a fresh temporary folder by
default). libFuzzer stops at the first crash or hang, so a target is restarted on its growing
corpus until its time is spent. Per target it prints the inputs tried, how many were refused and
accepted, the silent successes (accepted though mutated from a seed) and those of them the
target flags as breaking a rule of the format, then the crashes, hangs (past --timeout) and
out-of-memory inputs libFuzzer saved, by file. The exit status is 1 if any of the last four
is nonzero. The work folder is kept when something was found and removed otherwise.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

FOUND = {"crash": "crashes", "timeout": "hangs", "oom": "out of memory"}
COUNTS = ("tried", "refused", "accepted", "silent", "suspicious")
FAILED_START_S = 5  # a run that dies sooner without saving an input cannot start: stop retrying


def campaign(script, seconds, timeout, folder):
    name = os.path.splitext(os.path.basename(script))[0]
    corpus, artifacts = os.path.join(folder, "corpus"), os.path.join(folder, "artifacts")
    os.makedirs(corpus, exist_ok=True)
    os.makedirs(artifacts, exist_ok=True)
    totals = dict.fromkeys(COUNTS, 0)
    examples, problems = [], []
    deadline, run = time.monotonic() + seconds, 0
    while (left := int(deadline - time.monotonic())) >= 1:
        run += 1
        stats, log = os.path.join(folder, f"stats-{run}.json"), os.path.join(folder, f"log-{run}.txt")
        before = set(os.listdir(artifacts))
        started = time.monotonic()
        with open(log, "w") as out:
            done = subprocess.run([sys.executable, script, corpus, f"-max_total_time={left}", f"-timeout={timeout}",
                                   f"-artifact_prefix={artifacts}{os.sep}"],
                                  env={**os.environ, "FUZZ_STATS": stats, "FUZZ_WORKDIR": folder}, stdout=out, stderr=subprocess.STDOUT)
        if os.path.exists(stats):
            with open(stats) as f:
                counts = json.load(f)
            for key in COUNTS:
                totals[key] += counts[key]
            examples += counts["suspicious_examples"]
        if done.returncode and set(os.listdir(artifacts)) == before:
            problems.append(f"run {run} exited with {done.returncode} and saved no input: see {log}")
            if time.monotonic() - started < FAILED_START_S:
                break
    found = {kind: sorted(f for f in os.listdir(artifacts) if f.startswith(kind + "-")) for kind in FOUND}
    return name, run, totals, examples, found, problems


def report(name, runs, totals, examples, found, problems, folder):
    print(f"\n{name}: {runs} run(s) in {folder}")
    print("  " + ", ".join(f"{key} {totals[key]}" for key in COUNTS))
    print("  " + ", ".join(f"{label} {len(found[kind])}" for kind, label in FOUND.items()))
    for reason in examples[:5]:
        print(f"  suspicious: {reason}")
    for kind, files in found.items():
        for f in files[:5]:
            print(f"  {kind}: {os.path.join(folder, 'artifacts', f)}")
    for line in problems:
        print(f"  {line}")
    return totals["suspicious"] or any(found.values()) or problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", help="fuzz/fuzz_<target>.py scripts")
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per target")
    parser.add_argument("--timeout", type=int, default=10, help="seconds after which one input is a hang")
    parser.add_argument("--workdir", help="where corpora and found inputs go (default: a temporary folder)")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="tinykern-fuzz-")
    bad = False
    for script in args.targets:
        folder = os.path.join(workdir, os.path.splitext(os.path.basename(script))[0])
        bad |= bool(report(*campaign(script, args.seconds, args.timeout, folder), folder))
    if not bad and not args.workdir:
        shutil.rmtree(workdir)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
