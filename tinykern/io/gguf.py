"""GGUF tensors in and out. Q4_K and Q8_0 stay packed.

The reader is tinykern's own: it checks a file before it trusts any count, size or offset in
it, and reads tensor data with ordinary checked reads (no mmap, so a file truncated while it is
read is an error, not a SIGBUS). The `gguf` package writes files and names the GGML types.

What a file must be (each rule refused with a ValueError naming the file, and the tensor):
- magic "GGUF", version 2 or 3, little-endian;
- every count and length fits in the bytes left in the file, metadata keys are unique and
  arrays nest at most _MAX_NESTING deep;
- `general.alignment`, if present, is a UINT32 power of two of at least _MIN_ALIGNMENT (the
  widest scalar, so every dense tensor starts aligned for its dtype; writers use 32);
- tensor names are unique UTF-8 without NUL; 0 to 4 dimensions (0: a scalar), each of any size
  from 0 (a tensor of no elements has no data); fewer than 2**63 elements and bytes, counting the
  non-zero dimensions (so that torch and numpy can hold a shape with a 0 in it too); a known
  GGML type whose block divides the row;
- the data of tensor i starts at the aligned end of tensor i-1's (so offsets are aligned,
  ordered and never overlap) and lies inside the file.

These are llama.cpp's gguf.cpp rules with two differences: the alignment must be at least 8,
as the GGUF spec's "multiple of 8" says, where gguf.cpp also takes 1, 2 and 4; and a tensor name
may have any length, where gguf.cpp refuses one over 64 bytes (Stable Diffusion's tensor names
are longer).
"""
import dataclasses
import math
import os
import struct

import torch
from gguf import GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, GGUFWriter, Keys
from gguf.constants import GGML_QUANT_SIZES

_DENSE = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}
_PACKED = (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q8_0)

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_MIN_ALIGNMENT = 8
_MAX_DIMS = 4
_MAX_COUNT = 2**63  # elements and bytes: what an int64 (llama.cpp's, torch's and numpy's sizes) holds
_MAX_NESTING = 8  # arrays of arrays: writers nest one level, llama.cpp reads none; bounds the recursion
# struct formats of the fixed-size metadata values
_SCALARS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "B",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
# The fewest bytes a string (its length) and an array (item type and count) take, and so each
# item of a metadata array of them; each metadata entry (key length, type, a 1-byte value); each
# tensor info (name length, n_dims, no dimension: a scalar, type, offset). A count is refused when
# that many of its items cannot fit in the bytes left, before any is read.
_MIN_BYTES = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
_MIN_ENTRY_BYTES = 8 + 4 + 1
_MIN_INFO_BYTES = 8 + 4 + 4 + 8


@dataclasses.dataclass
class GGUFTensor:
    """One tensor of a GGUF file.

    type: the GGML type name ("Q4_K", "Q8_0", "F16", "F32", "BF16", or another GGML type).
    shape: the logical shape, rows first as in torch.
    data: for Q4_K/Q8_0 the packed blocks, uint8 [*shape[:-1], shape[-1]/block*block_bytes];
        for F16/F32/BF16 the dense tensor; for other types the raw bytes as the file has them,
        uint8 in the same [*shape[:-1], bytes per row] layout.
    """

    name: str
    type: str
    shape: tuple
    data: torch.Tensor


@dataclasses.dataclass
class _TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple
    offset: int
    nbytes: int


def read_gguf(path):
    """An iterator over the GGUFTensor of every tensor in the GGUF file `path` (each read into
    memory as it is reached). The whole header is checked here, before anything is yielded: a
    file that cannot be opened raises OSError, a damaged or hostile one ValueError."""
    path = os.fspath(path)
    f = open(path, "rb")
    try:
        infos, data_start = _read_header(_Cursor(f, path))
    except BaseException:
        f.close()
        raise
    return _tensors(path, f, infos, data_start)


class _Cursor:
    """Little-endian reads from the start of an open file, each checked against the bytes left."""

    def __init__(self, f, path):
        self.f, self.path = f, path
        self.size = os.fstat(f.fileno()).st_size
        self.pos = 0

    def error(self, message):
        return ValueError(f"{self.path}: {message}")

    def need(self, n, what):
        left = self.size - self.pos
        if n > left:
            raise self.error(f"{what} needs {n} bytes at offset {self.pos}, the file has {left} left")

    def take(self, n, what):
        self.need(n, what)
        data = self.f.read(n)
        if len(data) != n:
            raise self.error(f"{what}: the file shrank while being read")
        self.pos += n
        return data

    def skip(self, n, what):
        self.need(n, what)
        self.pos += n
        self.f.seek(self.pos)

    def unpack(self, fmt, what):
        fmt = "<" + fmt  # standard sizes, no padding
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def string(self, what):
        (n,) = self.unpack("Q", what)
        return self.take(n, what)


def _read_header(cur):
    """Every tensor's _TensorInfo and the offset of the data section, all checked."""
    if cur.take(len(_MAGIC), "the magic") != _MAGIC:
        raise cur.error("not a GGUF file (no GGUF magic)")
    (version,) = cur.unpack("I", "the version")
    if version & 0xFFFF == 0 and version:  # 3 read with the wrong byte order is 0x03000000
        raise cur.error(f"a big-endian GGUF file (version field {version:#010x}); only little-endian files are read")
    if version not in _VERSIONS:
        raise cur.error(f"GGUF version {version} is not supported (only {' and '.join(map(str, _VERSIONS))})")
    n_tensors, n_entries = cur.unpack("QQ", "the header")
    cur.need(n_entries * _MIN_ENTRY_BYTES, f"{n_entries} metadata entries")
    alignment = _read_metadata(cur, n_entries)
    cur.need(n_tensors * _MIN_INFO_BYTES, f"{n_tensors} tensor infos")
    infos, names = [], set()
    for i in range(n_tensors):
        info = _read_tensor_info(cur, i, alignment)
        if info.name in names:
            raise cur.error(f"tensor {info.name!r} appears twice")
        names.add(info.name)
        infos.append(info)
    data_start = _aligned(cur.pos, alignment)
    expected = 0
    for t in infos:
        if t.offset != expected:
            raise cur.error(f"tensor {t.name!r}: data offset {t.offset}, expected {expected} (each tensor's data starts "
                            f"where the previous one's ends, aligned to {alignment})")
        if data_start + t.offset + t.nbytes > cur.size:
            raise cur.error(f"tensor {t.name!r}: its {t.nbytes} bytes at data offset {t.offset} end past the end of the "
                            f"file ({cur.size - data_start} bytes of data)")
        expected += _aligned(t.nbytes, alignment)
    return infos, data_start


def _read_metadata(cur, n_entries):
    """Walk the metadata entries; the file's alignment."""
    keys, alignment = set(), GGUF_DEFAULT_ALIGNMENT
    for i in range(n_entries):
        key = _text(cur, f"metadata key #{i}")
        if key in keys:
            raise cur.error(f"metadata key {key!r} appears twice")
        keys.add(key)
        (kind,) = cur.unpack("I", f"the type of metadata {key!r}")
        value = _read_value(cur, kind, f"metadata {key!r}", 0)
        if key == Keys.General.ALIGNMENT:
            if kind != GGUFValueType.UINT32 or value < _MIN_ALIGNMENT or value & (value - 1):
                raise cur.error(f"metadata {key!r} must be a UINT32 power of two of at least {_MIN_ALIGNMENT}, got "
                                f"{value!r} of type {GGUFValueType(kind).name}")
            alignment = value
    return alignment


def _read_value(cur, kind, what, depth):
    """Read a metadata value of type `kind`: a scalar is returned, a string or an array skipped."""
    if kind in _SCALARS:
        return cur.unpack(_SCALARS[kind], what)[0]
    if kind == GGUFValueType.STRING:
        cur.string(what)
    elif kind == GGUFValueType.ARRAY:
        if depth == _MAX_NESTING:
            raise cur.error(f"{what}: arrays nested more than {_MAX_NESTING} deep")
        item_kind, count = cur.unpack("IQ", what)
        if item_kind in _SCALARS:
            cur.skip(count * struct.calcsize("<" + _SCALARS[item_kind]), f"{what}: {count} items")
        elif item_kind in _MIN_BYTES:
            cur.need(count * _MIN_BYTES[item_kind], f"{what}: {count} items")
            for _ in range(count):
                _read_value(cur, item_kind, what, depth + 1)
        else:
            raise cur.error(f"{what}: unknown array item type {item_kind}")
    else:
        raise cur.error(f"{what}: unknown value type {kind}")
    return None


def _text(cur, what):
    try:
        return cur.string(what).decode("utf-8")
    except UnicodeDecodeError as e:
        raise cur.error(f"{what} is not UTF-8 ({e})") from None


def _read_tensor_info(cur, i, alignment):
    name = _text(cur, f"the name of tensor #{i}")
    what = f"tensor {name!r}"
    if "\0" in name:
        raise cur.error(f"tensor #{i}: its name {name!r} holds a NUL byte")
    (n_dims,) = cur.unpack("I", what)
    if n_dims > _MAX_DIMS:
        raise cur.error(f"{what} has {n_dims} dimensions (0 to {_MAX_DIMS} allowed)")
    dims = cur.unpack(f"{n_dims}Q", what)
    type_id, offset = cur.unpack("IQ", what)
    try:
        ggml_type = GGMLQuantizationType(type_id)
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise cur.error(f"{what} has an unknown GGML type {type_id}") from None
    shape = tuple(reversed(dims))  # GGUF lists dimensions fastest first
    counted = math.prod(n for n in dims if n)  # a shape holding a 0 must still be one torch and numpy can count
    if max(counted, counted // block * block_bytes) >= _MAX_COUNT:
        raise cur.error(f"{what}: {ggml_type.name} shape {list(shape)} has 2**63 or more elements or bytes (counting "
                        "its non-zero dimensions)")
    if _row(shape) % block:
        raise cur.error(f"{what}: {ggml_type.name} shape {list(shape)} needs rows of whole {block}-element blocks")
    if offset % alignment:
        raise cur.error(f"{what}: data offset {offset} is not a multiple of the alignment {alignment}")
    return _TensorInfo(name, ggml_type, shape, offset, math.prod(dims) // block * block_bytes)


def _aligned(n, alignment):
    return -(-n // alignment) * alignment


def _tensors(path, f, infos, data_start):
    with f:
        unbuffered = f.raw  # every byte as the file holds it now, none kept from an earlier read
        for t in infos:
            raw = torch.empty(t.nbytes, dtype=torch.uint8)
            unbuffered.seek(data_start + t.offset)
            view, got = memoryview(raw.numpy()), 0
            while got < t.nbytes:
                n = unbuffered.readinto(view[got:])
                if not n:
                    raise ValueError(f"{path}: tensor {t.name!r}: the file ends {got} bytes into its {t.nbytes} bytes "
                                     "of data (truncated while being read)")
                got += n
            if t.ggml_type in _DENSE:
                data = raw.view(_DENSE[t.ggml_type]).reshape(t.shape)
            else:
                data = raw.reshape(_packed_shape(t.ggml_type, t.shape))
            yield GGUFTensor(t.name, t.ggml_type.name, t.shape, data)


def write_gguf(path, tensors, arch="tinykern"):
    """Write GGUFTensors (or {name: dense torch tensor}) to the GGUF file `path`."""
    if isinstance(tensors, dict):
        tensors = [v if isinstance(v, GGUFTensor) else dense_tensor(k, v) for k, v in tensors.items()]
    writer = GGUFWriter(os.fspath(path), arch)
    for t in tensors:
        ggml_type = GGMLQuantizationType[t.type]
        data = t.data.detach().cpu().contiguous()
        _check_layout(path, t, ggml_type, data)
        if ggml_type in _DENSE:
            data = data.to(_DENSE[ggml_type])
            # numpy has no bf16: its bits go as int16, which keeps the shape (a scalar's too)
            array = (data.view(torch.int16) if ggml_type == GGMLQuantizationType.BF16 else data).numpy()
            writer.add_tensor(t.name, array, raw_dtype=ggml_type)
        else:
            writer.add_tensor(t.name, data.numpy(), raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _check_layout(path, t, ggml_type, data):
    """The writer takes the shape from the data, so data that disagrees with t.shape (the layout
    GGUFTensor documents) would be written as another tensor: refuse it."""
    shape = tuple(t.shape)
    if ggml_type in _DENSE:
        expected = shape
    elif ggml_type in _PACKED:
        block = GGML_QUANT_SIZES[ggml_type][0]
        if data.dtype != torch.uint8 or _row(shape) % block:
            raise ValueError(f"{os.fspath(path)}: tensor {t.name!r}: {ggml_type.name} needs uint8 blocks and a last "
                             f"dimension that is a multiple of {block}, got {data.dtype} data for shape {list(shape)}")
        expected = _packed_shape(ggml_type, shape)
    else:
        return
    if tuple(data.shape) != expected:
        raise ValueError(f"{os.fspath(path)}: tensor {t.name!r} of {ggml_type.name} shape {list(shape)} needs data of "
                         f"shape {list(expected)}, got {list(data.shape)}")


def _packed_shape(ggml_type, shape):
    """The uint8 shape of packed blocks for a tensor of logical `shape`: one row of blocks per row
    (a scalar is one row of one element)."""
    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    return (*shape[:-1], _row(shape) // block * block_bytes)


def _row(shape):
    """The elements of a row of `shape` (rows first): a scalar has one."""
    return shape[-1] if shape else 1


def dense_tensor(name, tensor):
    """A GGUFTensor holding `tensor` as F32, F16 or BF16 (other dtypes become F32)."""
    types = {torch.float16: "F16", torch.bfloat16: "BF16"}
    kind = types.get(tensor.dtype, "F32")
    return GGUFTensor(name, kind, tuple(tensor.shape), tensor if kind != "F32" else tensor.float())
