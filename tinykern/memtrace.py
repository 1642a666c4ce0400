"""MemoryTrace: the peak of live tensor bytes while code runs, traced at the dispatcher.

Every aten op that runs inside the trace reports its outputs; an output whose storage is new
(not one of the op's inputs' storages, not already live) is an allocation of the storage's
bytes rounded up as the CUDA caching allocator rounds (to 512 bytes, 512 at least); it is freed
when the last traced tensor on that storage is garbage-collected (weakref finalizers, that is
the same reference counts that free it on a GPU). Tensors that existed before the trace
(weights, inputs made outside) are not counted. Run the code on the meta device to predict a
GPU's peak without a GPU; run it on the CPU to measure the same thing for real.

What a trace cannot see, because it happens inside a kernel: vendor library workspaces (cuBLAS,
cuDNN) and the internal allocations of compiled kernels. Ops whose meta implementation
allocates differently from the device kernel (attention picks its kernel per device) are routed
by the caller (see tinykern.pipelines.sd.memory).
"""

import dataclasses
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GRANULARITY = 512  # the CUDA caching allocator's rounding (kMinBlockSize)


def rounded(nbytes, granularity=GRANULARITY):
    """Bytes the caching allocator books for a tensor of `nbytes` (0 stays 0)."""
    if nbytes <= 0:
        return 0
    return -(-nbytes // granularity) * granularity


@dataclasses.dataclass
class Allocation:
    """One traced storage: its booked bytes, the module path and op that made it, its shape."""

    nbytes: int
    module: str
    op: str
    shape: tuple
    dtype: torch.dtype

    def describe(self):
        shape = "x".join(str(s) for s in self.shape)
        return f"{self.nbytes / 2**20:9.2f} MiB  [{shape}] {str(self.dtype).removeprefix('torch.')}  {self.module} ({self.op})"


class MemoryTrace(TorchDispatchMode):
    """Context manager tracing live tensor bytes on `device` (a device type such as "meta",
    "cpu" or "cuda"; None: every device).

    names: {module: path} for labelling allocations with the innermost module running (module
    forward hooks); modules not in it are labelled by their class name.

    After (or during) the trace: `peak` (bytes), `current`, `at_peak` (the Allocations live at
    the peak, largest first), `largest` (the largest allocation made by each module, largest
    first), `count` (allocations made).
    """

    def __init__(self, device=None, names=None, granularity=GRANULARITY):
        super().__init__()
        self.device = None if device is None else torch.device(device).type
        self.names = {id(m): n for m, n in (names or {}).items()}
        self.granularity = granularity
        self.current = self.peak = self.count = 0
        self._live = {}  # storage key -> Allocation
        self._refs = {}  # storage key -> traced tensors on it
        self._peak_allocs = []
        self._largest = {}  # module -> its largest Allocation
        self._stack = []
        self._hooks = []

    # -- the module stack, for labels
    def __enter__(self):
        hooks = torch.nn.modules.module
        self._hooks = [hooks.register_module_forward_pre_hook(self._push),
                       hooks.register_module_forward_hook(self._pop, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        return super().__exit__(*exc)

    def _push(self, module, args):
        self._stack.append(self.names.get(id(module), type(module).__name__))

    def _pop(self, module, args, output):
        if self._stack:
            self._stack.pop()

    def label(self):
        return self._stack[-1] if self._stack else "(top level)"

    # -- allocations
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (self.device is None or t.device.type == self.device):
                self._track(t, func, inputs)
        return out

    def _track(self, t, func, inputs):
        key = _key(t)
        if key not in self._live:
            if key in inputs:
                return  # a view or in-place result of a tensor made before the trace
            nbytes = rounded(t.untyped_storage().nbytes(), self.granularity)
            if nbytes == 0:
                return
            alloc = Allocation(nbytes, self.label(), str(func.__name__), tuple(t.shape), t.dtype)
            self._live[key], self._refs[key] = alloc, 0
            self.count += 1
            self.current += nbytes
            best = self._largest.get(alloc.module)
            if best is None or nbytes > best.nbytes:
                self._largest[alloc.module] = alloc
            if self.current > self.peak:
                self.peak = self.current
                self._peak_allocs = list(self._live.values())
        self._refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key):
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current -= self._live.pop(key).nbytes

    def reset_peak(self):
        """Start a new peak from the bytes live now (to trace phases one after the other)."""
        self.peak = self.current
        self._peak_allocs = list(self._live.values())
        self._largest = {}

    @property
    def at_peak(self):
        return sorted(self._peak_allocs, key=lambda a: -a.nbytes)

    @property
    def largest(self):
        return sorted(self._largest.values(), key=lambda a: -a.nbytes)


def _key(t):
    """The identity of a tensor's storage (its StorageImpl address, shared by its views)."""
    return t.untyped_storage()._cdata
