"""The machine's own ceilings, measured in the same run as the kernels: the roofline's roof.

GPU: device-to-device copy bandwidth (bytes read + written) and the fp16 matmul rate of a large
square cuBLAS GEMM. CPU: memory copy bandwidth over buffers larger than the last-level cache and
the fp32 GEMM rate of torch's BLAS with all of torch's threads. They are what this machine
reaches with vendor code, not datasheet peaks, so a kernel may exceed them (a working set that
fits in cache, a better GEMM): the report prints such rows above 100%.
"""

import dataclasses
import glob
import os

import torch

from tinykern.bench import timing

_GIB = 1 << 30


@dataclasses.dataclass
class Ceilings:
    bandwidth: float  # bytes/s, read + written
    flops: float  # FLOP/s in `dtype`
    dtype: str
    details: dict

    def as_dict(self):
        return {"bandwidth_GBps": self.bandwidth / 1e9, "flops_TFLOPs": self.flops / 1e12, "dtype": self.dtype,
                **self.details}

    def percent(self, nbytes, flops, seconds):
        """Roofline share: the larger of the bandwidth share and the compute share, and which."""
        bw_share = nbytes / seconds / self.bandwidth
        flop_share = flops / seconds / self.flops
        return (100 * bw_share, "memory") if bw_share >= flop_share else (100 * flop_share, "compute")


def measure(device, quick=False):
    device = torch.device(device)
    if device.type == "cuda":
        copy_bytes = (256 << 20) if quick else _GIB
        gemm_n, dtype = (4096 if quick else 8192), torch.float16
    else:
        copy_bytes = (64 << 20) if quick else min(_GIB, max(256 << 20, 2 * (_last_level_cache() or 0)))
        gemm_n, dtype = (1024 if quick else 2048), torch.float32
    budget = timing.BUDGET_S / 2 if quick else timing.BUDGET_S

    src = torch.ones(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy = timing.measure(lambda: dst.copy_(src), device, budget)
    del src, dst

    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(gemm_n, gemm_n, device=device, generator=gen).to(dtype)
    b = torch.randn(gemm_n, gemm_n, device=device, generator=gen).to(dtype)
    torch.mm(a, b)
    gemm = timing.measure(lambda: torch.mm(a, b), device, budget)

    details = {
        "copy": {"bytes_each_way": copy_bytes, "seconds": copy.seconds, "method": f"dst.copy_(src), {copy.method}"},
        "gemm": {"n": gemm_n, "seconds": gemm.seconds, "method": f"torch.mm {gemm_n}^3 {dtype}, {gemm.method}"},
    }
    if device.type == "cpu":
        details["threads"] = torch.get_num_threads()
        details["last_level_cache_bytes"] = _last_level_cache()
    return Ceilings(2 * copy_bytes / copy.seconds, 2 * gemm_n ** 3 / gemm.seconds, str(dtype).replace("torch.", ""),
                    details)


def _last_level_cache():
    """Bytes of CPU 0's largest cache level (Linux sysfs), or None."""
    best_level, best_size = 0, None
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(index, "level")) as f:
                level = int(f.read())
            with open(os.path.join(index, "size")) as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        if level > best_level:
            best_level, best_size = level, size
    return best_size
