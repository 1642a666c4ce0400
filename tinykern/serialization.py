"""save_quantized / load_quantized: a quantized model as one safetensors file.

The file holds the model's whole state_dict (packed blocks as uint8) and, in its metadata, how
to rebuild each quantized module (its spec), every tensor's dtype, shape and CRC-32, and a CRC-32
of all of that, so that loading needs no re-quantization, works on a model built on the meta
device, and refuses a damaged or edited file. A CRC catches accidents and careless edits, not a
forger (anyone can recompute it); what holds against a file that passes its checksums is that
every spec must repeat the geometry of the layer it replaces and every tensor must fit the model.
"""

import contextlib
import json
import math
import os
import re
import reprlib
import secrets
import socket
import stat
import struct
import time
import typing
import zlib

import torch
from torch import nn

from tinykern.formats import FORMATS
from tinykern.nn import Q4Conv2d, Q4Linear, Q8Linear, QuantConv2d, QuantLinear
from tinykern.nn.linear import BIAS_DTYPES, check_bias
from tinykern.ops import _conv_padding
from tinykern.quantize import _replace

VERSION = "2"  # of the metadata layout; files without it are refused, as they lack the checksums
_HEADER_LIMIT = 100_000_000  # bytes of header JSON; safetensors refuses a longer one too
_TEMP_SUFFIX = ".tinykern-tmp"
_STALE_AFTER_S = 600  # a dead save's temp is removed once this old (by mtime): see _remove_stale_temps
_MAX_COUNT = 2**63  # elements of a shape: what torch's int64 sizes hold

_TYPES = {cls.__name__: cls for cls in (QuantLinear, Q4Linear, Q8Linear, QuantConv2d, Q4Conv2d)}
_LINEAR_ARGS = ("in_features", "out_features")
_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
_PAIRS = ("kernel_size", "stride", "padding", "dilation")
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_TORCH_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
# The dtypes a dense floating tensor may come in for one of these in the model, which it keeps.
_INTERCHANGEABLE = (torch.float16, torch.bfloat16, torch.float32)


class _Entry(typing.NamedTuple):
    """A tensor's entry in the safetensors header: its data is bytes begin:end after the header."""

    dtype: torch.dtype
    shape: list
    begin: int
    end: int


def save_quantized(model, path):
    """Write `model` (after quantize_) to the safetensors file `path`. The file at `path` is at
    every moment either the previous one or the whole new one: the data goes to a temporary file
    beside it (removed on failure; if the process is killed, by the next save to `path`), which
    replaces it once synced. The file gets the mode open(path, "w") would give it."""
    path = os.fspath(path)
    tensors = {}
    for key, value in model.state_dict().items():
        if value.is_meta:
            raise ValueError(f"{path}: tensor {key!r} is on the meta device and holds no data; fill the model first")
        if value.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {key!r} is {value.dtype}, which this writer does not store")
        # On the CPU once: the checksum and the writer both read these bytes.
        tensors[key] = value.detach().cpu().contiguous()
    # Every path to a layer shared by several, as the state_dict holds its tensors under each.
    quantized = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if type(m) in _TYPES.values()]
    specs = json.dumps({name: _spec(m) for name, m in quantized}, sort_keys=True)
    records = json.dumps({k: _record(v) for k, v in tensors.items()}, sort_keys=True)
    metadata = {"format": "pt", "tinykern.version": VERSION, "tinykern.modules": specs, "tinykern.tensors": records,
                "tinykern.checksum": _metadata_checksum(VERSION, specs, records)}
    _write_atomically(path, lambda f: _write_safetensors(f, tensors, metadata))


def load_quantized(model, path, device="cpu", strict=True):
    """Swap in the quantized modules recorded in `path` and fill `model` from it by assigning the
    file's tensors (read into memory of their own, then moved to `device`), so that a model built
    on the meta device never holds a full-precision copy. Each spec must match the Linear or
    Conv2d it replaces, with a bias in a dtype its kernels take (nn.linear.BIAS_DTYPES) holding
    no NaN or Inf; each tensor must match the model's in shape and dtype, except that a dense
    float16, bfloat16 or float32 tensor may come in another of these three dtypes, which it
    keeps (an SD folder stores float16 weights for a model built in float32 on meta). Raises
    ValueError naming the file (and the tensor or module) if `device` is not usable here, or if
    the file is truncated, altered, written by an older tinykern or does not fit `model`; the
    model is then left exactly as it was."""
    path = os.fspath(path)
    device = _usable_device(path, device)
    metadata, entries, start = _read_header(path)
    specs, records = _read_metadata(path, metadata)
    _check_entries(path, entries, records)
    tensors = _read_tensors(path, entries, start, records)
    layers = {name: m for name, m in model.named_modules(remove_duplicate=False) if name}
    built, shared = {}, {}
    for name, spec in specs.items():
        module = _build(path, name, spec, layers.get(name))
        # A layer reached by several paths with the same spec stays one module.
        built[name] = shared.setdefault((id(layers[name]), json.dumps(spec, sort_keys=True)), module)
    for name in built:
        try:
            check_bias(tensors.get(f"{name}.bias"), name)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    try:
        tensors = {key: value.to(device) for key, value in tensors.items()}
    except RuntimeError as e:  # out of memory on the device, among others
        raise ValueError(f"{path}: cannot move its tensors onto {device} ({e})") from e
    snapshot = _snapshot(model)
    try:
        for name, module in built.items():
            _replace(model, name, module)
        problem = _misfit(model.state_dict(), tensors, strict, built)
        if problem is not None:
            raise ValueError(f"{path}: does not fit this model: {problem}")
        try:
            model.load_state_dict(tensors, strict=strict, assign=True)
        except RuntimeError as e:  # what the checks above do not foresee
            raise ValueError(f"{path}: does not fit this model: {e}") from e
    except BaseException:
        _restore(snapshot)
        raise
    return model


def layout_of(model, path):
    """Swap into `model` the empty (meta) quantized modules that `path`'s layer specs record,
    reading its header only: a saved model's layout without its weights (the SD memory planner
    plans a `tinykern sd quantize` folder with it). Raises ValueError naming the file as
    load_quantized does; the model is then left as it was."""
    path = os.fspath(path)
    metadata, _, _ = _read_header(path)
    specs, _ = _read_metadata(path, metadata)
    layers = {name: m for name, m in model.named_modules(remove_duplicate=False) if name}
    built = {name: _build(path, name, spec, layers.get(name)) for name, spec in specs.items()}
    for name, module in built.items():
        _replace(model, name, module)
    return model


def _usable_device(path, device):
    """`device` as a torch.device, once a tensor can be made there (a CUDA device asked of a
    machine without one, or a device index past the last, is refused before anything is read)."""
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, TypeError, AssertionError) as e:  # torch not built for it raises AssertionError
        raise ValueError(f"{path}: cannot load onto device {str(device)!r} ({e})") from e
    return device


# ---------------------------------------------------------------------------------------------
# Writing


def _spec(module):
    spec = {"type": type(module).__name__, **_geometry(module)}
    if type(module).FORMAT is None:  # the generic classes name their format
        spec["format"] = module.format.name
    if module.bias is not None:
        spec["bias_dtype"] = _dtype_name(module.bias.dtype)
    return spec


def _record(tensor):
    return {"dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape), "crc32": _crc32(tensor)}


def _metadata_checksum(version, specs, records):
    return str(zlib.crc32("\n".join((version, specs, records)).encode()))


def _write_safetensors(f, tensors, metadata):
    # Larger elements first: with the header padded to 8 bytes every tensor starts aligned.
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = {"__metadata__": metadata}, 0
    for key in order:
        t = tensors[key]
        end = offset + t.numel() * t.element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write(struct.pack("<Q", len(blob)) + blob)
    for key in order:
        f.write(_bytes(tensors[key]))


def _write_atomically(path, write):
    # Through a symbolic link to the file it names, as open(path, "w") writes: the link stays.
    folder, name = os.path.split(os.path.realpath(path))
    # Named by host and process: only this host can tell whether the process is gone.
    prefix = f".{name}.{socket.gethostname()}."
    _remove_stale_temps(folder, prefix)
    temp = os.path.join(folder, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}{_TEMP_SUFFIX}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # less the umask, as open(path, "w")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        target = os.path.join(folder, name)
        with contextlib.suppress(FileNotFoundError):  # open(path, "w") keeps an existing file's mode
            os.chmod(temp, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; some file systems cannot sync a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_temps(folder, prefix):
    """Delete the temporary files named `prefix`<pid>-... (this host's) of a save killed mid-write:
    those whose process is gone and that were last written over _STALE_AFTER_S ago. The age
    covers containers that share a host name but not a PID namespace: a save in progress in
    another one looks dead from here, but is writing its file now."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)-[0-9a-f]{8}" + re.escape(_TEMP_SUFFIX))
    for entry in os.listdir(folder):
        match = pattern.fullmatch(entry)
        if match and not _alive(int(match[1])):
            temp = os.path.join(folder, entry)
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.stat(temp).st_mtime > _STALE_AFTER_S:
                    os.unlink(temp)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


# ---------------------------------------------------------------------------------------------
# Reading and checking


def _read_header(path):
    """(metadata, {key: _Entry}, where the data starts), once the header is a
    safetensors header whose tensors tile the data after it (naming the first tensor a truncation
    cuts)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{path}: not a safetensors file ({size} bytes, less than the 8-byte header length)")
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8:
                raise ValueError(f"{path}: truncated safetensors header ({length} bytes announced, {size - 8} present)")
            if length > _HEADER_LIMIT:
                raise ValueError(f"{path}: a safetensors header of {length} bytes is over the "
                                 f"{_HEADER_LIMIT}-byte limit")
            header = json.loads(f.read(length).decode("utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError(f"{path}: the safetensors __metadata__ is not a map of strings")
    entries = {key: _entry(path, key, info) for key, info in header.items()}
    start = 8 + length
    for end, key in sorted((e.end, key) for key, e in entries.items()):
        if start + end > size:
            raise ValueError(f"{path}: tensor {key!r} is truncated (the file ends at byte {size})")
    position = 0  # safetensors' rule: the tensors follow one another, with nothing between or after
    for begin, end, key in sorted((e.begin, e.end, key) for key, e in entries.items()):
        if begin != position:
            raise ValueError(f"{path}: tensor {key!r} starts at data byte {begin}, where byte {position} was due")
        position = end
    if start + position != size:
        raise ValueError(f"{path}: {size - start - position} bytes after the last tensor")
    return metadata, entries, start


def _entry(path, key, info):
    """The _Entry of the header entry `info`, once it is well formed."""
    where = f"{path}: tensor {key!r}"
    if not isinstance(info, dict):
        raise ValueError(f"{where}: header entry {reprlib.repr(info)} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o, 0) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise ValueError(f"{where} has malformed data_offsets {reprlib.repr(offsets)}")
    if not _is_shape(shape):
        raise ValueError(f"{where} has malformed shape {reprlib.repr(shape)} (a list of sizes from 0, fewer than 2**63 "
                         "elements counting the non-zero ones)")
    if not (isinstance(dtype, str) and dtype in _TORCH_DTYPES):
        raise ValueError(f"{where} has dtype {reprlib.repr(dtype)}; tinykern files hold {sorted(_TORCH_DTYPES)}")
    nbytes = math.prod(shape) * _TORCH_DTYPES[dtype].itemsize
    if nbytes != offsets[1] - offsets[0]:
        raise ValueError(f"{where}: {dtype} {shape} is {nbytes} bytes, but its data_offsets span {offsets[1] - offsets[0]}")
    return _Entry(_TORCH_DTYPES[dtype], shape, *offsets)


def _read_metadata(path, metadata):
    """The module specs and tensor records, once their checksum and layout are checked."""
    if not metadata or "tinykern.modules" not in metadata:
        raise ValueError(f"{path}: no tinykern metadata; was it written by tinykern.save_quantized?")
    version = metadata.get("tinykern.version")
    if version is None:
        raise ValueError(f"{path}: written by an older tinykern, whose files do not checksum module specs, dtypes "
                         "and shapes; re-save it with this one (save_quantized, or `tinykern sd quantize`)")
    if version != VERSION:
        raise ValueError(f"{path}: tinykern file format {reprlib.repr(version)}; this tinykern reads format {VERSION}")
    specs, records = metadata["tinykern.modules"], metadata.get("tinykern.tensors", "")
    if metadata.get("tinykern.checksum") != _metadata_checksum(version, specs, records):
        raise ValueError(f"{path}: the tinykern metadata (module specs; tensor dtypes, shapes and checksums) does "
                         "not match its checksum; the file was altered")
    try:
        specs, records = json.loads(specs), json.loads(records)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: malformed tinykern metadata ({e})") from e
    if not isinstance(specs, dict) or not isinstance(records, dict):
        raise ValueError(f"{path}: malformed tinykern metadata (module specs and tensor records must be JSON objects)")
    for key, record in records.items():
        if not (isinstance(record, dict) and record.keys() == {"dtype", "shape", "crc32"}
                and isinstance(record["dtype"], str) and _is_shape(record["shape"]) and _is_int(record["crc32"], 0)):
            raise ValueError(f"{path}: malformed tinykern record for tensor {key!r}: {reprlib.repr(record)}")
    return specs, records


def _check_entries(path, entries, records):
    """The header lists the tensors the metadata records, each in its recorded dtype and shape."""
    if entries.keys() != records.keys():
        unlisted, missing = sorted(entries.keys() - records.keys()), sorted(records.keys() - entries.keys())
        raise ValueError(f"{path}: the file's tensors differ from those its metadata lists (not listed: "
                         f"{reprlib.repr(unlisted)}; missing: {reprlib.repr(missing)}); the file was altered")
    for key, entry in entries.items():
        found, saved = (_dtype_name(entry.dtype), entry.shape), (records[key]["dtype"], records[key]["shape"])
        if found != saved:
            raise ValueError(f"{path}: tensor {key!r} is {found[0]} {found[1]} in the header but was saved as "
                             f"{reprlib.repr(saved[0])} {reprlib.repr(saved[1])}; the file was altered")


def _read_tensors(path, entries, start, records):
    """Every tensor on the CPU, each checked against its checksum and read into memory of its own:
    never a view of the file (a memory map), through which a later change to the file would reach
    the model, and a cut would kill the process with SIGBUS."""
    tensors = {}
    try:
        with open(path, "rb") as f:
            for key, (dtype, shape, begin, end) in entries.items():
                raw = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(start + begin)
                if f.readinto(raw.numpy()) != raw.numel():
                    raise ValueError(f"{path}: tensor {key!r} is truncated (the file shrank while it was read)")
                if zlib.crc32(raw.numpy()) != records[key]["crc32"]:
                    raise ValueError(f"{path}: tensor {key!r} does not match its checksum; the file was altered")
                tensors[key] = raw.view(dtype).reshape(shape)
    except OSError as e:
        raise ValueError(f"{path}: not a readable file ({e})") from e
    return tensors


def _build(path, name, spec, layer):
    """The empty module `spec` describes, once the spec is well formed and repeats the geometry of
    `layer`, the Linear or Conv2d (dense or quantized) at `name` that it replaces."""
    where = f"{path}: quantized module {name!r}"
    cls = _TYPES.get(spec.get("type")) if isinstance(spec, dict) and isinstance(spec.get("type"), str) else None
    if cls is None:
        raise ValueError(f"{where}: spec {reprlib.repr(spec)} names none of the types {sorted(_TYPES)}")
    conv = issubclass(cls, QuantConv2d)
    args = _CONV_ARGS if conv else _LINEAR_ARGS
    keys = {"type", "bias", *args, *(("bias_dtype",) if spec.get("bias") is True else ()),
            *(("format",) if cls.FORMAT is None else ())}
    if spec.keys() != keys:
        raise ValueError(f"{where}: spec keys {sorted(spec)}, expected {sorted(keys)}")
    if not (all(_is_pair(spec[a], 0 if a == "padding" else 1) if a in _PAIRS else _is_int(spec[a], 1) for a in args)
            and isinstance(spec["bias"], bool) and spec.get("bias_dtype", _BIAS_DTYPE_NAMES[0]) in _BIAS_DTYPE_NAMES
            and (cls.FORMAT is not None or isinstance(spec["format"], str) and spec["format"] in FORMATS)):
        raise ValueError(f"{where}: malformed spec {reprlib.repr(spec)}")
    # A quantized layer stands in for the dense layer of its kind, or another quantized one.
    dense, quantized = (nn.Conv2d, QuantConv2d) if conv else (nn.Linear, QuantLinear)
    if not (type(layer) is dense or isinstance(layer, quantized)):
        found = "nothing" if layer is None else f"a {type(layer).__name__}"
        raise ValueError(f"{where} has no place in this model: {found} there, where a {cls.__name__} needs an "
                         f"nn.{dense.__name__} or a {quantized.__name__}")
    wanted = {a: tuple(v) if a in _PAIRS else v for a, v in spec.items() if a in (*args, "bias")}
    differs = {k: (wanted.get(k), v) for k, v in _geometry(layer).items() if wanted.get(k) != v}
    if differs:
        raise ValueError(f"{where} does not match the {type(layer).__name__} it replaces: "
                         + ", ".join(f"{k} {a} in the file vs {b} in the model" for k, (a, b) in differs.items()))
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    if "bias_dtype" in kwargs:
        kwargs["bias_dtype"] = BIAS_DTYPES[_BIAS_DTYPE_NAMES.index(kwargs["bias_dtype"])]
    return cls(**kwargs, device="meta")


def _geometry(layer):
    """What a quantized module must repeat of the Linear or Conv2d it replaces, padding as numbers."""
    conv = isinstance(layer, (nn.Conv2d, QuantConv2d))
    geometry = {a: getattr(layer, a) for a in (_CONV_ARGS if conv else _LINEAR_ARGS)}
    geometry["bias"] = layer.bias is not None
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":  # QuantConv2d pads with zeros: no spec matches another mode
            geometry["padding_mode"] = layer.padding_mode
        if isinstance(layer.padding, str):
            with contextlib.suppress(ValueError):  # an asymmetric "same" has no numeric form and matches nothing
                geometry["padding"] = _conv_padding("", layer.padding, layer.kernel_size, layer.stride, layer.dilation)
    return geometry


def _misfit(expected, tensors, strict, built):
    """Why `tensors` cannot be assigned to a model with state_dict `expected`, or None. A dense
    tensor the model holds in one of _INTERCHANGEABLE may come in another of them, kept as the
    file has it (an SD folder stores float16 weights for a model built in float32 on meta); every
    other dtype must match."""
    quantized = tuple(f"{name}." for name in built)
    wrong = []
    for key, value in tensors.items():
        if key not in expected:
            continue
        want = expected[key]
        if value.shape != want.shape:
            wrong.append(f"{key}: file {list(value.shape)} vs model {list(want.shape)}")
        elif value.dtype != want.dtype and (key.startswith(quantized) or value.dtype not in _INTERCHANGEABLE
                                            or want.dtype not in _INTERCHANGEABLE):
            wrong.append(f"{key}: file {value.dtype} vs model {want.dtype}")
    if strict:
        missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
        if missing:
            wrong.append(f"missing {sorted(missing)}")
        if unexpected:
            wrong.append(f"unexpected {sorted(unexpected)}")
    return "; ".join(wrong) or None


def _snapshot(model):
    """Every module's parameters, buffers and children, to put back after a refused load."""
    return [(m, dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in model.modules()]


def _restore(snapshot):
    for module, *saved in snapshot:
        for held, was in zip((module._parameters, module._buffers, module._modules), saved):
            held.clear()
            held.update(was)


def _is_int(value, minimum):
    return type(value) is int and value >= minimum


def _is_shape(value):
    """A list of sizes from 0 whose non-zero ones multiply to fewer than 2**63 (so that torch can
    count the shape, with a 0 in it too)."""
    return (isinstance(value, list) and all(_is_int(n, 0) for n in value)
            and math.prod(n for n in value if n) < _MAX_COUNT)


def _is_pair(value, minimum):
    return isinstance(value, list) and len(value) == 2 and all(_is_int(v, minimum) for v in value)


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


_BIAS_DTYPE_NAMES = [_dtype_name(d) for d in BIAS_DTYPES]  # as specs name them


def _bytes(tensor):
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _crc32(tensor):
    return zlib.crc32(_bytes(tensor))
