"""Loads the compiled extension tinykern._C, which registers the native ops on import."""

import warnings

import torch  # noqa: F401  (_C links against libc10/libtorch: they must be loaded first)

try:
    from tinykern import _C
except ImportError as e:  # a pure-Python install, or a build that failed
    _C = None
    ERROR = f"{type(e).__name__}: {e}"
    warnings.warn(
        f"tinykern._C could not be loaded ({ERROR}); the cpu and cuda backends are off and "
        "ops run on the torch reference (or Triton). Reinstall with "
        "`pip install --no-build-isolation -e .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    ERROR = None


def available():
    return _C is not None


def runtime_info():
    """SIMD level, OpenMP and CUDA of the loaded build, or None when it is missing."""
    return _C.runtime_info() if _C is not None else None
