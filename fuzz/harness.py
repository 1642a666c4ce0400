"""What every fuzz target in this folder shares: the atheris entry point and a batch worker for tests.

Convention for a target, `fuzz/fuzz_<target>.py`:

* It is runnable as `python fuzz/fuzz_<target>.py [libFuzzer args...]` and ends with
  `if __name__ == "__main__": harness.main(__file__)`. Without a corpus directory among the
  arguments it fuzzes from a fresh temporary one; an empty corpus directory is filled with seeds.
* It imports the code under test inside `with harness.instrumented("tinykern", ...):` so that
  atheris sees coverage of those packages only (instrumenting torch would slow every input).
* It defines, at module level (the test worker below imports it without running `main`):
    - `seeds()`: a list of bytes, small valid input files built at run time (nothing binary is
      committed);
    - `load(path)`: the operation under test on the input file `path`. Raising ValueError is a
      refusal, the expected outcome for a damaged file. When it accepts the file, it checks that
      what it got is self-consistent and raises AssertionError if not;
    - optionally `REFUSALS`: the exception types that count as refusals, when the function under
      test documents more than ValueError (e.g. `(ValueError, OSError)`);
    - optionally `suspicious(path)`: for an accepted input, a string saying which rule of the
      format it breaks (so it should have been refused), or None.
* Any other exception is a crash; libFuzzer stops on it and writes the input as `crash-<sha1>`.
  A hang is an input that runs past libFuzzer's `-timeout=` (written as `timeout-<sha1>`).

Each input is written to a file in $FUZZ_WORKDIR (a temporary folder if unset). Counts (inputs
tried, refused, accepted, silent successes = accepted inputs that differ from every seed,
suspicious = silent successes that `suspicious` flags) go to the JSON file named by $FUZZ_STATS,
at most STATS_EVERY_S old when libFuzzer ends the process. `fuzz/campaign.py` runs the targets
(`make fuzz`) and prints these counts.

Tests run inputs through `run_inputs` (or `run_batch`): one worker process loads files one after
another and reports each outcome, so a hang (time limit) or a signal is pinned on the input that
caused it; `failures` lists what is wrong with the outcomes.
"""

import contextlib
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback

STATS_EVERY_S = 0.2


def instrumented(*packages):
    """A context for the imports of the code under test: atheris instruments `packages` when this
    process is a fuzzer (its main script a fuzz_<target>.py) and atheris is installed; nothing is
    instrumented in a test worker."""
    script = getattr(sys.modules["__main__"], "__file__", None) or ""
    if not os.path.basename(script).startswith("fuzz_"):
        return contextlib.nullcontext()
    try:
        import atheris
    except ImportError:
        return contextlib.nullcontext()  # main() says how to install it
    return atheris.instrument_imports(include=list(packages))


def load_target(script):
    """The module of a fuzz target script, imported without running its `main`."""
    name = os.path.splitext(os.path.basename(script))[0]
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def attempt(target, path):
    """Run `target.load` on `path`: ("refused" | "accepted" | "crash", detail, suspicious reason)."""
    try:
        target.load(path)
    except getattr(target, "REFUSALS", (ValueError,)) as e:
        return "refused", f"{type(e).__name__}: {e}", None
    except Exception as e:  # every other exception is what the fuzzer looks for
        return "crash", "".join(traceback.format_exception_only(e)).strip(), None
    check = getattr(target, "suspicious", None)
    try:
        return "accepted", "", check(path) if check else None
    except Exception as e:  # a broken oracle must be seen, not taken for a verdict on the input
        return "crash", "suspicious(): " + "".join(traceback.format_exception_only(e)).strip(), None


class _Stats:
    def __init__(self, seeds):
        self.path = os.environ.get("FUZZ_STATS")
        self.seeds = set(seeds)
        self.counts = dict(tried=0, refused=0, accepted=0, silent=0, suspicious=0)
        self.examples = []
        self.written = 0.0

    def add(self, data, outcome, reason):
        self.counts["tried"] += 1
        if outcome in self.counts:
            self.counts[outcome] += 1
        if outcome == "accepted" and data not in self.seeds:
            self.counts["silent"] += 1
            if reason:
                self.counts["suspicious"] += 1
                if len(self.examples) < 5:
                    self.examples.append(reason)
        if time.monotonic() - self.written > STATS_EVERY_S:
            self.write()

    def write(self):
        self.written = time.monotonic()
        if self.path:
            with open(self.path + ".tmp", "w") as f:
                json.dump({**self.counts, "suspicious_examples": self.examples}, f)
            os.replace(self.path + ".tmp", self.path)


def main(script):
    """The atheris entry point of the target `script` (its `__file__`), run as the main script."""
    try:
        import atheris
    except ImportError:
        sys.exit(f"{script}: atheris is not installed (`make fuzz` installs it, or pip install atheris)")
    target = sys.modules["__main__"]  # the script, its imports instrumented
    seeds = target.seeds()
    args = list(sys.argv)
    corpus = next((a for a in args[1:] if not a.startswith("-")), None)
    if corpus is None:
        corpus = tempfile.mkdtemp(prefix="corpus-")
        args.append(corpus)
    os.makedirs(corpus, exist_ok=True)
    if not os.listdir(corpus):
        for i, seed in enumerate(seeds):
            with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
                f.write(seed)
    stats = _Stats(seeds)
    # libFuzzer ends the process without Python's clean-up: the input file goes where the caller
    # cleans up (campaign.py's folder), or in a temporary folder named here.
    work = os.environ.get("FUZZ_WORKDIR") or tempfile.mkdtemp(prefix="fuzz-input-")
    print(f"{script}: corpus {corpus}, each input written to {work}", file=sys.stderr)
    path = os.path.join(work, "input" + getattr(target, "SUFFIX", ""))

    def one_input(data):
        with open(path, "wb") as f:
            f.write(data)
        outcome, detail, reason = attempt(target, path)
        stats.add(data, outcome, reason)
        if outcome == "crash":
            stats.write()
            raise RuntimeError(f"{os.path.basename(script)}: not a refusal: {detail}")

    atheris.Setup(args, one_input)
    atheris.Fuzz()


def _worker(script, listing):
    """Load each path listed in the file `listing` with the target; print one JSON outcome a line."""
    report = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the code under test prints must not mix with the outcomes
    target = load_target(script)
    print(json.dumps({"ready": True}), file=report, flush=True)
    with open(listing) as f:
        paths = f.read().splitlines()
    for path in paths:
        outcome, detail, reason = attempt(target, path)
        print(json.dumps({"outcome": outcome, "detail": detail, "suspicious": reason}), file=report, flush=True)


def run_batch(script, paths, timeout_s=10.0, startup_s=180.0):
    """{path: {"outcome", "detail", "suspicious"}} for every path, loaded by the target `script`
    in a worker process. An input that runs past `timeout_s` is a "hang", one that kills the
    worker a "signal" (or "exit"); the worker is then restarted for the inputs after it."""
    results, todo = {}, list(paths)
    while todo:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as listing:
            listing.write("".join(p + "\n" for p in todo))
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", script, listing.name],
                                stdout=subprocess.PIPE)
        lines = _lines(proc.stdout.fileno())
        first = next(lines(startup_s), None)
        if first is None:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{script}: the fuzz worker did not start within {startup_s} s")
        while todo:
            line = next(lines(timeout_s), None)
            if line is None:
                break
            results[todo.pop(0)] = json.loads(line)
        if todo:  # the worker hung or died on todo[0]
            if proc.poll() is None:
                proc.kill()
                results[todo.pop(0)] = {"outcome": "hang", "detail": f"no outcome within {timeout_s} s", "suspicious": None}
            else:
                code = proc.returncode
                kind = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
                results[todo.pop(0)] = {"outcome": "signal" if code < 0 else "exit", "detail": kind, "suspicious": None}
        proc.wait()
        proc.stdout.close()
        os.unlink(listing.name)
    return results


def run_inputs(script, folder, inputs):
    """Write each (family, label, data, must_refuse) of `inputs` to a file in `folder` (with the
    target's SUFFIX) and load them all through run_batch: {family: [(label, path, must_refuse,
    outcome)]}, in the order given."""
    suffix = getattr(load_target(script), "SUFFIX", "")
    paths = []
    for i, (_, _, data, _) in enumerate(inputs):
        paths.append(os.path.join(folder, f"input-{i}{suffix}"))
        with open(paths[-1], "wb") as f:
            f.write(data)
    results = run_batch(script, paths)
    by_family = {}
    for (family, label, _, must_refuse), path in zip(inputs, paths):
        by_family.setdefault(family, []).append((label, path, must_refuse, results[path]))
    return by_family


def failures(rows):
    """What is wrong with rows of run_inputs, a line each: a crash, hang or signal; a refusal
    that does not name the file; an acceptance of an input that must be refused or that the
    target's `suspicious` flags."""
    bad = []
    for label, path, must_refuse, result in rows:
        outcome = result["outcome"]
        if outcome == "refused" and path not in result["detail"]:
            bad.append(f"{label}: the error does not name the file: {result['detail']}")
        elif outcome == "accepted" and result["suspicious"]:
            bad.append(f"{label}: silent success: {result['suspicious']}")
        elif outcome == "accepted" and must_refuse:
            bad.append(f"{label}: accepted, though no valid file can hold it")
        elif outcome not in ("refused", "accepted"):
            bad.append(f"{label}: {outcome}: {result['detail']}")
    return bad


def assert_family(outcomes, family):
    """Fail naming the inputs of `family` (rows of run_inputs) that break the rules, or when none
    was refused: then the mutations never reached the checks."""
    rows = outcomes[family]
    bad = failures(rows)
    assert not bad, f"{len(bad)} of {len(rows)} inputs:\n" + "\n".join(bad[:20])
    assert any(r["outcome"] == "refused" for *_, r in rows), f"no {family} mutation was refused"


def assert_seeds_accepted(outcomes):
    """Fail naming each seed (valid by construction) that was not accepted, with what happened."""
    refused = [f"{label}: {r['outcome']}: {r['detail']}" for label, _, _, r in outcomes["seed"] if r["outcome"] != "accepted"]
    assert not refused, f"{len(refused)} of {len(outcomes['seed'])} seeds not accepted:\n" + "\n".join(refused)


def _lines(fd):
    """A reader of whole lines from `fd`: lines(t) yields the next line, or stops after t seconds
    without one (or at the end of the stream)."""
    buffer = b""

    def lines(timeout_s):
        nonlocal buffer
        deadline = time.monotonic() + timeout_s
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        yield line.decode()

    return lines


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2], sys.argv[3])
