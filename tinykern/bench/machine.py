"""What the benchmark ran on: device name, versions, and how busy the machine was meanwhile."""

import datetime
import os
import platform
import re

import torch


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(name):
    """A file name for a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def describe(device):
    device = torch.device(device)
    info = {"type": device.type, "name": device_name(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}")
    else:
        info.update(cores=os.cpu_count(), torch_threads=torch.get_num_threads())
    return info


def versions():
    import tinykern
    from tinykern import _ext

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    runtime = _ext.runtime_info() if _ext.available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version, "tinykern": tinykern.__version__,
            "tinykern._C": runtime if runtime is not None else f"not loaded ({_ext.ERROR})",
            # The baselines' versions: their rows measure these releases.
            **{name: dist_version(name) for name in ("diffusers", "vector-quantize-pytorch", "gguf")}}


def dist_version(name):
    """The installed version of distribution `name`, or None."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class CpuLoad:
    """How much of the machine's CPU time other processes took between start() and stop(), from
    /proc/stat (all CPUs) minus this process's own CPU time. Linux only; None elsewhere."""

    def start(self):
        self._stat, self._own, self._load = _proc_stat(), _own_cpu_seconds(), _loadavg()
        return self

    def stop(self):
        stat, own = _proc_stat(), _own_cpu_seconds()
        if stat is None or self._stat is None:
            return None
        busy = (stat[0] - self._stat[0]) / _TICKS
        total = (stat[1] - self._stat[1]) / _TICKS
        others = max(0.0, busy - (own - self._own)) / total if total > 0 else 0.0
        return {"other_processes_cpu_share": round(others, 3), "cpus": os.cpu_count(),
                "loadavg_1min_start": self._load, "loadavg_1min_end": _loadavg(),
                "shared": others > 0.05,
                "note": _load_note(others)}


def _load_note(others):
    if others <= 0.05:
        return "the machine was otherwise idle during the run"
    note = (f"other processes used {100 * others:.0f}% of this machine's CPU time during the run: timings are "
            "slower and noisier than on an idle machine")
    if torch.get_num_threads() > 1:
        # Each multi-threaded op waits for its slowest thread, and a descheduled one costs a time slice.
        note += "; with torch's threads competing for the cores, --threads 1 gives steadier figures"
    return note


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat():
    """(busy ticks, total ticks) summed over all CPUs, or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user/nice
    return total - idle, total


def _own_cpu_seconds():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _loadavg():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
