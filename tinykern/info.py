"""`python -m tinykern info`: what this installation can run, and how it was built."""

import json
import os
import platform

import torch

import tinykern
from tinykern import _ext, backends

_OPS = ("q4k_matmul", "q4k_conv2d", "q8_0_matmul", "rvq_encode")


def report():
    lines = [
        f"tinykern {tinykern.__version__}",
        f"python {platform.python_version()} on {platform.machine()}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton {_triton_version()}",
        f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'}",
    ]
    if _ext.available():
        runtime = _ext.runtime_info()
        lines.append(f"extension tinykern._C: built (CUDA kernels {'compiled' if runtime['cuda'] else 'not compiled'}; "
                     f"CPU path {runtime['simd']}; OpenMP {'on, ' + str(runtime['openmp_threads']) + ' threads' if runtime['openmp'] else 'off'})")
    else:
        lines.append(f"extension tinykern._C: not available ({_ext.ERROR})")
    build = _build_info()
    if build:
        lines.append("build flags: " + ", ".join(f"{k}={v}" for k, v in build.items() if v is not None))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        lines.append(f"backends on {device}:")
        for name in backends.BACKENDS:
            reasons = {op: backends.unavailable_reason(name, device, op) for op in _OPS}
            usable = [op for op, r in reasons.items() if r is None]
            if usable:
                lines.append(f"  {name:<7} usable for {', '.join(usable)}")
            else:
                lines.append(f"  {name:<7} unavailable: {next(iter(reasons.values()))}")
        lines.append(f"  auto picks {backends.resolve('q4k_matmul', torch.device(device))[0]} for q4k_matmul")
    return "\n".join(lines)


def _triton_version():
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def _build_info():
    path = os.path.join(os.path.dirname(tinykern.__file__), "_build_info.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
