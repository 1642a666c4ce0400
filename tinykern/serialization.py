"""save_quantized / load_quantized: a quantized model as one safetensors file.

The file holds the model's whole state_dict (packed blocks as uint8) plus, in its metadata, how
to rebuild each quantized module and a CRC-32 per tensor, so that loading needs no
re-quantization, works on a model built on the meta device, and refuses a damaged file.
"""

import json
import os
import struct
import zlib

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tinykern.nn import Q4Conv2d, Q4Linear, Q8Linear
from tinykern.quantize import _replace, quantized_modules

_TYPES = {cls.__name__: cls for cls in (Q4Linear, Q8Linear, Q4Conv2d)}
_LINEAR_ARGS = ("in_features", "out_features")
_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")


def save_quantized(model, path):
    """Write `model` (after quantize_) to the safetensors file `path`."""
    modules = {name: _spec(m) for name, m in quantized_modules(model)}
    tensors, seen = {}, set()
    for key, value in model.state_dict().items():
        value = value.detach().contiguous()
        if value.data_ptr() in seen:  # tied tensors: safetensors stores each storage once
            value = value.clone()
        seen.add(value.data_ptr())
        tensors[key] = value
    metadata = {
        "format": "pt",
        "tinykern.modules": json.dumps(modules),
        "tinykern.crc32": json.dumps({k: _crc32(v) for k, v in tensors.items()}),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_quantized(model, path, device="cpu", strict=True):
    """Swap in the quantized modules recorded in `path` and fill `model` from it (assigning the
    file's tensors, so a model built on the meta device never holds a full-precision copy).
    Raises ValueError naming the file and tensor if the file is truncated or altered."""
    path = os.fspath(path)
    _check_layout(path)
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if "tinykern.modules" not in metadata or "tinykern.crc32" not in metadata:
        raise ValueError(f"{path}: no tinykern metadata; was it written by tinykern.save_quantized?")
    checksums = json.loads(metadata["tinykern.crc32"])
    for key, value in tensors.items():
        if checksums.get(key) != _crc32(value):
            raise ValueError(f"{path}: tensor {key!r} does not match its checksum; the file was altered")
    built = {}
    for name, spec in json.loads(metadata["tinykern.modules"]).items():
        try:
            model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"{path}: quantized module {name!r} has no place in this model") from e
        if spec.get("type") not in _TYPES:
            raise ValueError(f"{path}: quantized module {name!r} has unknown type {spec.get('type')!r}")
        built[name] = _build(spec)
    # Swap, check every tensor against the swapped model, and only then assign: a file that does
    # not fit leaves the model as it was.
    originals = {name: model.get_submodule(name) for name in built}
    for name, module in built.items():
        _replace(model, name, module)
    problem = _misfit(model.state_dict(), tensors, strict)
    if problem is None:
        try:
            model.load_state_dict(tensors, strict=strict, assign=True)
            return model
        except RuntimeError as e:  # what the checks above do not foresee
            problem = str(e)
    for name, module in originals.items():
        _replace(model, name, module)
    raise ValueError(f"{path}: does not fit this model: {problem}")


def _misfit(expected, tensors, strict):
    """Why `tensors` cannot be assigned to a model with state_dict `expected`, or None."""
    wrong = [f"{k}: file {list(v.shape)} vs model {list(expected[k].shape)}"
             for k, v in tensors.items() if k in expected and v.shape != expected[k].shape]
    if strict:
        missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
        if missing:
            wrong.append(f"missing {sorted(missing)}")
        if unexpected:
            wrong.append(f"unexpected {sorted(unexpected)}")
    return "; ".join(wrong) or None


def _spec(module):
    args = _CONV_ARGS if isinstance(module, Q4Conv2d) else _LINEAR_ARGS
    spec = {"type": type(module).__name__, **{a: getattr(module, a) for a in args}, "bias": module.bias is not None}
    if module.bias is not None:
        spec["bias_dtype"] = str(module.bias.dtype).removeprefix("torch.")
    return spec


def _build(spec):
    spec = dict(spec)
    cls = _TYPES[spec.pop("type")]
    if "bias_dtype" in spec:
        spec["bias_dtype"] = getattr(torch, spec["bias_dtype"])
    return cls(**spec, device="meta")


def _crc32(tensor):
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(data)


def _check_layout(path):
    """Name the first tensor whose bytes lie past the end of a truncated file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"{path}: truncated safetensors header ({header_len} bytes announced, {size - 8} present)")
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    for key, info in header.items():
        if key != "__metadata__" and 8 + header_len + info["data_offsets"][1] > size:
            raise ValueError(f"{path}: tensor {key!r} is truncated (the file ends at byte {size})")
