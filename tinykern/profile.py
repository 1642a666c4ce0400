"""Named profiler ranges for tinykern's quantized modules and for pipeline stages.

    with tinykern.profile.nvtx(unet):            # hooks on unet's quantized modules
        unet(latents, t, text)                   # -> ranges "down_blocks.0.resnets.0.conv1", ...

    with tinykern.profile.stage("vae decode"):   # a pipeline stage, when profiling is on
        image = vae.decode(latents)

Each quantized module's forward (QuantLinear, QuantConv2d and their Q4/Q8 subclasses, and tinykern.nn.residual_vq's
ResidualVQ) becomes a range named after its path in the model: a torch.profiler.record_function
range always, and an NVTX range (torch.cuda.nvtx) too when its input is on CUDA, so both
torch.profiler and Nsight Systems show the names.

`nvtx(model=None, enabled=True)` sets the global switch and returns a context manager (Ranges)
that restores it on exit; with a model it also registers forward pre/post hooks on that model's
quantized modules and removes them on exit (or on `.close()` when not used in a `with`).
While the switch is on, quantized modules that no `nvtx(model)` instrumented get ranges from
global module hooks, named by their path within the outermost module being called. The switch
starts on when TINYKERN_NVTX=1 at import. Off (the default), nothing is hooked: no overhead.
"""

import contextlib
import functools
import os
import threading
import weakref

import torch
from torch.nn.modules import module as _module

_local = threading.local()  # per thread: open ranges, modules the global hooks opened, call depth
_switch = {"on": False, "handles": []}  # the global switch and its global-hook handles
_instrumented = weakref.WeakSet()  # modules hooked by an nvtx(model): global hooks skip them
_paths = weakref.WeakKeyDictionary()  # quantized module -> its path, from the roots seen
_roots = weakref.WeakSet()


def enabled():
    """Whether tinykern's profiling ranges are on."""
    return _switch["on"]


def nvtx(model=None, enabled=True):
    """Turn tinykern's ranges on (or off with enabled=False) and, given the root `model`, hook
    its quantized modules; the returned Ranges restores both on exit or close()."""
    return Ranges(model, enabled)


class Ranges:
    """What nvtx() returns: a context manager holding the hooks it added and the switch's old value."""

    def __init__(self, model, enabled):
        self._previous = _set_switch(bool(enabled))
        self._handles = []
        self._modules = []
        if model is not None and enabled:
            for path, module in model.named_modules():
                # A module an enclosing nvtx(model) already hooked keeps its one range.
                if isinstance(module, quantized_types()) and module not in _instrumented:
                    enter = functools.partial(_enter_module, path or type(module).__name__)
                    self._handles.append(module.register_forward_pre_hook(enter))
                    self._handles.append(module.register_forward_hook(_exit_module, always_call=True))
                    self._modules.append(module)
                    _instrumented.add(module)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Remove this call's hooks and restore the switch as it was before it."""
        for handle in self._handles:
            handle.remove()
        for module in self._modules:
            _instrumented.discard(module)
        self._handles, self._modules = [], []
        _set_switch(self._previous)


@contextlib.contextmanager
def stage(name):
    """A range named `name` around a pipeline stage (text encode, denoising step i, VAE decode,
    token generation, refinement) while profiling is on; nothing otherwise."""
    if not enabled():
        yield
        return
    _push(name, cuda=torch.cuda.is_available())
    try:
        yield
    finally:
        _pop()


@functools.cache
def quantized_types():
    """The module classes whose forward gets a range."""
    from tinykern.nn import QuantConv2d, QuantLinear

    types = [QuantLinear, QuantConv2d]
    try:
        from tinykern.nn.residual_vq import ResidualVQ
    except ImportError:
        pass
    else:
        types.append(ResidualVQ)
    return tuple(types)


def _set_switch(on):
    """Set the global switch; (un)install the global hooks to match. Returns the old value."""
    previous = _switch["on"]
    _switch["on"] = on
    if on and not _switch["handles"]:
        _switch["handles"] = [_module.register_module_forward_pre_hook(_global_pre),
                              _module.register_module_forward_hook(_global_post, always_call=True)]
    elif not on and _switch["handles"]:
        for handle in _switch["handles"]:
            handle.remove()
        _switch["handles"] = []
    return previous


def _global_pre(module, args):
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    if depth == 0 and module not in _roots:
        # The outermost call names the quantized modules under it, once per root.
        _roots.add(module)
        types = quantized_types()
        for path, sub in module.named_modules():
            if isinstance(sub, types):
                _paths[sub] = path or type(sub).__name__
    if isinstance(module, quantized_types()) and module not in _instrumented:
        _thread_list("global_modules").append(module)
        _enter_module(_paths.get(module, type(module).__name__), module, args)


def _global_post(module, args, output):
    _local.depth = max(0, getattr(_local, "depth", 1) - 1)
    opened = _thread_list("global_modules")
    if opened and opened[-1] is module:
        opened.pop()
        _pop()


def _enter_module(name, module, args):
    _push(name, cuda=_on_cuda(module, args))


def _exit_module(module, args, output):
    _pop()


def _on_cuda(module, args):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.is_cuda
    return any(t.is_cuda for t in module.buffers())


def _thread_list(name):
    if not hasattr(_local, name):
        setattr(_local, name, [])
    return getattr(_local, name)


def _push(name, cuda):
    rf = torch.profiler.record_function(name)
    rf.__enter__()
    if cuda:
        torch.cuda.nvtx.range_push(name)
    _thread_list("ranges").append((rf, cuda))


def _pop():
    rf, cuda = _thread_list("ranges").pop()
    if cuda:
        torch.cuda.nvtx.range_pop()
    rf.__exit__(None, None, None)


if os.environ.get("TINYKERN_NVTX") == "1":
    _set_switch(True)
