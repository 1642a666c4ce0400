"""GGUF in and out: round trips through write_gguf/read_gguf, files written by the `gguf` package
itself, and damaged files refused with a message naming the file."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

import tinykern
from tinykern import Q4Linear, Q8Linear
from tinykern.formats import FORMATS, q4k, q8_0
from tinykern.io import GGUFTensor, open_gguf, read_gguf, write_gguf
from tinykern.io.gguf import dense_tensor
from tinykern.serialization import _bytes


def write_with_gguf(path, tensors, setup=None):
    """A file written by the `gguf` package itself: `tensors` as (name, array, raw_dtype or
    None), after `setup(writer)` (metadata, alignment) when given."""
    writer = GGUFWriter(str(path), "llama")
    if setup is not None:
        setup(writer)
    for name, array, raw_dtype in tensors:
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def sample_tensors(gen):
    return [
        GGUFTensor("blk.0.attn_q.weight", "Q4_K", (5, 512), q4k.quantize(torch.randn(5, 512, generator=gen))),
        GGUFTensor("blk.0.one_row", "Q4_K", (1, 256), q4k.quantize(torch.randn(1, 256, generator=gen))),
        GGUFTensor("blk.0.ffn_down.weight", "Q8_0", (3, 96), q8_0.quantize(torch.randn(3, 96, generator=gen))),
        GGUFTensor("blk.0.q8_3d", "Q8_0", (2, 3, 64), q8_0.quantize(torch.randn(2, 3, 64, generator=gen))),
        dense_tensor("blk.0.norm.f16", torch.randn(7, 3, generator=gen).half()),
        dense_tensor("blk.0.norm.bias", torch.randn(7, generator=gen)),
        dense_tensor("blk.0.bf16", torch.randn(2, 3, 5, generator=gen).bfloat16()),
        dense_tensor("blk.0.f32_4d", torch.randn(2, 1, 3, 4, generator=gen)),
    ]


def test_round_trip_preserves_types_shapes_and_bytes(gen, tmp_path):
    tensors = sample_tensors(gen)
    path = tmp_path / "model.gguf"
    write_gguf(path, tensors)
    back = list(read_gguf(path))
    assert [t.name for t in back] == [t.name for t in tensors]
    for want, got in zip(tensors, back):
        assert got.type == want.type, want.name
        assert got.shape == want.shape, want.name
        assert got.data.dtype == want.data.dtype and got.data.shape == want.data.shape, want.name
        assert np.array_equal(_bytes(got.data), _bytes(want.data)), want.name
    # The dense types come back as their torch dtypes.
    kinds = {t.type: t.data.dtype for t in back}
    assert kinds["F16"] == torch.float16 and kinds["BF16"] == torch.bfloat16 and kinds["F32"] == torch.float32


def random_blocks(fmt, shape, gen):
    """Valid fmt blocks for `shape` (rows of whole blocks): tinykern's quantizer where the format
    has one, else random bytes (any bytes are a block; a round trip must keep them all)."""
    if fmt.quantize is not None:
        return fmt.quantize(torch.randn(shape, generator=gen))
    return torch.randint(0, 256, (*shape[:-1], fmt.row_bytes(shape[-1])), generator=gen, dtype=torch.uint8)


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_round_trips_byte_exact(name, gen, tmp_path):
    """Any FORMATS type is written, named by its GGML name, lower-case name or record, and read
    back packed with its record, the same bytes, and gguf-py's dequantization."""
    fmt = FORMATS[name]
    qtype = GGMLQuantizationType(fmt.ggml_type)
    shapes = {"upper": (3, 2 * fmt.block), "lower": (2, 2, fmt.block), "record": (4 * fmt.block,)}
    tensors = [GGUFTensor(f"w.{how}", {"upper": qtype.name, "lower": fmt.name, "record": fmt}[how], shape,
                          random_blocks(fmt, shape, gen)) for how, shape in shapes.items()]
    path = tmp_path / f"{name}.gguf"
    write_gguf(path, tensors)
    back = list(read_gguf(path))
    for want, got in zip(tensors, back):
        assert got.name == want.name and got.type == qtype.name and got.format is fmt, want.name
        assert got.shape == want.shape and got.rows_aligned and not got.reshaped, want.name
        assert got.data.dtype == torch.uint8 and got.data.shape == want.data.shape, want.name
        assert np.array_equal(_bytes(got.data), _bytes(want.data)), want.name
        expected = quants.dequantize(want.data.numpy(), qtype).reshape(want.shape)
        np.testing.assert_array_equal(got.dequantize().numpy().view(np.int32), expected.view(np.int32))


def test_unknown_type_name_is_refused(tmp_path):
    path = tmp_path / "bad.gguf"
    with pytest.raises(ValueError, match=r"bad\.gguf.*'w'.*unknown GGML type 'Q9_9'"):
        write_gguf(path, [GGUFTensor("w", "Q9_9", (1, 32), torch.zeros(1, 34, dtype=torch.uint8))])


@pytest.mark.parametrize("kind", ["Q4_K", "F32"])
def test_data_that_disagrees_with_the_shape_is_refused(kind, gen, tmp_path):
    if kind == "Q4_K":  # 12 rows of 6 blocks labelled as 24 rows of 3: the bytes count agrees
        bad = GGUFTensor("blk.0.w", kind, (24, 768), q4k.quantize(torch.randn(12, 1536, generator=gen)))
    else:
        bad = GGUFTensor("blk.0.w", kind, (4, 6), torch.randn(6, 4, generator=gen))
    path = tmp_path / "bad.gguf"
    with pytest.raises(ValueError, match=r"bad\.gguf.*'blk\.0\.w'.*needs data of shape"):
        write_gguf(path, [bad])


def test_write_from_a_dict_of_dense_tensors(gen, tmp_path):
    tensors = {
        "a": torch.randn(4, 6, generator=gen),
        "b": torch.randn(3, generator=gen).half(),
        "c": torch.randn(2, 2, generator=gen).bfloat16(),
        "d": torch.randn(2, 5, generator=gen).double(),  # other dtypes become F32
        "e": GGUFTensor("e", "Q8_0", (1, 32), q8_0.quantize(torch.randn(1, 32, generator=gen))),
    }
    path = tmp_path / "dense.gguf"
    write_gguf(str(path), tensors)
    back = {t.name: t for t in read_gguf(str(path))}
    assert {k: t.type for k, t in back.items()} == {"a": "F32", "b": "F16", "c": "BF16", "d": "F32", "e": "Q8_0"}
    for k in "abc":
        assert torch.equal(back[k].data, tensors[k])
    assert torch.equal(back["d"].data, tensors["d"].float())
    assert torch.equal(back["e"].data, tensors["e"].data)


@pytest.mark.parametrize("kind,source", [
    pytest.param("F16", torch.float32, id="F16-from-float32"),
    pytest.param("F32", torch.float16, id="F32-from-float16"),
    pytest.param("BF16", torch.float32, id="BF16-from-float32"),
    pytest.param("F16", torch.bfloat16, id="F16-from-bfloat16"),
])
def test_dense_tensor_is_converted_to_its_declared_type(kind, source, gen, tmp_path):
    """A GGUFTensor's data is "the dense tensor": write_gguf converts it to the declared type
    (an F16 tensor handed float32 data is stored as fp16 values, not reinterpreted bytes)."""
    data = torch.randn(4, 5, generator=gen).to(source)
    path = tmp_path / "converted.gguf"
    write_gguf(path, [GGUFTensor("w", kind, (4, 5), data)])
    (t,) = read_gguf(path)
    target = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16}[kind]
    assert t.type == kind and t.shape == (4, 5) and t.data.dtype == target
    assert torch.equal(t.data, data.to(target))


def test_file_written_by_gguf_package_loads_into_q4linear(gen, tmp_path):
    """GGUFWriter directly, raw Q4_K blocks. gguf cannot quantize Q4_K (only dequantize), so the
    blocks come from our quantizer, or from gguf when a newer version can."""
    w = torch.randn(24, 768, generator=gen)
    try:
        blocks = quants.quantize(w.numpy(), GGMLQuantizationType.Q4_K)
    except NotImplementedError:
        blocks = q4k.quantize(w).numpy()
    bias = torch.randn(24, generator=gen)
    path = tmp_path / "external.gguf"
    write_with_gguf(path, [("blk.0.ffn_up.weight", blocks, GGMLQuantizationType.Q4_K), ("blk.0.ffn_up.bias", bias.numpy(), None)])

    back = {t.name: t for t in read_gguf(path)}
    t = back["blk.0.ffn_up.weight"]
    assert t.type == "Q4_K" and t.shape == (24, 768) and t.data.shape == (24, 3 * 144)
    module = Q4Linear.from_packed(t.data, t.shape[-1], back["blk.0.ffn_up.bias"].data)
    dense = module.dequantize()
    expected = quants.dequantize(blocks, GGMLQuantizationType.Q4_K)
    np.testing.assert_array_equal(dense.numpy().view(np.int32), expected.view(np.int32))
    x = torch.randn(3, 768, generator=gen)
    with tinykern.backend("auto", exact=True):  # fp32 products: the default rounds x to int8 on CPU
        y = module(x)
    assert relative_error(y, F.linear(x, torch.from_numpy(expected), bias)) < 1e-5


def test_q8_0_written_by_gguf_package_loads_into_q8linear(gen, tmp_path):
    w = torch.randn(10, 320, generator=gen).numpy()
    blocks = quants.quantize(w, GGMLQuantizationType.Q8_0)
    path = tmp_path / "q8.gguf"
    write_with_gguf(path, [("w", blocks, GGMLQuantizationType.Q8_0)])
    (t,) = read_gguf(path)
    module = Q8Linear.from_packed(t.data, t.shape[-1])
    expected = quants.dequantize(blocks, GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(module.dequantize().numpy().view(np.int32), expected.view(np.int32))


def _raw(kind, rows, gen):
    """(array, raw type, logical shape) of `rows` rows of one block of GGML type `kind`, as
    gguf-py quantizes it or, for a type it cannot quantize, as random bytes: read_gguf reads
    either as raw bytes."""
    ggml_type = GGMLQuantizationType[kind]
    block, block_bytes = GGML_QUANT_SIZES[ggml_type]
    try:
        array = quants.quantize(torch.randn(rows, block, generator=gen).numpy(), ggml_type)
    except NotImplementedError:
        array = torch.randint(0, 256, (rows, block_bytes), generator=gen, dtype=torch.uint8).numpy()
    return array, ggml_type, (rows, block)


SD_NAME = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn1.to_out.0.weight"
OTHER_TOOLS = {  # case: (tensors as (name, array, raw type or None, shape read back), writer setup)
    "scalar": (lambda gen: [("logit_scale", np.array(4.5, np.float32), None, ()),
                            ("w", np.arange(6, dtype=np.float32).reshape(2, 3), None, (2, 3))], None),
    "zero-size": (lambda gen: [("a", np.ones(3, np.float16), None, (3,)), ("none", np.zeros((0, 4), np.float32), None, (0, 4)),
                               ("b", np.arange(5, dtype=np.float32), None, (5,))], None),
    "name-over-64": (lambda gen: [(SD_NAME, np.arange(4, dtype=np.float32), None, (4,))], None),
    "alignment-32": (lambda gen: [("a", np.ones(3, np.float32), None, (3,)), ("b", np.full((2, 2), 2, np.float16), None, (2, 2))],
                     lambda writer: writer.add_custom_alignment(32)),
    "tokenizer-vocab": (lambda gen: [("w", np.arange(3, dtype=np.float32), None, (3,))],
                        lambda writer: writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(50_000)])),
    "q4_0-and-q5_k": (lambda gen: [(kind, *_raw(kind, 3, gen)) for kind in ("Q4_0", "Q5_K")], None),
}


@pytest.mark.parametrize("case", OTHER_TOOLS)
def test_files_other_tools_write_are_read(case, gen, tmp_path):
    """What gguf-py (and so llama.cpp's converters) writes and llama.cpp reads: read_gguf gives
    every tensor with its shape and bytes; dense types as torch tensors, others as raw bytes."""
    make, setup = OTHER_TOOLS[case]
    tensors = make(gen)
    path = tmp_path / f"{case}.gguf"
    write_with_gguf(path, [(name, array, raw) for name, array, raw, _ in tensors], setup)
    back = list(read_gguf(path))
    assert [t.name for t in back] == [name for name, *_ in tensors]
    for t, (name, array, raw, shape) in zip(back, tensors):
        assert t.shape == shape and t.data.dtype == (torch.uint8 if raw else torch.from_numpy(array).dtype), name
        assert t.type == (raw.name if raw else {np.float32: "F32", np.float16: "F16"}[array.dtype.type]), name
        assert tuple(t.data.shape) == (array.shape if raw else shape), name
        assert _bytes(t.data).tobytes() == array.tobytes(), name


def test_garbage_file_names_the_file(gen, tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(torch.randint(0, 256, (2048,), generator=gen, dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match=str(path)):
        list(read_gguf(path))
    # Right magic, nonsense after it.
    path.write_bytes(b"GGUF" + torch.randint(0, 256, (2048,), generator=gen, dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match=str(path)):
        list(read_gguf(path))
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=str(path)):
        list(read_gguf(path))


def test_truncated_file_names_the_file(gen, tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path, sample_tensors(gen))
    raw = path.read_bytes()
    cut_path = tmp_path / "cut.gguf"
    for cut in (3, 20, 200, len(raw) // 2, len(raw) - 10, len(raw) - 1):
        cut_path.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match=str(cut_path)):
            list(read_gguf(cut_path))


def every_value_type(writer):
    """Metadata of every GGUF value type, arrays of numbers, of strings and of arrays among them."""
    for kind, value in [(GGUFValueType.UINT8, 200), (GGUFValueType.INT8, -3), (GGUFValueType.UINT16, 60000),
                        (GGUFValueType.INT16, -300), (GGUFValueType.UINT32, 70000), (GGUFValueType.INT32, -70000),
                        (GGUFValueType.FLOAT32, 0.5), (GGUFValueType.BOOL, True), (GGUFValueType.STRING, "text"),
                        (GGUFValueType.UINT64, 1 << 40), (GGUFValueType.INT64, -(1 << 40)), (GGUFValueType.FLOAT64, 0.25)]:
        writer.add_key_value(f"test.{kind.name.lower()}", value, kind)
    writer.add_array("test.floats", [0.5, 1.5, 2.5])
    writer.add_array("test.words", ["a", "bc", ""])
    writer.add_array("test.nested", [[1, 2], [3]])


def test_metadata_of_every_value_type_is_read_exactly(gen, tmp_path):
    """Every value comes back as the Python value written (one wrong size would also misplace
    every tensor)."""
    w = torch.randn(3, 5, generator=gen)
    path = tmp_path / "metadata.gguf"
    write_with_gguf(path, [("w", w.numpy(), None)], every_value_type)
    tensors = read_gguf(path)
    meta = tensors.metadata
    assert {k: v for k, v in meta.items() if k.startswith("test.")} == {
        "test.uint8": 200, "test.int8": -3, "test.uint16": 60000, "test.int16": -300, "test.uint32": 70000,
        "test.int32": -70000, "test.float32": 0.5, "test.bool": True, "test.string": "text", "test.uint64": 1 << 40,
        "test.int64": -(1 << 40), "test.float64": 0.25, "test.floats": [0.5, 1.5, 2.5], "test.words": ["a", "bc", ""],
        "test.nested": [[1, 2], [3]],
    }
    assert meta["general.architecture"] == "llama" and type(meta["test.bool"]) is bool
    (t,) = tensors
    assert t.name == "w" and torch.equal(t.data, w)


def test_metadata_string_not_utf8_is_kept_as_bytes(tmp_path):
    path = tmp_path / "latin1.gguf"
    write_with_gguf(path, [("w", np.ones(2, np.float32), None)],
                    lambda writer: writer.add_key_value("test.name", "caf\xe9".encode("latin-1"), GGUFValueType.STRING))
    assert read_gguf(path).metadata["test.name"] == b"caf\xe9"


def test_metadata_arrays_are_bounded(monkeypatch, tmp_path):
    """Arrays become Python lists, so their items in all are bounded before any is read."""
    import tinykern.io.gguf as reader

    path = tmp_path / "vocab.gguf"
    write_with_gguf(path, [("w", np.ones(2, np.float32), None)],
                    lambda writer: (writer.add_array("a", list(range(60))), writer.add_array("b", ["x"] * 50)))
    monkeypatch.setattr(reader, "_MAX_ARRAY_ITEMS", 110)
    assert len(read_gguf(path).metadata["b"]) == 50
    monkeypatch.setattr(reader, "_MAX_ARRAY_ITEMS", 100)
    with pytest.raises(ValueError, match=rf"{path}: metadata 'b': metadata arrays of more than 100 items"):
        read_gguf(path)


def test_gguf_file_is_an_iterator_that_closes_its_file(gen, tmp_path):
    path = tmp_path / "model.gguf"
    tensors = sample_tensors(gen)
    write_gguf(path, tensors)
    f = open_gguf(path)
    assert len(f) == len(tensors) and f.names == [t.name for t in tensors] and f.path == str(path)
    assert next(f).name == tensors[0].name
    f.close()
    assert list(f) == []
    with open_gguf(path) as f:
        assert [t.name for t in f] == [t.name for t in tensors]
        assert list(f) == []  # one pass, as the generator read_gguf returned before


@pytest.mark.parametrize("alignment,valid", [(4, False), (8, True), (256, True)])
def test_alignment_must_be_a_power_of_two_of_at_least_8(alignment, valid, gen, tmp_path):
    w = torch.randn(2, 3, generator=gen)
    path = tmp_path / f"aligned-{alignment}.gguf"
    write_with_gguf(path, [("a", w[0].numpy(), None), ("b", w.numpy(), None)], lambda writer: writer.add_custom_alignment(alignment))
    if valid:
        assert torch.equal({t.name: t for t in read_gguf(path)}["b"].data, w)
    else:
        with pytest.raises(ValueError, match=rf"{path}: metadata 'general.alignment' must be .* got {alignment}"):
            read_gguf(path)


def test_whole_header_is_checked_before_anything_is_read(gen, tmp_path):
    """A bad last tensor is refused by read_gguf itself, before the first tensor is yielded; a
    path that cannot be opened raises OSError at the call too."""
    path = tmp_path / "model.gguf"
    write_gguf(path, sample_tensors(gen))
    raw = bytearray(path.read_bytes())
    reader = GGUFReader(path)
    last, offset = reader.tensors[-1].name, reader.tensors[-1].field.parts[-1]
    at = offset.ctypes.data - reader.data.ctypes.data
    raw[at:at + 8] = (int(offset[0]) + 1).to_bytes(8, "little")
    del reader, offset
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=rf"{path}: tensor '{last}'"):
        read_gguf(path)
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "missing.gguf")


def test_last_tensor_needs_no_padding_after_it(gen, tmp_path):
    """Writers pad after the last tensor, but llama.cpp reads it without: so do we."""
    tensors = sample_tensors(gen)
    path = tmp_path / "model.gguf"
    write_gguf(path, tensors)
    last = GGUFReader(path).tensors[-1]
    with open(path, "r+b") as f:
        f.truncate(int(last.data_offset) + int(last.n_bytes))
    assert torch.equal(list(read_gguf(path))[-1].data, tensors[-1].data)
