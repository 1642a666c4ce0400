"""ggml's CPU code from the libggml-python wheel, through ctypes, as benchmark baselines: its
reference quantizers (quantize_row_q4_K_ref, quantize_row_q8_0_ref: one thread) and its Q4_K /
Q8_0 mul_mat on the CPU backend, on plain GGUF blocks or repacked at upload into the interleaved
layout of its "CPU_REPACK" buffer type (q4_K_8x8 where the CPU has AVX2). ggml quantizes the
activations to 8 bits (Q8_K / Q8_0) itself.
"""

import ctypes
import functools
import os

import numpy as np
import torch

from tinykern.formats import q4k, q8_0

GGML_TYPE = {"f32": 0, "q8_0": 8, "q4k": 12}
_BLOCK = {"q4k": (q4k.BLOCK, q4k.BLOCK_BYTES), "q8_0": (q8_0.BLOCK, q8_0.BLOCK_BYTES)}


class Unavailable(Exception):
    """libggml-python is missing or lacks a symbol; str() says which."""


@functools.lru_cache(maxsize=None)
def _libs():
    try:
        import libggml
    except ImportError as e:
        raise Unavailable(f"libggml-python is not installed ({e})") from None
    lib64 = os.path.join(libggml.__path__[0], "lib64")
    try:
        base = ctypes.CDLL(os.path.join(lib64, "libggml-base.so"))
        cpu = ctypes.CDLL(os.path.join(lib64, "libggml-cpu.so"))
    except OSError as e:
        raise Unavailable(f"libggml-python's libraries do not load ({e})") from None
    p, i64, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
    sigs = [
        (base, "quantize_row_q4_K_ref", [p, p, i64], None),
        (base, "quantize_row_q8_0_ref", [p, p, i64], None),
        (base, "ggml_init", [_InitParams], p),
        (base, "ggml_free", [p], None),
        (base, "ggml_tensor_overhead", [], sz),
        (base, "ggml_graph_overhead", [], sz),
        (base, "ggml_new_tensor_2d", [p, ctypes.c_int, i64, i64], p),
        (base, "ggml_mul_mat", [p, p, p], p),
        (base, "ggml_new_graph", [p], p),
        (base, "ggml_build_forward_expand", [p, p], None),
        (base, "ggml_backend_alloc_ctx_tensors_from_buft", [p, p], p),
        (base, "ggml_backend_buffer_free", [p], None),
        (base, "ggml_backend_tensor_set", [p, p, sz, sz], None),
        (base, "ggml_backend_tensor_get", [p, p, sz, sz], None),
        (base, "ggml_backend_graph_compute", [p, p], ctypes.c_int),
        (base, "ggml_backend_free", [p], None),
        (base, "ggml_backend_cpu_buffer_type", [], p),
        (cpu, "ggml_backend_cpu_init", [], p),
        (cpu, "ggml_backend_cpu_set_n_threads", [p, ctypes.c_int], None),
        (cpu, "_Z35ggml_backend_cpu_repack_buffer_typev", [], p),  # C++: ggml_backend_cpu_repack_buffer_type()
    ]
    for lib, name, args, res in sigs:
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise Unavailable(f"libggml-python {libggml.__version__} has no {name}") from None
        fn.argtypes, fn.restype = args, res
    return base, cpu


def unavailable_reason():
    """Why libggml-python cannot run here (the cached load's Unavailable message), or None."""
    try:
        _libs()
    except Unavailable as e:
        return str(e)
    return None


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def version():
    from tinykern.bench import machine

    return machine.dist_version("libggml-python")


def quantize_ref(fmt, x):
    """x float32 [..., K] -> the reference quantizer's blocks uint8 [..., K/block*bytes]."""
    base, _ = _libs()
    block, nbytes = _BLOCK[fmt]
    src = np.ascontiguousarray(x.detach().cpu().float().numpy())
    out = np.empty(src.size // block * nbytes, dtype=np.uint8)
    fn = base.quantize_row_q4_K_ref if fmt == "q4k" else base.quantize_row_q8_0_ref
    fn(src.ctypes.data, out.ctypes.data, src.size)
    return torch.from_numpy(out).reshape(*x.shape[:-1], x.shape[-1] // block * nbytes)


class MulMat:
    """out [M, N] float32 = x [M, K] @ dequant(w).T by ggml's CPU backend with `threads` threads;
    w uint8 [N, K/block*bytes] GGUF blocks, uploaded once (repacked when `repack`). Call with x
    float32 [M, K] (contiguous)."""

    def __init__(self, fmt, w, m, threads, repack):
        base, cpu = self._libs = _libs()
        block, nbytes = _BLOCK[fmt]
        n, k = w.shape[0], w.shape[1] // nbytes * block
        self.m, self.n, self.k = m, n, k
        meta = _InitParams(base.ggml_tensor_overhead() * 8 + base.ggml_graph_overhead(), None, True)
        self._wctx, self._ctx = base.ggml_init(meta), base.ggml_init(meta)
        self._w = base.ggml_new_tensor_2d(self._wctx, GGML_TYPE[fmt], k, n)
        self._x = base.ggml_new_tensor_2d(self._ctx, GGML_TYPE["f32"], k, m)
        self._out = base.ggml_mul_mat(self._ctx, self._w, self._x)
        self._graph = base.ggml_new_graph(self._ctx)
        base.ggml_build_forward_expand(self._graph, self._out)
        buft = cpu._Z35ggml_backend_cpu_repack_buffer_typev() if repack else base.ggml_backend_cpu_buffer_type()
        self._wbuf = base.ggml_backend_alloc_ctx_tensors_from_buft(self._wctx, buft)
        self._buf = base.ggml_backend_alloc_ctx_tensors_from_buft(self._ctx, base.ggml_backend_cpu_buffer_type())
        if not self._wbuf or not self._buf:
            raise Unavailable("ggml could not allocate the tensors")
        wc = w.contiguous()
        base.ggml_backend_tensor_set(self._w, wc.data_ptr(), 0, wc.numel())
        self._backend = cpu.ggml_backend_cpu_init()
        cpu.ggml_backend_cpu_set_n_threads(self._backend, threads)

    def __call__(self, x):
        base, _ = self._libs
        x = x.float().contiguous()
        base.ggml_backend_tensor_set(self._x, x.data_ptr(), 0, x.numel() * 4)
        if base.ggml_backend_graph_compute(self._backend, self._graph) != 0:
            raise RuntimeError("ggml_backend_graph_compute failed")
        out = torch.empty(self.m, self.n)
        base.ggml_backend_tensor_get(self._out, out.data_ptr(), 0, out.numel() * 4)
        return out

    def __del__(self):
        base, _ = self._libs
        for free, handle in ((base.ggml_backend_free, "_backend"), (base.ggml_backend_buffer_free, "_wbuf"),
                             (base.ggml_backend_buffer_free, "_buf"), (base.ggml_free, "_ctx"),
                             (base.ggml_free, "_wctx")):
            if getattr(self, handle, None):
                free(getattr(self, handle))
