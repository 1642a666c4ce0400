"""GGUF tensors in and out, through the `gguf` package. Q4_K and Q8_0 stay packed."""

import dataclasses
import os

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

_DENSE = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}
_PACKED = (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q8_0)


@dataclasses.dataclass
class GGUFTensor:
    """One tensor of a GGUF file.

    type: the GGML type name ("Q4_K", "Q8_0", "F16", "F32", "BF16", or another GGML type).
    shape: the logical shape, rows first as in torch.
    data: for Q4_K/Q8_0 the packed blocks, uint8 [*shape[:-1], shape[-1]/block*block_bytes];
        for F16/F32/BF16 the dense tensor; for other types the raw bytes as the file has them.
    """

    name: str
    type: str
    shape: tuple
    data: torch.Tensor


def read_gguf(path):
    """An iterator over the GGUFTensor of every tensor in the GGUF file `path` (each copied into
    memory as it is reached). A file that cannot be opened raises here, not on iteration."""
    path = os.fspath(path)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf raises ValueError, struct.error, IndexError... on damage
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    return _tensors(path, reader)


def _tensors(path, reader):
    for t in reader.tensors:
        ggml_type = GGMLQuantizationType(t.tensor_type)
        shape = tuple(int(n) for n in reversed(t.shape))
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        expected = int(np.prod(shape)) // block * block_bytes
        if t.data.nbytes != expected:
            raise ValueError(f"{path}: tensor {t.name!r} holds {t.data.nbytes} bytes, {expected} expected for {ggml_type.name} {list(shape)}")
        raw = torch.from_numpy(np.array(t.data))
        if ggml_type in _DENSE:
            data = raw.reshape(-1).view(torch.uint8).view(_DENSE[ggml_type]).reshape(shape)
        elif ggml_type in _PACKED:
            data = raw.reshape(_packed_shape(ggml_type, shape))
        else:
            data = raw
        yield GGUFTensor(t.name, ggml_type.name, shape, data)


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
            if ggml_type == GGMLQuantizationType.BF16:  # numpy has no bf16: hand over its bytes
                array = data.view(torch.uint8).numpy().reshape(*t.shape[:-1], t.shape[-1] * 2)
            else:
                array = data.numpy()
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
        if data.dtype != torch.uint8 or not shape or shape[-1] % block:
            raise ValueError(f"{os.fspath(path)}: tensor {t.name!r}: {ggml_type.name} needs uint8 blocks and a last "
                             f"dimension that is a multiple of {block}, got {data.dtype} data for shape {list(shape)}")
        expected = _packed_shape(ggml_type, shape)
    else:
        return
    if tuple(data.shape) != expected:
        raise ValueError(f"{os.fspath(path)}: tensor {t.name!r} of {ggml_type.name} shape {list(shape)} needs data of "
                         f"shape {list(expected)}, got {list(data.shape)}")


def _packed_shape(ggml_type, shape):
    """The uint8 shape of packed blocks for a tensor of logical `shape`: one row of blocks per row."""
    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    return (*shape[:-1], shape[-1] // block * block_bytes)


def dense_tensor(name, tensor):
    """A GGUFTensor holding `tensor` as F32, F16 or BF16 (other dtypes become F32)."""
    types = {torch.float16: "F16", torch.bfloat16: "BF16"}
    kind = types.get(tensor.dtype, "F32")
    return GGUFTensor(name, kind, tuple(tensor.shape), tensor if kind != "F32" else tensor.float())
