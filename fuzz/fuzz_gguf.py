"""Fuzz target: tinykern.io.gguf.read_gguf on mutated GGUF files (conventions in harness.py).

`python fuzz/fuzz_gguf.py [libFuzzer args...]`. An accepted file must yield tensors whose data
has the size and layout their type and shape imply; `suspicious` asks gguf-py's own reader,
an independent parser, whether the file breaks one of the rules read_gguf enforces.
"""

import math
import os
import tempfile

import harness

with harness.instrumented("tinykern.io", "gguf"):
    import torch
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter

    from tinykern.formats import q4k, q8_0
    from tinykern.io.gguf import GGUFTensor, dense_tensor, read_gguf, write_gguf

SUFFIX = ".gguf"
_DENSE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def seed_files(folder):
    """Small valid GGUF files in `folder`, as paths: every type read_gguf treats apart (a type it
    reads as raw bytes among them), a scalar, a tensor of no elements between two others, and
    metadata of every kind (arrays of numbers, of strings, nested) with a custom alignment."""
    gen = torch.Generator().manual_seed(0)
    plain = os.path.join(folder, "plain.gguf")
    q5_k = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_K][1]
    write_gguf(plain, [
        GGUFTensor("blk.0.q4k", "Q4_K", (2, 256), q4k.quantize(torch.randn(2, 256, generator=gen))),
        GGUFTensor("blk.0.q8_0", "Q8_0", (3, 64), q8_0.quantize(torch.randn(3, 64, generator=gen))),
        dense_tensor("blk.0.f16", torch.randn(3, 5, generator=gen).half()),
        dense_tensor("blk.0.f32", torch.randn(2, 1, 3, 2, generator=gen)),
        dense_tensor("blk.0.bf16", torch.randn(5, generator=gen).bfloat16()),
        dense_tensor("logit_scale", torch.tensor(4.5)),
        dense_tensor("blk.0.empty", torch.empty(0, 3)),
        GGUFTensor("blk.0.q5k", "Q5_K", (2, 256), torch.randint(0, 256, (2, q5_k), generator=gen, dtype=torch.uint8)),
    ])
    metadata = os.path.join(folder, "metadata.gguf")
    writer = GGUFWriter(metadata, "tinykern")
    writer.add_custom_alignment(64)
    writer.add_uint32("test.count", 7)
    writer.add_float32("test.scale", 0.25)
    writer.add_bool("test.flag", True)
    writer.add_string("test.text", "seed")
    writer.add_array("test.ints", [3, 1, 4, 1, 5])
    writer.add_array("test.words", ["alpha", "beta"])
    writer.add_array("test.nested", [[2, 7], [1]])
    writer.add_tensor("w", q8_0.quantize(torch.randn(2, 32, generator=gen)).numpy(), raw_dtype=GGMLQuantizationType.Q8_0)
    writer.add_tensor("b", torch.randn(3, generator=gen).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [plain, metadata]


def seeds():
    with tempfile.TemporaryDirectory() as folder:
        paths = seed_files(folder)
        return [open(p, "rb").read() for p in paths]


def load(path):
    for t in read_gguf(path):
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[t.type]]
        row = t.shape[-1] if t.shape else 1
        assert _countable(t.shape, block, block_bytes) and row % block == 0, (t.name, t.type, t.shape)
        if t.type in _DENSE:
            layout = (_DENSE[t.type], tuple(t.shape))
        else:
            layout = (torch.uint8, (*t.shape[:-1], row // block * block_bytes))
        assert (t.data.dtype, tuple(t.data.shape)) == layout, (t.name, t.type, t.shape, t.data.dtype, t.data.shape)
        assert t.data.numel() * t.data.element_size() == math.prod(t.shape) // block * block_bytes, t.name


def suspicious(path):
    """Which rule of read_gguf's module docstring gguf-py's reading of the file breaks, or None."""
    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf-py raises many types on damage
        return f"gguf-py refuses it ({type(e).__name__}: {e})"
    alignment = int(reader.alignment)
    if alignment < 8 or alignment & (alignment - 1):
        return f"alignment {alignment}"
    size, start = os.path.getsize(path), int(reader.data_offset)
    for t in reader.tensors:
        dims = [int(n) for n in t.shape]
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(t.tensor_type)]
        if "\0" in t.name or not _countable(dims, block, block_bytes) or (dims[0] if dims else 1) % block:
            return f"tensor {t.name!r} of type {t.tensor_type} and dims {dims}"
        offset, nbytes = int(t.data_offset), int(t.n_bytes)
        if offset != start or offset + nbytes > size:
            return f"tensor {t.name!r}: data at {offset}, expected {start}, {nbytes} bytes, file {size}"
        start += -(-nbytes // alignment) * alignment
    return None


def _countable(dims, block, block_bytes):
    """At most 4 dimensions, fewer than 2**63 elements and bytes counting the non-zero ones."""
    counted = math.prod(n for n in dims if n)
    return len(dims) <= 4 and max(counted, counted // block * block_bytes) < 2**63


if __name__ == "__main__":
    harness.main(__file__)
