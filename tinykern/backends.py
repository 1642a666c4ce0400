"""Which implementation runs an op on a device: "triton", "cuda", "cpu" or "torch".

"cpu" and "cuda" are the C++/CUDA kernels of tinykern._C, "triton" the Triton kernels, "torch"
the plain-torch reference. Implementations register here; `auto` takes the first available
one in AUTO_ORDER, and a forced backend that cannot run raises instead of falling back.
"""

import contextlib
import contextvars
import importlib
import os

import torch

from tinykern import _ext

BACKENDS = ("triton", "cuda", "cpu", "torch")

# Preference of `auto` per device type. On CUDA the Triton kernels come first, the CUDA
# kernels second; on CPU the C++ kernels beat the reference (dequantize, then F.linear) on most
# shapes in bench/results/, but not on the widest (M 8192, K 320: 1.2-1.3x slower).
# Triton on CPU (the interpreter) is a correctness tool and is never picked by `auto`.
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

_IMPLS = {}
_forced = contextvars.ContextVar("tinykern_backend", default=None)
_exact = contextvars.ContextVar("tinykern_exact", default=False)
_meta_impls = contextvars.ContextVar("tinykern_meta_impls", default=None)
_loaded = set()
# Modules that register implementations of each backend, imported on first use.
_PROVIDERS = {
    "torch": ("tinykern.kernels.torch",),
    "cpu": ("tinykern.kernels.native",),
    "cuda": ("tinykern.kernels.native",),
    "triton": ("tinykern.kernels.triton",),
}


def register(op, backend):
    """Decorator: `fn` implements `op` on `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def decorate(fn):
        _IMPLS[(op, backend)] = fn
        return fn

    return decorate


@contextlib.contextmanager
def backend(name, exact=False):
    """Force `name` for every op called in this context (`"auto"` restores the default).

    exact=True keeps every product of the CPU matmul kernels in fp32. By default the Q4_K and
    Q8_0 CPU kernels round x to int8 per block below 128 rows (as ggml's Q8_K / Q8_0 activations:
    integer dot products, relative error about 6-7e-3 against float64, ggml's own on the same
    data), and from 256 rows of fp32 or bf16 x on a CPU with bf16 hardware (AMX-BF16 or
    AVX512-BF16) they round x, the weight, the bias and the output to bf16 (fp32 accumulation:
    about 2.9e-3). Other backends compute in fp32 either way."""
    preload(_check_name(name))
    token, exact_token = _forced.set(name), _exact.set(bool(exact))
    try:
        yield
    finally:
        _forced.reset(token)
        _exact.reset(exact_token)


def exact():
    """Whether the current context asked for fp32-exact CPU matmuls (see backend())."""
    return _exact.get()


@contextlib.contextmanager
def meta_implementations(impls):
    """On meta tensors, run impls[op] (a function taking the op's arguments) for the ops it
    names: a memory planner's model of what a device backend allocates (tinykern.memtrace)."""
    token = _meta_impls.set(dict(impls))
    try:
        yield
    finally:
        _meta_impls.reset(token)


def current():
    """The forced backend (context manager first, then TINYKERN_BACKEND), or "auto"."""
    return _forced.get() or _check_name(os.environ.get("TINYKERN_BACKEND", "auto"))


def unavailable_reason(name, device_type, op=None):
    """Why backend `name` cannot run (op) on `device_type`, or None when it can."""
    if name == "torch":
        reason = None
    elif name in ("cpu", "cuda"):
        if device_type != name:
            return f"the {name} backend runs on {name} tensors, not {device_type}"
        if not _ext.available():
            return f"tinykern._C is not built ({_ext.ERROR})"
        if name == "cuda" and not _ext.runtime_info()["cuda"]:
            return "tinykern._C was built without its CUDA sources (no nvcc or a CPU torch)"
        reason = None
    elif name == "triton":
        reason = _triton_reason(device_type)
    else:
        return f"unknown backend {name!r}"
    if reason is None and op is not None:
        _load(name)
        if (op, name) not in _IMPLS:
            return f"the {name} backend has no {op} kernel"
    return reason


def preload(name=None, device_types=None):
    """Import the implementations of backend `name` ("auto": of every backend `auto` may pick;
    None: those and the one forced now, by backend() or TINYKERN_BACKEND) that can run on
    `device_types` (default: CPU, and CUDA when a GPU is present).

    resolve() imports them on first use, but torch.compile cannot trace an import, so whatever
    is compiled before any eager call must find them loaded: backend() calls this on entry,
    the quantized modules on construction and tinykern.ops on import (CPU only: no device
    query at import)."""
    device_types = device_types or (("cpu", "cuda") if torch.cuda.is_available() else ("cpu",))
    names = {name} if name not in (None, "auto") else {n for t in device_types for n in AUTO_ORDER[t]}
    # An unknown TINYKERN_BACKEND is for resolve() to refuse, not for an import or constructor.
    forced = _forced.get() or os.environ.get("TINYKERN_BACKEND")
    if name is None and forced in BACKENDS:
        names.add(forced)
    for n in sorted(names):
        if any(unavailable_reason(n, t) is None for t in device_types):
            _load(n)


def resolve(op, device):
    """(backend name, implementation) that runs `op` on `device` under the current setting."""
    device_type = device.type if hasattr(device, "type") else str(device)
    if device_type == "meta" and op in (_meta_impls.get() or {}):
        return "meta", _meta_impls.get()[op]
    wanted = current()
    if wanted != "auto":
        reason = unavailable_reason(wanted, device_type, op)
        if reason is not None:
            raise RuntimeError(f"tinykern backend {wanted!r} cannot run {op} on {device_type}: {reason}")
        return wanted, _IMPLS[(op, wanted)]
    order = AUTO_ORDER.get(device_type, ("torch",))
    for name in order:
        if unavailable_reason(name, device_type, op) is None:
            return name, _IMPLS[(op, name)]
    raise RuntimeError(f"no tinykern backend implements {op} on {device_type}")


def _load(name):
    for module in _PROVIDERS[name]:
        if module not in _loaded:
            importlib.import_module(module)
            _loaded.add(module)


def _triton_reason(device_type):
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({e})"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    if device_type not in ("cpu", "cuda"):
        return f"Triton kernels are not built for {device_type}"
    return None


def _check_name(name):
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown tinykern backend {name!r}; expected 'auto' or one of {BACKENDS}")
    return name
