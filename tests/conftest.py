import contextlib
import ctypes
import functools
import os

import numpy as np
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run through the interpreter: a logic check, not a
    # numerics oracle. It must be set before any @triton.jit function is created.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Create every @triton.jit function now, under the interpreter: Triton decides at creation,
    # so a test that unsets the variable must never be the first to import the kernels.
    try:
        import tinykern.kernels.triton  # noqa: F401
    except ImportError:  # Triton not installed: its backend reports itself unavailable
        pass

import pytest  # noqa: E402

from tinykern import backends  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKEND_CASES = [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in backends.BACKENDS
                 if not (d == "cpu" and b == "cuda") and not (d == "cuda" and b == "cpu")]


@contextlib.contextmanager
def forced(op, backend, device, exact=False):
    """Run the body with `backend` forced (fp32-exact CPU matmuls if `exact`), or skip the test
    saying why it cannot run."""
    reason = backends.unavailable_reason(backend, torch.device(device).type, op)
    if reason is not None:
        pytest.skip(reason)
    with backends.backend(backend, exact=exact):
        yield


def relative_error(actual, expected):
    """||actual - expected|| / ||expected||, in float64."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm()).item()


def refused(capsys, *argv):
    """The one stderr line with which `tinykern *argv` refuses its arguments (exit code 2)."""
    from tinykern.__main__ import main

    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def gen():
    """A seeded CPU generator: fresh random data per test, reproducible across runs."""
    return torch.Generator().manual_seed(1234)


@functools.lru_cache(maxsize=None)
def _libggml_base():
    """libggml-base.so of the libggml-python wheel (the `test` extra), or why it is not there."""
    try:
        import libggml
    except ImportError as e:
        return f"libggml-python is not installed ({e})"
    try:
        return ctypes.CDLL(os.path.join(libggml.__path__[0], "lib64", "libggml-base.so"))
    except OSError as e:
        return f"libggml-python's libggml-base.so does not load ({e})"


def ggml_reference_quantize(fmt, x):
    """x (a float tensor or array [..., K], K whole blocks of `fmt`, a tinykern.formats record)
    as libggml's reference quantizer quantize_row_<type>_ref packs it: uint8 tensor
    [..., K/block*block_bytes]. Skips the test where libggml-python is missing."""
    from gguf import GGMLQuantizationType

    base = _libggml_base()
    if isinstance(base, str):
        pytest.skip(base)
    name = GGMLQuantizationType(fmt.ggml_type).name  # "Q4_K": ggml's symbols spell it "q4_K"
    fn = getattr(base, f"quantize_row_{name[0].lower()}{name[1:]}_ref")  # missing: a wheel without a format we write
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    src = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else x
    src = np.ascontiguousarray(src, dtype=np.float32)
    out = np.empty((*src.shape[:-1], src.shape[-1] // fmt.block * fmt.block_bytes), dtype=np.uint8)
    fn(src.ctypes.data, out.ctypes.data, src.size)  # blocks run along the flat array: rows are whole blocks
    return torch.from_numpy(out)
