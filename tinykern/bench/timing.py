"""Timing and peak-memory measurement of one callable, done the same way for pytest and the CLI.

GPU: triton.testing.do_bench (CUDA events around each call, L2 flushed in between), or a CUDA
event loop doing the same when Triton is missing. CPU: perf_counter around each call. Both report
the median and the 20th/80th percentiles.

Peak memory: on CUDA, torch's allocator peak above what was allocated before the call. On CPU,
torch has no allocator statistics and tracemalloc does not see its allocations, so the call runs
once under torch.profiler(profile_memory=True), whose allocation and free events give the peak
of torch's CPU allocations above the start: what torch allocated, not the process's RSS.
"""

import contextlib
import dataclasses
import json
import os
import statistics
import tempfile
import time

import torch

# Each timed row gets about this long; at least MIN_REPS calls, at most MAX_REPS.
BUDGET_S = 1.0
MIN_REPS = 3
MAX_REPS = 200
_L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2


@dataclasses.dataclass
class Timing:
    seconds: float  # median
    p20: float
    p80: float
    reps: int
    method: str

    def as_dict(self):
        return dataclasses.asdict(self)


def prepare(device):
    """Settings every timed run uses: on CUDA, cuDNN picks its fastest conv algorithm by timing
    them (cudnn.benchmark), so the F.conv2d baseline is the strongest cuDNN offers."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True


def settings(device):
    """The settings that affect timings, for the results."""
    found = {"torch_threads": torch.get_num_threads()}
    if torch.device(device).type == "cuda":
        found.update(cudnn_benchmark=torch.backends.cudnn.benchmark,
                     allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return found


def measure(fn, device, budget_s=BUDGET_S, min_reps=MIN_REPS, max_reps=MAX_REPS):
    """Time fn() on `device` (warmed up by the caller)."""
    if torch.device(device).type == "cuda":
        return _cuda(fn, budget_s, min_reps, max_reps)
    return _cpu(fn, budget_s, min_reps, max_reps)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _cpu(fn, budget_s, min_reps, max_reps):
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return _summary(times, "time.perf_counter around each call")


def _cuda(fn, budget_s, min_reps, max_reps):
    try:
        from triton.testing import do_bench
    except ImportError:
        return _cuda_events(fn, budget_s, min_reps, max_reps)
    median, p20, p80 = do_bench(fn, warmup=max(25, budget_s * 100), rep=budget_s * 1000, quantiles=[0.5, 0.2, 0.8])
    reps = max(1, int(budget_s * 1000 / max(median, 1e-6)))
    return Timing(median / 1e3, p20 / 1e3, p80 / 1e3, reps,
                  "triton.testing.do_bench: CUDA events around each call, L2 flushed in between")


def _cuda_events(fn, budget_s, min_reps, max_reps):
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    pairs = []
    start = time.perf_counter()
    while len(pairs) < max_reps and (len(pairs) < min_reps or time.perf_counter() - start < budget_s):
        flush.zero_()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        pairs.append((begin, end))
        if len(pairs) % 16 == 0:
            torch.cuda.synchronize()  # keeps the wall-clock budget honest
    torch.cuda.synchronize()
    return _summary([b.elapsed_time(e) / 1e3 for b, e in pairs], "CUDA events around each call, L2 flushed in between")


def _summary(times, method):
    ordered = sorted(times)

    def quantile(q):
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return Timing(statistics.median(ordered), quantile(0.2), quantile(0.8), len(ordered), method)


def memory_method(device):
    """How peak_memory measures on `device`, in words."""
    if torch.device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated above the start"
    return "peak of torch's CPU allocations above the start (torch.profiler memory events)"


def peak_memory(fn, device):
    """(fn's output, peak extra bytes allocated during the call, output included). On CUDA an
    untimed call comes first, so that Triton's compilation and cuDNN's autotuning are not in the
    peak; on CPU the measured call is the first."""
    device = torch.device(device)
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    current = peak = 0
    for event in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        if event["args"].get("Device Type") == 0:  # 0 is the CPU
            current += event["args"]["Bytes"]
            peak = max(peak, current)
    return out, peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2 while the profiler runs: Kineto prints start/stop lines there on every
    session, which would bury the benchmark's output. Python exceptions still propagate."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
