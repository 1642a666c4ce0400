"""A bounded, seeded mutational fuzz of read_gguf, and known hostile files one by one.

Every input runs in a worker process (fuzz/harness.py run_batch) with a time limit, so a hang or
a signal fails the test and names the input. An input may be refused (ValueError) or accepted;
accepted, its tensors must be self-consistent (fuzz_gguf.load) and it must break none of the
reader's rules (fuzz_gguf.suspicious, and the fields whose every other value is forbidden).
"""

import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFEndian, GGUFReader, GGUFWriter

from tinykern.io import write_gguf

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
sys.path.insert(0, str(FUZZ))  # the fuzz targets import their harness as a top-level module
import harness  # noqa: E402

fuzz_gguf = harness.load_target(str(FUZZ / "fuzz_gguf.py"))

TRUNCATIONS = 64
FLIPS_PER_SEED = 150
MAX = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


class Field:
    """One number of a GGUF header: where it is and, where the format leaves it no choice, the
    only values a valid file can hold (None: gguf-py's view of the result decides)."""

    def __init__(self, offset, size, label, allowed=None):
        self.offset, self.size, self.label, self.allowed = offset, size, label, allowed

    def get(self, data):
        return int.from_bytes(data[self.offset:self.offset + self.size], "little")

    def set(self, data, value):
        return data[:self.offset] + value.to_bytes(self.size, "little") + data[self.offset + self.size:]


def header_fields(path):
    """Every number in the header of the GGUF file `path`: the magic, each count, length, type,
    dimension, offset and metadata value, each array item apart (string bytes are left out)."""
    reader = GGUFReader(path)
    base = reader.data.ctypes.data

    def where(part):
        return part.ctypes.data - base

    version = reader.fields["GGUF.version"].parts[0]
    fields = [Field(0, 4, "magic", {int.from_bytes(b"GGUF", "little")}), Field(where(version), 4, "version", {2, 3})]
    for name, field in reader.fields.items():
        if name != "GGUF.version":
            fields += [Field(where(part) + j * part.itemsize, part.itemsize, f"{name}[{i}][{j}]")
                       for i, part in enumerate(field.parts) if not (part.dtype == np.uint8 and part.size > 1)
                       for j in range(part.size)]
    for t in reader.tensors:
        *parts, offset = t.field.parts  # name length, name, n_dims, dims, type; then the data offset
        fields += [Field(where(part) + j * part.itemsize, part.itemsize, f"tensor {t.name!r}[{i}][{j}]")
                   for i, part in enumerate(parts) if not (part.dtype == np.uint8 and part.size > 1)
                   for j in range(part.size)]
        fields.append(Field(where(offset), 8, f"tensor {t.name!r} offset", {int(offset[0])}))
    return fields


def data_end(path):
    """Where the last tensor's data ends: a file cut before it is always damaged."""
    reader = GGUFReader(path)
    return max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)


def boundary_values(field, value):
    top = MAX[field.size]
    candidates = {0, 1, value - 1, value + 1, 2 * value, top, top - 1, (top + 1) // 2, (top + 1) // 2 - 1}
    return sorted(v for v in candidates if 0 <= v <= top and v != value)


def mutations(seed_path):
    """[(family, label, data, must_refuse)] of one seed file."""
    data = seed_path.read_bytes()
    name = seed_path.stem
    out = []
    for field in header_fields(seed_path):
        for v in boundary_values(field, field.get(data)):
            forbidden = field.allowed is not None and v not in field.allowed
            out.append(("field", f"{name}: {field.label} = {v}", field.set(data, v), forbidden))
    end = data_end(seed_path)
    for k in range(TRUNCATIONS):
        cut = len(data) * k // TRUNCATIONS
        out.append(("truncation", f"{name}: cut at {cut} of {len(data)}", data[:cut], cut < end))
    rng = random.Random(f"flips-{name}")
    header = GGUFReader(seed_path).data_offset
    for i in range(FLIPS_PER_SEED):
        at = rng.randrange(header) if i % 3 else rng.randrange(len(data))  # two in three in the header
        byte = rng.randrange(1, 256) ^ data[at]
        out.append(("flip", f"{name}: byte {at} = {byte}", data[:at] + bytes([byte]) + data[at + 1:], False))
    return out


# Hostile files, each built from a seed (a header field set to a value no valid file holds) or by a
# writer; each must be refused naming the file and, where one is to blame, the tensor.
def _set(label_part, value, seed="plain"):
    def build(seeds):
        path = seeds[seed]
        data = path.read_bytes()
        (field,) = [f for f in header_fields(path) if f.label == label_part]
        return field.set(data, value)
    return build


def _written(alignment=None, endian=GGUFEndian.LITTLE, name="w", shape=(2, 8)):
    def build(seeds):
        path = seeds["plain"].parent / f"written-{alignment}-{endian.name}-{len(shape)}.gguf"
        writer = GGUFWriter(str(path), "tinykern", endianess=endian)
        if alignment is not None:
            writer.add_custom_alignment(alignment)
        gen = torch.Generator().manual_seed(len(shape))
        writer.add_tensor(name, torch.randn(shape, generator=gen).numpy())
        writer.add_tensor("last", torch.randn(3, generator=gen).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()
    return build


def _array_count_past_the_end(seeds):
    return b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 1) + b"a" + struct.pack("<IIQ", 9, 0, 1 << 63)


SECOND = "tensor 'blk.0.q8_0' offset"
NAMED = {  # case: (build, how its error must name the tensor, or None)
    "array-count-past-the-end": (_array_count_past_the_end, None),
    "key-length-max": (_set("general.architecture[0][0]", MAX[8]), None),
    "tensor-count-huge": (_set("GGUF.tensor_count[0][0]", 1 << 62), None),
    "offset-past-the-data": (_set(SECOND, 1 << 20), "'blk.0.q8_0'"),
    "offset-wrapping": (_set(SECOND, MAX[8]), "'blk.0.q8_0'"),
    "offset-misaligned-1": (_set(SECOND, 1), "'blk.0.q8_0'"),
    "offset-misaligned-33": (_set(SECOND, 33), "'blk.0.q8_0'"),
    "offsets-overlapping": (_set(SECOND, 0), "'blk.0.q8_0'"),
    "dims-shrunk": (_set("tensor 'blk.0.q4k'[3][1]", 1), "'blk.0.q8_0'"),
    "elements-past-int64": (_set("tensor 'blk.0.empty'[3][0]", 1 << 63), "'blk.0.empty'"),
    "alignment-1": (_written(alignment=1), None),
    "alignment-2": (_written(alignment=2), None),
    "n-dims-5": (_written(shape=(1, 1, 2, 1, 8)), "'w'"),
    "nul-in-name": (_written(name="a\0b"), r"'a\x00b'"),
    "big-endian": (_written(endian=GGUFEndian.BIG), None),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{family: [(label, path, must_refuse, outcome)]}: every input through one worker."""
    folder = tmp_path_factory.mktemp("fuzz_gguf")
    seeds = {Path(p).stem: Path(p) for p in fuzz_gguf.seed_files(str(folder))}
    inputs = [item for path in seeds.values() for item in mutations(path)]
    inputs += [("named", case, build(seeds), True) for case, (build, _) in NAMED.items()]
    inputs += [("seed", path.stem, path.read_bytes(), False) for path in seeds.values()]
    return harness.run_inputs(str(FUZZ / "fuzz_gguf.py"), str(folder), inputs)


@pytest.mark.parametrize("family", ["field", "truncation", "flip"])
def test_mutated_files_are_refused_or_read_consistently(family, outcomes):
    harness.assert_family(outcomes, family)


def test_seeds_are_read(outcomes):
    harness.assert_seeds_accepted(outcomes)


@pytest.mark.parametrize("case", NAMED)
def test_hostile_file_is_refused_naming_file_and_tensor(case, outcomes):
    ((_, path, _, result),) = [row for row in outcomes["named"] if row[0] == case]
    assert result["outcome"] == "refused", result
    assert path in result["detail"], result["detail"]
    tensor = NAMED[case][1]
    assert tensor is None or tensor in result["detail"], result["detail"]


def test_truncated_while_iterating_is_a_value_error_not_a_signal(gen, tmp_path):
    """Cut the file to its header after the first tensor was read: the next one is a ValueError.
    The second tensor spans several pages, so a reader of a live mmap would touch pages past the
    new end of the file (SIGBUS)."""
    path = tmp_path / "model.gguf"
    write_gguf(path, {"first": torch.randn(3, generator=gen), "second": torch.randn(64, 256, generator=gen)})
    cut = GGUFReader(path).data_offset
    child = textwrap.dedent(f"""
        import os, sys
        from tinykern.io import read_gguf
        tensors = read_gguf({str(path)!r})
        next(tensors)
        os.truncate({str(path)!r}, {cut})
        try:
            next(tensors)
        except ValueError as e:
            print(e)
            sys.exit(0)
        sys.exit("no error")
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-2000:])
    assert str(path) in done.stdout and "'second'" in done.stdout, done.stdout
