"""`python -m tinykern info`: what this installation can run, and how it was built."""

import json
import os
import platform

import torch

import tinykern
from tinykern import _ext, backends
from tinykern.formats import FORMATS

_KINDS = ("matmul", "conv2d")


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
            reason = backends.unavailable_reason(name, device)
            if reason is not None:
                lines.append(f"  {name:<7} unavailable: {reason}")
                continue
            usable = []
            for kind in _KINDS:
                formats = [f.name for f in FORMATS.values() if backends.unavailable_reason(name, device, f.op(kind)) is None]
                usable.append(f"{kind} of {_listed(formats)}")
            if backends.unavailable_reason(name, device, "rvq_encode") is None:
                usable.append("rvq_encode")
            lines.append(f"  {name:<7} usable for {'; '.join(usable)}")
        lines.append(f"  auto picks {backends.resolve('q4k_matmul', torch.device(device))[0]} for q4k_matmul")
    return "\n".join(lines)


def _listed(formats):
    return "every format" if len(formats) == len(FORMATS) else (", ".join(formats) or "no format")


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
