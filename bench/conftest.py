"""pytest-benchmark suite: `pytest bench/ --benchmark-only`.

A test named test_<kind> taking `op`, `case` and `impl` (kind: matmul, conv2d, quantize) runs
every op of that kind among the selected formats; one named test_<op> taking `case` and `impl`
runs that op (rvq_encode). Each runs every case of the shape set and every implementation of
the op (tinykern.bench.cases): tinykern's backends that `auto` could pick on the bench device,
then the baselines. Rows that cannot run here are skipped with the reason.

Environment: TINYKERN_BENCH_DEVICE (cpu | cuda; default cuda when visible), TINYKERN_BENCH_SHAPES
(tiny | small | full; default full on cuda, small on cpu), TINYKERN_BENCH_FULL=1 (full set on
cpu too), TINYKERN_BENCH_FORMATS (comma-separated formats or "all", as `python -m tinykern.bench
--formats`; default q4_k,q8_0) and TINYKERN_BENCH_THREADS (torch's CPU threads; default torch's
own choice). Test ids are "<op>-<case id>-<implementation>" ("<case id>-<implementation>" for
test_<op>), stable across runs for --benchmark-compare.
"""

import os
import time

import pytest
import torch

from tinykern.bench import cases, machine, shapes, timing

DEVICE = os.environ.get("TINYKERN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
SHAPE_SET = os.environ.get("TINYKERN_BENCH_SHAPES") or shapes.default_set(DEVICE)
FORMATS_ENV = os.environ.get("TINYKERN_BENCH_FORMATS") or ",".join(cases.DEFAULT_FORMATS)
MAX_ROUNDS = 100
_NOTES = []


def pytest_configure(config):
    # An unknown format stops the run at once, in one line, rather than as a collection error per file.
    try:
        cases.parse_formats(FORMATS_ENV)
    except ValueError as e:
        raise pytest.UsageError(f"TINYKERN_BENCH_FORMATS: {e}") from None


def pytest_generate_tests(metafunc):
    names = set(metafunc.fixturenames)
    if not {"case", "impl"} <= names:
        return
    name = metafunc.function.__name__.removeprefix("test_")
    if "op" in names:
        ops = cases.ops_for(cases.parse_formats(FORMATS_ENV), kinds=(name,))
        rows = [(op, case, impl) for op in ops for case in cases.CASES[op](SHAPE_SET) for impl in cases.impls(op)]
        metafunc.parametrize(("op", "case", "impl"), rows, ids=[f"{op}-{case.id}-{impl}" for op, case, impl in rows])
    else:
        pairs = [(case, impl) for case in cases.CASES[name](SHAPE_SET) for impl in cases.impls(name)]
        metafunc.parametrize(("case", "impl"), pairs, ids=[f"{case.id}-{impl}" for case, impl in pairs])


def pytest_terminal_summary(terminalreporter):
    if _NOTES:
        terminalreporter.section("tinykern bench notes")
        for line in _NOTES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def workspace():
    """The session's inputs (tests run case by case, so consecutive rows reuse one case's), set
    up with the timing settings (threads, cuDNN autotuning) the rows run under."""
    if os.environ.get("TINYKERN_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["TINYKERN_BENCH_THREADS"]))
    timing.prepare(DEVICE)
    return cases.Workspace()


@pytest.fixture(scope="session")
def device_name():
    return machine.device_name(DEVICE)


@pytest.fixture
def note():
    """note(line): print `line` in the summary at the end of the run."""
    return _NOTES.append


@pytest.fixture
def run_row(benchmark, workspace, device_name, request):
    """run_row(op, case, impl) -> the Row it timed. Its first call warms up, measures peak
    memory and is checked against the fp32 reference; then pytest-benchmark times it for
    about --benchmark-max-time seconds (at least 3 rounds, at most MAX_ROUNDS).

    On CUDA each timed call ends with torch.cuda.synchronize() (pytest-benchmark reads a host
    clock), so its stats include one sync per call; extra_info["device_time_s"] holds the device
    time from CUDA events (what `python -m tinykern.bench` reports) and the GB/s from it.
    """

    def run(op, case, impl):
        try:
            row = cases.prepare(op, case, impl, DEVICE, workspace)
        except cases.Unavailable as e:
            pytest.skip(str(e))
        benchmark.group = f"{op} {case.id}"
        extra = benchmark.extra_info
        extra.update(row.info(), device_name=device_name, shape_set=SHAPE_SET, **timing.settings(DEVICE))
        start = time.perf_counter()
        try:
            out, peak = timing.peak_memory(row.fn, DEVICE)
        except ValueError as e:
            pytest.skip(f"{impl} refused the shape: {e}")
        except NotImplementedError as e:
            pytest.skip(f"{impl} does not implement {op}: {e}")
        first = time.perf_counter() - start
        extra.update(row.check(out), peak_memory_bytes=peak if row.torch_memory else None,
                     memory_method=timing.memory_method(DEVICE))
        del out
        budget = float(request.config.getoption("benchmark_max_time"))  # a str when left at its default
        target = row.fn
        if torch.device(DEVICE).type == "cuda":
            device_time = timing.measure(row.fn, DEVICE, budget_s=0.3)
            extra.update(device_time_s=device_time.seconds, device_timing=device_time.method,
                         device_GBps=row.bytes / device_time.seconds / 1e9,
                         device_TFLOPs=row.flops / device_time.seconds / 1e12)
            estimate = device_time.seconds

            def target():
                row.fn()
                torch.cuda.synchronize()

        elif first < budget:  # the first call paid for profiling and one-time set-up: time another
            estimate = timing.measure(row.fn, DEVICE, budget_s=0, min_reps=1, max_reps=1).seconds
        else:
            estimate = first
        rounds = max(timing.MIN_REPS, min(MAX_ROUNDS, int(budget / max(estimate, 1e-9))))
        benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0)
        if benchmark.stats is not None:  # None under --benchmark-disable
            median = benchmark.stats.stats.median
            extra.update(GBps=row.bytes / median / 1e9, TFLOPs=row.flops / median / 1e12)
            if cases.kind(op) == "quantize":
                extra["weights_per_s"] = case.rows * case.cols / median
        return row

    return run
