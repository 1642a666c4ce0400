"""A bounded, seeded mutational fuzz of load_quantized from files written by save_quantized.

Every input runs in a worker process (fuzz/harness.py run_batch) with a time limit, so a hang or
a signal fails the test and names the input. Each input is loaded into a meta and a CPU model
(fuzz_load_quantized.load): refused, it must be a ValueError naming the file that leaves both
models as they were; accepted, it must give a seed's model exactly (anything else is a silent
success); the same holds for its copy with the metadata checksum forged. Inputs whose every
effect is a damage (a checksum left stale, a cut) must be refused.
"""

import json
import random
import struct
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
sys.path.insert(0, str(FUZZ))  # the fuzz targets import their harness as a top-level module
import harness  # noqa: E402

target = harness.load_target(str(FUZZ / "fuzz_load_quantized.py"))

TRUNCATIONS = 64
FLIPS_PER_SEED = 150
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "F8_E4M3", "XX", 5, None]
ODD = [None, "x", True, 1.5, -1, 2 ** 64, [], {}]  # values of the wrong type or range, for any field


def split(data):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header, rest):
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + rest


def number_variants(value):
    return [value + 1, value - 1, 0, 2 * value] if type(value) is int else []


def pair_variants(value):
    return [value[::-1], [value[0] + 1, value[1]], [1, 1], [0, 0], [2, 2], value[:1], value * 2, 3]


def header_mutations(data):
    """(label, data, must_refuse) for each field of the header changed alone: tensor entries,
    metadata strings, and, parsed, each module spec and tensor record."""
    header, rest = split(data)
    out = []

    def variant(label, edit, must_refuse):
        copy = json.loads(json.dumps(header))
        result = edit(copy)
        result = copy if result is None else result
        if result != header:  # an edit that writes a field's own value is no mutation
            out.append((label, join(result, rest), must_refuse))

    for key in [k for k in header if k != "__metadata__"]:
        entry = header[key]
        for dtype in DTYPES:
            if dtype != entry["dtype"]:
                variant(f"{key} dtype {dtype}", lambda h, d=dtype: h[key].update(dtype=d), True)
        shape, (begin, end) = entry["shape"], entry["data_offsets"]
        for new in [shape[::-1], [*shape, 1], [1, *shape], shape[:-1], [shape[0] + 1, *shape[1:]] if shape else [1],
                    [-1], [2 ** 63], *ODD]:
            if new != shape:
                # a reordered shape or a unit dimension keeps the bytes: the checksum of the shape must catch it
                variant(f"{key} shape {new}", lambda h, s=new: h[key].update(shape=s), True)
        for new in [[end, begin], [begin + 1, end + 1], [begin, end + 1], [begin, end - 1], [0, end - begin],
                    [begin, 2 ** 64], [-1, end], [begin], *ODD]:
            # a tensor of no bytes moved to the start of the data still tiles it, as safetensors requires
            variant(f"{key} data_offsets {new}", lambda h, o=new: h[key].update(data_offsets=o), new != [0, 0])
        if 0 in shape:  # no bytes whatever its other dimensions: changed in the record too, they reach the checks
            for new in [[*shape, 2 ** 64], [*shape, 2 ** 63], [2 ** 62, 2 ** 62, *shape], [*shape, 2 ** 63 - 1]]:
                variant(f"{key} shape {new} in the header and the record", reshaped(key, new), True)
        variant(f"{key} without data_offsets", lambda h: h[key].pop("data_offsets"), True)
        variant(f"{key} removed", lambda h: h.pop(key), True)
        variant(f"{key} copied as 'extra'", lambda h: h.update(extra=h[key]), True)
    meta = header["__metadata__"]
    for key in meta:
        informative = key == "format"  # safetensors' own tag: no effect on loading
        variant(f"metadata {key} removed", lambda h: h["__metadata__"].pop(key), not informative)
        for value in ["", "x", "[]", "{}", "null", "1", 1, None, [meta[key]]]:
            must = not informative or not isinstance(value, str)
            variant(f"metadata {key} = {value!r}", lambda h, v=value: h["__metadata__"].update({key: v}), must)
    # Left with a stale checksum these must be refused; fuzz_load_quantized.load also loads each
    # with the checksum forged, where the model must come out as a seed's or be refused.
    edits = spec_edits(json.loads(meta["tinykern.modules"])) + record_edits(json.loads(meta["tinykern.tensors"]))
    for label, edit in edits:
        variant(label, lambda h, edit=edit: edit(h["__metadata__"]), True)
    for whole in [[header], None, "x", 1, {}, {"__metadata__": meta}]:
        out.append((f"header = {str(whole)[:40]}", join(whole, rest), True))
    out.append(("header nested 100000 deep", struct.pack("<Q", 200000) + b"[" * 100000 + b"]" * 100000 + rest, True))
    return out


def reshaped(key, shape):
    """A header edit that gives tensor `key` `shape` in its header entry and its record alike."""
    def edit(header):
        header[key]["shape"] = shape
        edit_json("tinykern.tensors", lambda records: records[key].update(shape=shape))(header["__metadata__"])
    return edit


def edit_json(key, change):
    def edit(meta):
        value = json.loads(meta[key])
        result = change(value)
        meta[key] = json.dumps(value if result is None else result)
    return edit


def spec_edits(specs):
    """(label, edit of the metadata) for each field of each module spec, and each module name."""
    out = []
    for name, spec in specs.items():
        for field, value in spec.items():
            news = pair_variants(value) if isinstance(value, list) else number_variants(value)
            news += [t for t in ("Q4Linear", "Q8Linear", "Q4Conv2d", "Linear") if field == "type" and t != value]
            news += [t for t in ("float16", "bfloat16", "float32", "int8", "load")
                     if field == "bias_dtype" and t != value]
            news += [not value] if isinstance(value, bool) else []
            for new in news + ODD:
                out.append((f"spec {name}.{field} = {new!r}",
                            edit_json("tinykern.modules", lambda s, n=name, f=field, v=new: s[n].update({f: v}))))
            out.append((f"spec {name} without {field}",
                        edit_json("tinykern.modules", lambda s, n=name, f=field: s[n].pop(f))))
        out.append((f"spec {name} with an extra field",
                    edit_json("tinykern.modules", lambda s, n=name: s[n].update(rank=4))))
        for place in ("", "norm", "dw", "out", "nowhere", "proj.", *specs):
            if place != name:
                out.append((f"spec {name} moved to {place!r}",
                            edit_json("tinykern.modules", lambda s, n=name, p=place: {**s, p: s[n]})))
        out.append((f"spec {name} removed", edit_json("tinykern.modules", lambda s, n=name: s.pop(n))))
    for whole in ([specs], None, "x"):
        out.append((f"specs = {str(whole)[:40]}",
                    lambda meta, w=whole: meta.update({"tinykern.modules": json.dumps(w)})))
    return out


def record_edits(records):
    """(label, edit of the metadata) for each tensor record's dtype, shape and checksum."""
    out = []
    for key, record in records.items():
        for dtype in ("float32", "float16", "bfloat16", "int32", "uint8", "int8"):
            if dtype != record["dtype"]:
                out.append((f"record {key} dtype {dtype}",
                            edit_json("tinykern.tensors", lambda r, k=key, d=dtype: r[k].update(dtype=d))))
        for shape in (record["shape"][::-1], [*record["shape"], 1], "x"):
            out.append((f"record {key} shape {shape}",
                        edit_json("tinykern.tensors", lambda r, k=key, s=shape: r[k].update(shape=s))))
        out.append((f"record {key} crc32 + 1",
                    edit_json("tinykern.tensors", lambda r, k=key: r[k].update(crc32=r[k]["crc32"] + 1))))
        out.append((f"record {key} removed", edit_json("tinykern.tensors", lambda r, k=key: r.pop(k))))
    return out


def mutations(name, data, with_fields):
    """[(family, label, data, must_refuse)] of one seed file; its header fields changed one by one
    only `with_fields` (the seeds share their layout)."""
    fields = header_mutations(data) if with_fields else []
    out = [("field", f"{name}: {label}", mutated, must) for label, mutated, must in fields]
    for k in range(TRUNCATIONS):
        cut = len(data) * k // TRUNCATIONS
        out.append(("truncation", f"{name}: cut at {cut} of {len(data)}", data[:cut], True))
    rng = random.Random(f"flips-{name}")
    header = 8 + struct.unpack("<Q", data[:8])[0]
    for i in range(FLIPS_PER_SEED):
        at = rng.randrange(header) if i % 3 else rng.randrange(header, len(data))  # two in three in the header
        byte = rng.randrange(1, 256) ^ data[at]
        # a flip in the tensor data always meets a checksum
        out.append(("flip", f"{name}: byte {at} = {byte}", data[:at] + bytes([byte]) + data[at + 1:], at >= header))
    return out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{family: [(label, path, must_refuse, outcome)]}: every input through one batch."""
    folder = tmp_path_factory.mktemp("fuzz_load_quantized")
    seeds = dict(zip(("float32", "float16"), target.seeds()))
    inputs = [item for i, (name, data) in enumerate(seeds.items()) for item in mutations(name, data, with_fields=i == 0)]
    half, rest = split(seeds["float16"])
    inputs += [("field", f"float16: {key} dtype BF16", join({**half, key: {**entry, "dtype": "BF16"}}, rest), True)
               for key, entry in half.items() if key != "__metadata__" and entry["dtype"] == "F16"]
    inputs += [("seed", name, data, False) for name, data in seeds.items()]
    return harness.run_inputs(str(FUZZ / "fuzz_load_quantized.py"), str(folder), inputs)


@pytest.mark.parametrize("family", ["field", "truncation", "flip"])
def test_mutated_files_are_refused_or_load_a_seed_model(family, outcomes):
    harness.assert_family(outcomes, family)


def test_seeds_load(outcomes):
    harness.assert_seeds_accepted(outcomes)
