"""GGUF files as other Stable Diffusion tools write them: ComfyUI-GGUF's reshaped tensors (a
tensor whose rows are not whole 256-element blocks stored as [n/256, 256], its true shape in
`comfy.gguf.orig_shape.<name>`), and stable-diffusion.cpp's whole-model files. Quantized bytes
come from libggml's C reference quantizers, for every format in FORMATS."""

import math

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

from conftest import ggml_reference_quantize

from tinykern.formats import FORMATS
from tinykern.io import GGUFTensor, open_gguf, read_gguf, write_gguf

ORIG = "comfy.gguf.orig_shape."


def ggml_quantize(fmt, w):
    """w float32 [..., K] (K whole blocks) as libggml's reference quantizer packs it (numpy)."""
    return ggml_reference_quantize(fmt, w).numpy()


def write_file(path, tensors, arch="sd1", metadata=()):
    """A file as gguf-py's GGUFWriter writes it: tensors as (name, array, raw type or None);
    metadata as (key, list) through add_array or (key, (value, type[, item type])) through
    add_key_value."""
    writer = GGUFWriter(str(path), arch)
    for key, value in metadata:
        if isinstance(value, tuple):  # (value, type[, array item type])
            writer.add_key_value(key, *value)
        else:
            writer.add_array(key, value)
    for name, array, raw in tensors:
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def comfy_tensor(name, w, fmt):
    """(tensor, metadata) as ComfyUI-GGUF stores w: reshaped to (n/256, 256) with its shape
    recorded when its rows are not whole 256-blocks (convert.py's rule), then quantized by
    ggml (fmt a Format) or kept dense (fmt a GGMLQuantizationType: F16/F32)."""
    array, metadata = w.numpy(), []
    n = array.size
    if array.ndim > 1 and n % 256 == 0 and array.shape[-1] % 256:
        metadata.append((ORIG + name, [int(d) for d in array.shape]))  # ints: an INT32 array
        array = array.reshape(n // 256, 256)
    if isinstance(fmt, GGMLQuantizationType):
        return (name, array.astype(np.float16 if fmt == GGMLQuantizationType.F16 else np.float32), None), metadata
    return (name, ggml_quantize(fmt, array), GGMLQuantizationType(fmt.ggml_type)), metadata


def sd_like(fmt, gen):
    """{name: (float weights, type)}: an SD UNet's kinds of tensor, quantized ones in fmt."""
    F16, F32 = GGMLQuantizationType.F16, GGMLQuantizationType.F32
    return {
        "input_blocks.1.1.proj_in.weight": (torch.randn(320, 1280, generator=gen), fmt),  # rows of whole blocks
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (torch.randn(256, 320, generator=gen), fmt),
        "input_blocks.1.0.in_layers.2.weight": (torch.randn(320, 4, 3, 3, generator=gen), fmt),
        "input_blocks.1.0.in_layers.0.weight": (torch.randn(320, generator=gen), F32),
        "time_embed.0.weight": (torch.randn(1280, 320, generator=gen), F16),  # reshaped, dense
        "out.2.weight": (torch.randn(4, 320, 3, 3, generator=gen), F16),  # 11520 elements: reshaped too
    }


@pytest.mark.parametrize("name", list(FORMATS))
def test_comfy_reshaped_file_reads_with_logical_shapes(name, gen, tmp_path):
    fmt = FORMATS[name]
    weights = sd_like(fmt, gen)
    tensors, metadata = [], []
    for key, (w, kind) in weights.items():
        tensor, meta = comfy_tensor(key, w, kind)
        tensors.append(tensor)
        metadata += meta
    path = tmp_path / f"comfy-{name}.gguf"
    write_file(path, tensors, metadata=metadata)
    stored = {n: a for n, a, _ in tensors}
    recorded = {key[len(ORIG):] for key, _ in metadata}
    assert {"input_blocks.1.0.in_layers.2.weight", "time_embed.0.weight", "out.2.weight"} <= recorded

    with open_gguf(path) as f:
        assert f.metadata["general.architecture"] == "sd1"
        assert f.metadata[ORIG + "out.2.weight"] == [4, 320, 3, 3]
        assert f.names == list(weights) and len(f) == len(weights)
        back = {t.name: t for t in f}
    for key, (w, kind) in weights.items():
        t, raw = back[key], stored[key]
        assert t.shape == tuple(w.shape), key
        assert t.reshaped == (key in recorded), key
        assert t.stored_shape == ((w.numel() // 256, 256) if key in recorded else None), key
        if kind is fmt:
            qtype = GGMLQuantizationType(fmt.ggml_type)
            assert t.type == qtype.name and t.format is fmt and t.data.dtype == torch.uint8, key
            assert t.rows_aligned == (w.shape[-1] % fmt.block == 0), key
            rows = tuple(w.shape) if t.rows_aligned else t.stored_shape
            assert tuple(t.data.shape) == (*rows[:-1], rows[-1] // fmt.block * fmt.block_bytes), key
            assert t.data.numpy().tobytes() == raw.tobytes(), key
            expected = quants.dequantize(raw, qtype).reshape(w.shape)
        else:
            assert t.format is None and t.rows_aligned and t.data.shape == w.shape, key
            expected = raw.astype(np.float32).reshape(w.shape)
        got = t.dequantize()
        assert got.dtype == torch.float32 and got.shape == w.shape, key
        np.testing.assert_array_equal(got.numpy().view(np.int32), expected.view(np.int32), err_msg=key)
    # The Linear [320, 1280] is never reshaped and always aligned; the conv never aligned.
    assert not back["input_blocks.1.1.proj_in.weight"].reshaped
    assert not back["input_blocks.1.0.in_layers.2.weight"].rows_aligned
    to_k = back["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]
    assert to_k.reshaped and to_k.stored_shape == (320, 256) and to_k.rows_aligned == (fmt.block != 256)


@pytest.mark.parametrize("name", list(FORMATS))
def test_comfy_reshaped_tensors_round_trip_through_write_gguf(name, gen, tmp_path):
    """write_gguf stores a reshaped tensor as ComfyUI-GGUF does: same bytes, same key (INT32)."""
    fmt = FORMATS[name]
    tensors, metadata = [], []
    for key, (w, kind) in sd_like(fmt, gen).items():
        tensor, meta = comfy_tensor(key, w, kind)
        tensors.append(tensor)
        metadata += meta
    first, second = tmp_path / "first.gguf", tmp_path / "second.gguf"
    write_file(first, tensors, metadata=metadata)
    write_gguf(second, list(read_gguf(first)), arch="sd1")
    a, b = GGUFReader(first), GGUFReader(second)
    assert [(t.name, t.tensor_type, list(t.shape), t.data.tobytes()) for t in a.tensors] == \
           [(t.name, t.tensor_type, list(t.shape), t.data.tobytes()) for t in b.tensors]
    for key, _ in metadata:
        field = b.get_field(key)
        assert field.types == [GGUFValueType.ARRAY, GGUFValueType.INT32], key
        assert [int(field.parts[i][0]) for i in field.data] == [int(field.parts[i][0]) for i in a.get_field(key).data]


BAD_ORIG_SHAPES = {  # case: metadata value written for a [45, 256] tensor (11520 elements)
    "wrong-count": [320, 4, 3, 4],
    "negative": [-320, 4, 3, -3],
    "floats": [320.0, 4.0, 3.0, 3.0],
    "strings": ["320", "4", "3", "3"],
    "scalar": (11520, GGUFValueType.INT32),
    "nested": [[320, 4], [3, 3]],
    "too-many-dims": [1] * 9 + [11520],
    # no elements, as the tensor (then cut to none), but too many to count
    "past-int64": ([0, 1 << 62, 1 << 62], GGUFValueType.ARRAY, GGUFValueType.INT64),
}


@pytest.mark.parametrize("case", BAD_ORIG_SHAPES)
def test_malformed_orig_shape_is_refused_naming_file_and_tensor(case, gen, tmp_path):
    name = "input_blocks.1.0.in_layers.2.weight"
    array = torch.randn(45, 256, generator=gen).numpy().astype(np.float16)
    if case == "past-int64":
        array = array[:0]
    path = tmp_path / f"bad-{case}.gguf"
    write_file(path, [("ok", np.ones(4, np.float32), None), (name, array, None)],
               metadata=[(ORIG + name, BAD_ORIG_SHAPES[case])])
    with pytest.raises(ValueError, match=rf"{path}: tensor '{name}': metadata '{ORIG}{name}'"):
        read_gguf(path)


def test_orig_shape_of_no_tensor_is_plain_metadata(tmp_path):
    path = tmp_path / "stray.gguf"
    write_file(path, [("w", np.ones((2, 256), np.float32), None)], metadata=[(ORIG + "gone", [1, 2])])
    f = open_gguf(path)
    assert f.metadata[ORIG + "gone"] == [1, 2]
    (t,) = f
    assert t.shape == (2, 256) and not t.reshaped


PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")


@pytest.mark.parametrize("name", list(FORMATS))
def test_stable_diffusion_cpp_whole_model_file(name, gen, tmp_path):
    """sd.cpp writes every part of the model in one file, and quantizes 1-D tensors too when
    their length is whole blocks: each reads with its name, shape and format."""
    fmt = FORMATS[name]
    qtype = GGMLQuantizationType(fmt.ggml_type)
    made = {}
    for prefix in PREFIXES:
        made[prefix + "a.weight"] = (torch.randn(64, 512, generator=gen), fmt)
        made[prefix + "a.bias"] = (torch.randn(512, generator=gen), fmt)  # 1-D, quantized
        made[prefix + "norm.weight"] = (torch.randn(320, generator=gen), None)
    tensors = [(n, ggml_quantize(fmt, w.numpy()), qtype) if kind else (n, w.numpy(), None)
               for n, (w, kind) in made.items()]
    path = tmp_path / f"sdcpp-{name}.gguf"
    write_file(path, tensors, arch="stable-diffusion")
    back = {t.name: t for t in read_gguf(path)}
    assert list(back) == list(made)
    for (n, array, raw), (w, kind) in zip(tensors, made.values()):
        t = back[n]
        assert t.shape == tuple(w.shape) and not t.reshaped and t.rows_aligned, n
        assert t.format is (fmt if kind else None), n
        assert t.data.numpy().tobytes() == array.tobytes(), n
        expected = quants.dequantize(array, raw).reshape(w.shape) if raw else array
        np.testing.assert_array_equal(t.dequantize().numpy().view(np.int32), expected.view(np.int32), err_msg=n)


def test_a_type_tinykern_cannot_run_reads_as_raw_bytes_and_dequantizes_via_gguf(gen, tmp_path):
    """IQ4_NL: not in FORMATS; bytes as the file has them, dequantize() through gguf-py."""
    qtype = GGMLQuantizationType.IQ4_NL
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = torch.randint(0, 256, (3, 2 * block_bytes), generator=gen, dtype=torch.uint8).numpy()
    raw.reshape(-1, block_bytes)[:, :2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)  # finite scales
    path = tmp_path / "iq.gguf"
    write_file(path, [("w", raw, qtype)])
    (t,) = read_gguf(path)
    assert t.type == "IQ4_NL" and t.format is None and t.shape == (3, 2 * block) and t.rows_aligned
    assert t.data.numpy().tobytes() == raw.tobytes()
    np.testing.assert_array_equal(t.dequantize().numpy(), quants.dequantize(raw, qtype))
    assert math.prod(t.dequantize().shape) == 3 * 2 * block


def test_orig_shape_of_any_integer_type_is_honoured(gen, tmp_path):
    """ComfyUI-GGUF writes INT32; a wider integer array says the same shape."""
    w = torch.randn(8, 4, 3, 3, generator=gen).half()
    path = tmp_path / "int64.gguf"
    write_file(path, [("conv", w.numpy().reshape(1, 288), None)],
               metadata=[(ORIG + "conv", ([8, 4, 3, 3], GGUFValueType.ARRAY, GGUFValueType.UINT64))])
    (t,) = read_gguf(path)
    assert t.shape == (8, 4, 3, 3) and t.stored_shape == (1, 288) and torch.equal(t.data, w)


def test_write_keeps_a_stored_shape_and_refuses_one_that_does_not_hold_the_tensor(gen, tmp_path):
    fmt = FORMATS["q8_0"]
    blocks = fmt.quantize(torch.randn(6, 32, generator=gen))  # 6 blocks
    path = tmp_path / "bad.gguf"
    with pytest.raises(ValueError, match=r"bad\.gguf: tensor 'w': stored shape \[5, 32\] does not hold"):
        write_gguf(path, [GGUFTensor("w", "Q8_0", (6, 32), blocks, stored_shape=(5, 32))])
    # Rows of 1 are no whole blocks: the data is laid out by the stored shape.
    write_gguf(path, [GGUFTensor("w", "Q8_0", (2, 96, 1), blocks, stored_shape=(6, 32))])
    (t,) = read_gguf(path)
    assert t.shape == (2, 96, 1) and t.stored_shape == (6, 32) and not t.rows_aligned and torch.equal(t.data, blocks)
    assert torch.equal(t.dequantize(), fmt.dequantize(blocks).reshape(2, 96, 1))
