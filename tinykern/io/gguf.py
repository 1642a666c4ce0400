"""GGUF tensors and metadata in and out. Quantized tensors stay packed, as the file has them.

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
  ordered and never overlap) and lies inside the file;
- metadata arrays hold at most _MAX_ARRAY_ITEMS items in all (they are read into Python lists);
- a `comfy.gguf.orig_shape.<tensor name>` entry (ComfyUI-GGUF's convert.py stores a tensor whose
  rows are not whole 256-element blocks as [n/256, 256] and records the true shape, rows first,
  as an INT32 array there) is an array of at most _MAX_ORIG_DIMS non-negative integers, countable
  as above, whose product is the tensor's element count: the tensor is read with that shape.

The first five are llama.cpp's gguf.cpp rules with two differences: the alignment must be at least 8,
as the GGUF spec's "multiple of 8" says, where gguf.cpp also takes 1, 2 and 4; and a tensor name
may have any length, where gguf.cpp refuses one over 64 bytes (Stable Diffusion's tensor names
are longer). The last two are tinykern's: gguf.cpp keeps no metadata in Python lists and does
not know ComfyUI-GGUF's key.
"""
import dataclasses
import math
import os
import struct
from typing import Optional

import numpy as np
import torch
from gguf import GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, GGUFWriter, Keys
from gguf.constants import GGML_QUANT_SIZES

from tinykern.formats import BY_GGML_TYPE, Format

_DENSE = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_MIN_ALIGNMENT = 8
_MAX_DIMS = 4
_MAX_COUNT = 2**63  # elements and bytes: what an int64 (llama.cpp's, torch's and numpy's sizes) holds
_MAX_NESTING = 8  # arrays of arrays: writers nest one level, llama.cpp reads none; bounds the recursion
# Metadata array items of a file in all: a Python list costs ~30x the file's bytes, so this bounds
# memory (about 0.5 GB); the largest tokenizers hold about a million items.
_MAX_ARRAY_ITEMS = 2**24
_MAX_ORIG_DIMS = 8  # a recorded shape may exceed GGUF's 4 (video models' 5-D convs); this bounds it
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
# struct formats of the fixed-size metadata values
_SCALARS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "B",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
_INTEGERS = {GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16, GGUFValueType.UINT32,
             GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64}
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
    shape: the logical shape, rows first as in torch (for a ComfyUI-GGUF reshaped tensor, the
        shape its `comfy.gguf.orig_shape.<name>` metadata records).
    stored_shape: the shape the file stores the tensor with, rows first; None when it is `shape`.
    data: for F16/F32/BF16 the dense tensor of `shape`; for every other type the blocks as the
        file has them, uint8 [*rows, row bytes]: rows of `shape` when `rows_aligned` (so each
        logical row is whole blocks, as a packed Linear or Conv2d takes them), else rows of
        `stored_shape` (the same bytes).
    """

    name: str
    type: str
    shape: tuple
    data: torch.Tensor
    stored_shape: Optional[tuple] = None

    @property
    def ggml_type(self):
        """The GGMLQuantizationType (ValueError for a name GGUF does not know)."""
        return _ggml_type(self.type, self.name)

    @property
    def format(self):
        """The tinykern.formats Format record of this tensor's type, or None (dense types and the
        GGML types tinykern cannot run, which stay raw bytes)."""
        return BY_GGML_TYPE.get(int(self.ggml_type))

    @property
    def block(self):
        """Elements per block of the type (1 for dense types)."""
        return GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def reshaped(self):
        """Whether the file stores the tensor with another shape than `shape`."""
        return self.stored_shape is not None and tuple(self.stored_shape) != tuple(self.shape)

    @property
    def rows_aligned(self):
        """Whether each row of `shape` (the last dimension) is whole blocks of the type: then
        `data` holds those rows and they can be adopted byte for byte. Always True for dense
        types and for tensors not reshaped (GGUF stores rows of whole blocks)."""
        return _row(self.shape) % self.block == 0

    def dequantize(self):
        """The tensor as float32 of `shape`: dense types converted, tinykern's formats through
        their own dequantizers, other GGML types through gguf-py's numpy dequantize
        (NotImplementedError for a type gguf-py cannot dequantize)."""
        ggml_type = self.ggml_type
        if ggml_type in _DENSE:
            return self.data.float().reshape(self.shape)
        if math.prod(self.shape) == 0:
            return torch.zeros(self.shape, dtype=torch.float32)
        fmt = self.format
        if fmt is not None:
            return fmt.dequantize(self.data).float().reshape(self.shape)
        from gguf import quants

        array = quants.dequantize(self.data.numpy(), ggml_type)
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(self.shape)


class GGUFFile:
    """An open, checked GGUF file: `metadata` ({key: value}; numbers as int/float/bool, strings
    as str (bytes when not UTF-8), arrays as lists), `path`, and an iterator over its tensors,
    each a GGUFTensor read into memory when it is reached. The file closes once every tensor was
    read, on an error, on close(), or at the end of a `with` block."""

    def __init__(self, path, f, metadata, infos, data_start):
        self.path, self.metadata = path, metadata
        self._f, self._infos, self._data_start, self._next = f, infos, data_start, 0

    def __len__(self):
        return len(self._infos)

    @property
    def names(self):
        """The tensors' names in file order."""
        return [t.name for t in self._infos]

    def __iter__(self):
        return self

    def __next__(self):
        if self._next >= len(self._infos) or self._f is None:
            self.close()
            raise StopIteration
        info = self._infos[self._next]
        self._next += 1
        try:
            return _read_tensor(self.path, self._f, info, self._data_start)
        except BaseException:
            self.close()
            raise

    def close(self):
        f, self._f = getattr(self, "_f", None), None
        if f is not None:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


@dataclasses.dataclass
class _TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple  # as stored, rows first
    offset: int
    nbytes: int
    orig_shape: Optional[tuple] = None  # ComfyUI-GGUF's logical shape, when recorded


def open_gguf(path):
    """The GGUFFile of the GGUF file `path`. The whole header (metadata included) is checked here,
    before any tensor is read: a file that cannot be opened raises OSError, a damaged or hostile
    one ValueError naming the file (and the tensor to blame)."""
    path = os.fspath(path)
    f = open(path, "rb")
    try:
        metadata, infos, data_start = _read_header(_Cursor(f, path))
    except BaseException:
        f.close()
        raise
    return GGUFFile(path, f, metadata, infos, data_start)


def read_gguf(path):
    """An iterator over the GGUFTensor of every tensor in the GGUF file `path` (each read into
    memory as it is reached), with the file's `.metadata`: open_gguf(path)."""
    return open_gguf(path)


class _Cursor:
    """Little-endian reads from the start of an open file, each checked against the bytes left."""

    def __init__(self, f, path):
        self.f, self.path = f, path
        self.size = os.fstat(f.fileno()).st_size
        self.pos = 0
        self.array_items = 0

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

    def unpack(self, fmt, what):
        fmt = "<" + fmt  # standard sizes, no padding
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def string(self, what):
        (n,) = self.unpack("Q", what)
        return self.take(n, what)


def _read_header(cur):
    """The metadata, every tensor's _TensorInfo and the offset of the data section, all checked."""
    if cur.take(len(_MAGIC), "the magic") != _MAGIC:
        raise cur.error("not a GGUF file (no GGUF magic)")
    (version,) = cur.unpack("I", "the version")
    if version & 0xFFFF == 0 and version:  # 3 read with the wrong byte order is 0x03000000
        raise cur.error(f"a big-endian GGUF file (version field {version:#010x}); only little-endian files are read")
    if version not in _VERSIONS:
        raise cur.error(f"GGUF version {version} is not supported (only {' and '.join(map(str, _VERSIONS))})")
    n_tensors, n_entries = cur.unpack("QQ", "the header")
    cur.need(n_entries * _MIN_ENTRY_BYTES, f"{n_entries} metadata entries")
    metadata, kinds, alignment = _read_metadata(cur, n_entries)
    cur.need(n_tensors * _MIN_INFO_BYTES, f"{n_tensors} tensor infos")
    infos, names = [], set()
    for i in range(n_tensors):
        info = _read_tensor_info(cur, i, alignment)
        if info.name in names:
            raise cur.error(f"tensor {info.name!r} appears twice")
        names.add(info.name)
        info.orig_shape = _orig_shape(cur, info, metadata, kinds)
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
    return metadata, infos, data_start


def _read_metadata(cur, n_entries):
    """The metadata entries as {key: value}, {key: (type, array item type or None)}, and the
    file's alignment."""
    metadata, kinds, alignment = {}, {}, GGUF_DEFAULT_ALIGNMENT
    for i in range(n_entries):
        key = _text(cur, f"metadata key #{i}")
        if key in metadata:
            raise cur.error(f"metadata key {key!r} appears twice")
        (kind,) = cur.unpack("I", f"the type of metadata {key!r}")
        value, item_kind = _read_value(cur, kind, f"metadata {key!r}", 0)
        metadata[key], kinds[key] = value, (kind, item_kind)
        if key == Keys.General.ALIGNMENT:
            if kind != GGUFValueType.UINT32 or value < _MIN_ALIGNMENT or value & (value - 1):
                raise cur.error(f"metadata {key!r} must be a UINT32 power of two of at least {_MIN_ALIGNMENT}, got "
                                f"{value!r} of type {GGUFValueType(kind).name}")
            alignment = value
    return metadata, kinds, alignment


def _read_value(cur, kind, what, depth):
    """A metadata value of type `kind`, and for an array its items' type (else None)."""
    if kind in _SCALARS:
        (value,) = cur.unpack(_SCALARS[kind], what)
        return (bool(value) if kind == GGUFValueType.BOOL else value), None
    if kind == GGUFValueType.STRING:
        raw = cur.string(what)
        try:
            return raw.decode("utf-8"), None
        except UnicodeDecodeError:
            return raw, None  # kept as found: a bad string in metadata damages nothing else
    if kind != GGUFValueType.ARRAY:
        raise cur.error(f"{what}: unknown value type {kind}")
    if depth == _MAX_NESTING:
        raise cur.error(f"{what}: arrays nested more than {_MAX_NESTING} deep")
    item_kind, count = cur.unpack("IQ", what)
    cur.array_items += count
    if cur.array_items > _MAX_ARRAY_ITEMS:
        raise cur.error(f"{what}: metadata arrays of more than {_MAX_ARRAY_ITEMS} items in all")
    if item_kind in _SCALARS:
        dtype = np.dtype("<" + _SCALARS[item_kind])
        items = np.frombuffer(cur.take(count * dtype.itemsize, f"{what}: {count} items"), dtype).tolist()
        return ([bool(v) for v in items] if item_kind == GGUFValueType.BOOL else items), item_kind
    if item_kind in _MIN_BYTES:
        cur.need(count * _MIN_BYTES[item_kind], f"{what}: {count} items")
        return [_read_value(cur, item_kind, what, depth + 1)[0] for _ in range(count)], item_kind
    raise cur.error(f"{what}: unknown array item type {item_kind}")


def _orig_shape(cur, info, metadata, kinds):
    """The logical shape ComfyUI-GGUF recorded for tensor `info`, checked, or None."""
    key = ORIG_SHAPE_KEY + info.name
    if key not in metadata:
        return None
    value, (kind, item_kind) = metadata[key], kinds[key]
    what = f"tensor {info.name!r}: metadata {key!r}"
    if kind != GGUFValueType.ARRAY or item_kind not in _INTEGERS:
        raise cur.error(f"{what} must be an array of integers (the tensor's shape), got {value!r}")
    if len(value) > _MAX_ORIG_DIMS or any(n < 0 for n in value):
        raise cur.error(f"{what} must hold at most {_MAX_ORIG_DIMS} non-negative dimensions, got {value}")
    shape = tuple(value)
    block, block_bytes = GGML_QUANT_SIZES[info.ggml_type]
    counted = math.prod(n for n in shape if n)  # as for stored shapes: torch and numpy must count it
    if max(counted, counted // block * block_bytes) >= _MAX_COUNT:
        raise cur.error(f"{what}: shape {list(shape)} has 2**63 or more elements or bytes (counting its non-zero "
                        "dimensions)")
    if math.prod(shape) != math.prod(info.shape):
        raise cur.error(f"{what}: shape {list(shape)} has {math.prod(shape)} elements, the tensor stored as "
                        f"{list(info.shape)} has {math.prod(info.shape)}")
    return shape


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


def _read_tensor(path, f, t, data_start):
    unbuffered = f.raw  # every byte as the file holds it now, none kept from an earlier read
    raw = torch.empty(t.nbytes, dtype=torch.uint8)
    unbuffered.seek(data_start + t.offset)
    view, got = memoryview(raw.numpy()), 0
    while got < t.nbytes:
        n = unbuffered.readinto(view[got:])
        if not n:
            raise ValueError(f"{path}: tensor {t.name!r}: the file ends {got} bytes into its {t.nbytes} bytes "
                             "of data (truncated while being read)")
        got += n
    shape = t.shape if t.orig_shape is None else t.orig_shape
    if t.ggml_type in _DENSE:
        data = raw.view(_DENSE[t.ggml_type]).reshape(shape)
    else:
        aligned = _row(shape) % GGML_QUANT_SIZES[t.ggml_type][0] == 0
        data = raw.reshape(_packed_shape(t.ggml_type, shape if aligned else t.shape))
    return GGUFTensor(t.name, t.ggml_type.name, shape, data, None if t.orig_shape is None else t.shape)


def write_gguf(path, tensors, arch="tinykern"):
    """Write GGUFTensors (or {name: dense torch tensor or GGUFTensor}) to the GGUF file `path`.
    A tensor's type is any GGML type name (any case) or a Format; its bytes go as they are. A
    reshaped tensor (stored_shape other than shape) is stored as ComfyUI-GGUF stores it: with
    stored_shape and its shape in `comfy.gguf.orig_shape.<name>` (INT32 array)."""
    if isinstance(tensors, dict):
        tensors = [v if isinstance(v, GGUFTensor) else dense_tensor(k, v) for k, v in tensors.items()]
    tensors = list(tensors)
    checked = []
    for t in tensors:
        ggml_type = _ggml_type(t.type, t.name, path)
        data = t.data.detach().cpu().contiguous()
        _check_layout(path, t, ggml_type, data)
        stored = tuple(t.stored_shape) if t.reshaped else tuple(t.shape)
        if t.reshaped:
            if math.prod(stored) != math.prod(t.shape) or _row(stored) % GGML_QUANT_SIZES[ggml_type][0]:
                raise ValueError(f"{os.fspath(path)}: tensor {t.name!r}: stored shape {list(stored)} does not hold "
                                 f"shape {list(t.shape)} in rows of whole {ggml_type.name} blocks")
            if not 0 < len(t.shape) <= _MAX_ORIG_DIMS or any(n >= 2**31 for n in t.shape):
                raise ValueError(f"{os.fspath(path)}: tensor {t.name!r}: shape {list(t.shape)} cannot be recorded "
                                 f"(1 to {_MAX_ORIG_DIMS} dimensions that fit INT32)")
        checked.append((t, ggml_type, data, stored))
    writer = GGUFWriter(os.fspath(path), arch)
    for t, _, _, stored in checked:
        if stored != tuple(t.shape):
            writer.add_array(ORIG_SHAPE_KEY + t.name, [int(n) for n in t.shape])  # ints: an INT32 array
    for t, ggml_type, data, stored in checked:
        if ggml_type in _DENSE:
            data = data.to(_DENSE[ggml_type]).reshape(stored)
            # numpy has no bf16: its bits go as int16, which keeps the shape (a scalar's too)
            array = (data.view(torch.int16) if ggml_type == GGMLQuantizationType.BF16 else data).numpy()
        else:
            array = data.reshape(_packed_shape(ggml_type, stored)).numpy()
        writer.add_tensor(t.name, array, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _ggml_type(kind, name, path=None):
    """The GGMLQuantizationType of a type name ("Q4_K", "q4_k") or Format."""
    if isinstance(kind, Format):
        return GGMLQuantizationType(kind.ggml_type)
    ggml_type = GGMLQuantizationType.__members__.get(str(kind).upper())
    if ggml_type is None or ggml_type not in GGML_QUANT_SIZES:
        where = f"{os.fspath(path)}: " if path is not None else ""
        raise ValueError(f"{where}tensor {name!r}: unknown GGML type {kind!r}")
    return ggml_type


def _check_layout(path, t, ggml_type, data):
    """The writer takes the shape from the data, so data that disagrees with t.shape (the layout
    GGUFTensor documents) would be written as another tensor: refuse it."""
    shape = tuple(t.shape)
    if ggml_type in _DENSE:
        expected = shape
    else:
        block = GGML_QUANT_SIZES[ggml_type][0]
        rows = shape if _row(shape) % block == 0 else tuple(t.stored_shape or ())
        if data.dtype != torch.uint8 or _row(rows) % block:
            raise ValueError(f"{os.fspath(path)}: tensor {t.name!r}: {ggml_type.name} needs uint8 blocks and a last "
                             f"dimension that is a multiple of {block}, got {data.dtype} data for shape {list(shape)}")
        expected = _packed_shape(ggml_type, rows)
    if tuple(data.shape) != expected:
        raise ValueError(f"{os.fspath(path)}: tensor {t.name!r} of {ggml_type.name} shape {list(shape)} needs data of "
                         f"shape {list(expected)}, got {list(data.shape)}")


def _packed_shape(ggml_type, shape):
    """The uint8 shape of packed blocks for a tensor of `shape`: one row of blocks per row (a
    scalar is one row of one element)."""
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
