"""save_quantized / load_quantized: bit-identical round trips, and damaged files refused with a
message that names the file and the tensor. Every file lives under tmp_path."""

import io
import json
import os
import stat
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tinykern import Q4Conv2d, Q4Linear, Q8Linear, QuantConfig, load_quantized, quantize_, save_quantized, serialization
from tinykern.quantize import quantized_modules


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 24, 3, padding=1)  # Q4Conv2d, row 144
        self.grouped = nn.Conv2d(24, 32, 3, stride=2, padding=1, groups=2)  # Q4Conv2d, row 108
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)  # stays dense
        self.norm = nn.LayerNorm(320)
        self.proj = nn.Linear(320, 40)  # Q4Linear, padded rows
        self.gate = nn.Linear(320, 24, bias=False)  # Q8Linear by override
        self.out = nn.Linear(64, 8)  # stays dense (min_features)

    def forward(self, img, vec):
        h = self.dw(self.grouped(torch.relu(self.conv(img))))
        v = self.norm(vec)
        z = torch.cat((self.proj(v), self.gate(v)), dim=-1)
        return h.mean((2, 3)) + self.out(z)[:, :1], z


CONFIG = QuantConfig(overrides={"gate": "q8_0"}, min_features=100)


def make_quantized(gen, dtype=torch.float32):
    model = Net()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5 if p.dim() > 1 else 4))
    model = model.to(dtype)
    report = quantize_(model, CONFIG)
    assert sum(r.format != "dense" for r in report) == 4
    return model


def inputs(gen, dtype=torch.float32):
    return torch.randn(2, 16, 9, 9, generator=gen).to(dtype), torch.randn(2, 320, generator=gen).to(dtype)


def header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n])


def test_round_trip_into_meta_model_is_bit_identical(gen, tmp_path):
    model = make_quantized(gen)
    path = tmp_path / "model.safetensors"
    save_quantized(model, path)
    with torch.device("meta"):
        fresh = Net()
    loaded = load_quantized(fresh, path)
    assert loaded is fresh
    assert type(fresh.conv) is Q4Conv2d and type(fresh.grouped) is Q4Conv2d and type(fresh.proj) is Q4Linear
    assert type(fresh.gate) is Q8Linear and type(fresh.dw) is nn.Conv2d and type(fresh.out) is nn.Linear
    assert fresh.grouped.groups == 2 and fresh.grouped.stride == (2, 2) and fresh.gate.bias is None
    state, loaded_state = model.state_dict(), fresh.state_dict()
    assert state.keys() == loaded_state.keys()
    for key, value in state.items():
        assert not loaded_state[key].is_meta, key
        assert loaded_state[key].dtype == value.dtype and torch.equal(loaded_state[key], value), key
    img, vec = inputs(gen)
    with torch.no_grad():
        for a, b in zip(model(img, vec), fresh(img, vec)):
            assert torch.equal(a, b)


def test_round_trip_into_dense_model_and_str_path(gen, tmp_path):
    model = make_quantized(gen)
    path = tmp_path / "m.safetensors"
    save_quantized(model, str(path))
    fresh = Net()  # real, full-precision: its quantizable layers are replaced
    load_quantized(fresh, str(path))
    img, vec = inputs(gen)
    with torch.no_grad():
        for a, b in zip(model(img, vec), fresh(img, vec)):
            assert torch.equal(a, b)


def test_fp16_model_keeps_its_dtypes(gen, tmp_path):
    model = make_quantized(gen, torch.float16)
    assert model.proj.bias.dtype == torch.float16
    path = tmp_path / "half.safetensors"
    save_quantized(model, path)
    with torch.device("meta"):
        fresh = Net().half()
    load_quantized(fresh, path)
    assert fresh.proj.bias.dtype == torch.float16 and fresh.conv.bias.dtype == torch.float16
    assert fresh.norm.weight.dtype == torch.float16
    img, vec = inputs(gen, torch.float16)
    with torch.no_grad():
        for a, b in zip(model(img, vec), fresh(img, vec)):
            assert torch.equal(a, b)


def data_cut_points(path):
    """(cut offset, tensor holding that byte) for the first, a middle and the last tensor."""
    n, head = header(path)
    spans = sorted((info["data_offsets"][0], info["data_offsets"][1], key) for key, info in head.items() if key != "__metadata__")
    picks = [spans[0], spans[len(spans) // 2], spans[-1]]
    return [(8 + n + (begin + end) // 2, key) for begin, end, key in picks] + [(8 + n + spans[-1][1] - 1, spans[-1][2])]


def test_truncated_file_names_file_and_tensor(gen, tmp_path):
    model = make_quantized(gen)
    path = tmp_path / "model.safetensors"
    save_quantized(model, path)
    raw = path.read_bytes()
    n, _ = header(path)
    cut_path = tmp_path / "cut.safetensors"
    # Inside the length prefix and inside the JSON header: the file is named.
    for cut in (0, 5, 8 + n // 2, 8 + n - 1):
        cut_path.write_bytes(raw[:cut])
        with torch.device("meta"):
            fresh = Net()
        with pytest.raises(ValueError, match=str(cut_path)):
            load_quantized(fresh, cut_path)
    # Inside tensor data: the file and the tensor the cut falls in are named.
    for cut, key in data_cut_points(path):
        cut_path.write_bytes(raw[:cut])
        with torch.device("meta"):
            fresh = Net()
        with pytest.raises(ValueError) as info:
            load_quantized(fresh, cut_path)
        assert str(cut_path) in str(info.value)
        assert repr(key) in str(info.value) or key in str(info.value), (cut, key, str(info.value))


@pytest.mark.parametrize("which", ["proj.qweight", "gate.qweight", "conv.bias", "norm.weight"])
def test_flipped_byte_names_the_tensor(which, gen, tmp_path):
    model = make_quantized(gen)
    path = tmp_path / "model.safetensors"
    save_quantized(model, path)
    n, head = header(path)
    begin, end = head[which]["data_offsets"]
    raw = bytearray(path.read_bytes())
    raw[8 + n + (begin + end) // 2] ^= 0x10  # one bit in the middle of the tensor
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    with torch.device("meta"):
        fresh = Net()
    with pytest.raises(ValueError, match="checksum") as info:
        load_quantized(fresh, bad)
    assert which in str(info.value) and str(bad) in str(info.value)


def test_not_a_tinykern_file(gen, tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"proj.weight": torch.randn(40, 320, generator=gen)}, str(path))
    with pytest.raises(ValueError, match="tinykern") as info:
        load_quantized(Net(), path)
    assert str(path) in str(info.value)


def test_garbage_and_empty_files(gen, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match=str(garbage)):
        load_quantized(Net(), garbage)
    # A plausible length prefix followed by bytes that are not JSON.
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(struct.pack("<Q", 16) + b"\xff" * 16 + b"\x00" * 64)
    with pytest.raises(ValueError, match=str(bogus)):
        load_quantized(Net(), bogus)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=str(empty)):
        load_quantized(Net(), empty)


def test_model_that_does_not_fit(gen, tmp_path):
    model = make_quantized(gen)
    path = tmp_path / "model.safetensors"
    save_quantized(model, path)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(320, 40)

    with pytest.raises(ValueError, match=str(path)):
        load_quantized(Other(), path)


def test_model_that_fits_all_but_one_tensor_is_left_as_it_was(gen, tmp_path):
    path = tmp_path / "model.safetensors"
    save_quantized(make_quantized(gen), path)
    model = Net()
    model.out = nn.Linear(64, 9)  # every quantized module has its place, one dense tensor misfits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.safetensors.*out\.weight: file \[8, 64\] vs model \[9, 64\]"):
        load_quantized(model, path)
    assert type(model.proj) is nn.Linear and type(model.conv) is nn.Conv2d
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_save_writes_only_the_given_path(gen, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = make_quantized(gen)
    target = tmp_path / "sub"
    target.mkdir()
    save_quantized(model, target / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]
    assert [p.name for p in target.iterdir()] == ["m.safetensors"]


# ---------------------------------------------------------------------------------------------
# Edited files: dtypes, shapes and specs are checksummed and checked against the model


def rewrite(path, out, edit):
    """Write `out`: `path` with its header JSON passed through `edit(header)`, its data as it was."""
    raw = path.read_bytes()
    n, head = header(path)
    edit(head)
    blob = json.dumps(head).encode()
    out.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    return out


def edit_metadata(key, edit, forge=False):
    """A header edit that passes metadata[key], parsed, through `edit`; with forge=True the
    metadata checksum is recomputed, as a forger would."""
    def apply(head):
        meta = head["__metadata__"]
        meta[key] = json.dumps(edit(json.loads(meta[key])))
        if forge:
            meta["tinykern.checksum"] = serialization._metadata_checksum(
                meta["tinykern.version"], meta["tinykern.modules"], meta["tinykern.tensors"])
    return apply


def fingerprint(model):
    """Every module, parameter and buffer object of `model` by name, with device, dtype and value."""
    tensors = {**dict(model.named_parameters(remove_duplicate=False)),
               **dict(model.named_buffers(remove_duplicate=False))}
    return (dict(model.named_modules(remove_duplicate=False)),
            {k: (t, t.device, t.dtype, None if t.is_meta else t.detach().clone()) for k, t in tensors.items()})


def assert_unchanged(model, before):
    modules, tensors = fingerprint(model)
    assert modules.keys() == before[0].keys() and all(modules[k] is m for k, m in before[0].items())
    assert tensors.keys() == before[1].keys()
    for key, (t, device, dtype, value) in before[1].items():
        now = tensors[key][0]
        assert now is t and now.device == device and now.dtype == dtype, key
        assert value is None or torch.equal(now, value), key
    model.state_dict()  # no module has become its own child


def fresh_model(where):
    with torch.device(where):
        return Net()


def assert_refused(path, where, match=None):
    model = fresh_model(where)
    before = fingerprint(model)
    with pytest.raises(ValueError, match=match) as info:
        load_quantized(model, path)
    assert str(path) in str(info.value)
    assert_unchanged(model, before)
    return str(info.value)


@pytest.fixture(scope="module")
def quantized():
    """One quantized Net and its file's bytes for the tests below, which only read them."""
    model = make_quantized(torch.Generator().manual_seed(4321))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        save_quantized(model, path)
        return model, path.read_bytes()


@pytest.fixture
def saved(quantized, tmp_path):
    model, data = quantized
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    return model, path


@pytest.mark.parametrize("key,dtype,shape", [
    ("proj.bias", "I32", None), ("conv.qweight", "I8", None),
    ("norm.weight", "F16", [320]), ("proj.qweight", None, "swap"),
])
def test_relabelled_dtype_or_shape_is_refused(key, dtype, shape, saved, tmp_path):
    _, path = saved

    def edit(head):
        entry = head[key]
        if dtype is not None:
            entry["dtype"] = dtype
        if shape == "swap":
            entry["shape"] = entry["shape"][::-1]
        elif shape is not None:  # a narrower dtype over the same bytes holds more elements
            entry["shape"] = [n * 2 for n in shape]
    bad = rewrite(path, tmp_path / "relabelled.safetensors", edit)
    for where in ("meta", "cpu"):
        message = assert_refused(bad, where, match="the file was altered")
        assert repr(key) in message


def test_fp16_bias_relabelled_bf16_is_refused(gen, tmp_path):
    path = tmp_path / "half.safetensors"
    save_quantized(make_quantized(gen, torch.float16), path)
    bad = rewrite(path, tmp_path / "bf16.safetensors", lambda head: head["proj.bias"].update(dtype="BF16"))
    assert "'proj.bias'" in assert_refused(bad, "meta", match="bfloat16 .* in the header but was saved as 'float16'")


@pytest.mark.parametrize("forge", [False, True], ids=["checksum", "forged-checksum"])
@pytest.mark.parametrize("field,value", [("kernel_size", [1, 1]), ("dilation", [2, 2]), ("padding", [0, 0]),
                                         ("stride", [3, 3]), ("groups", 4), ("bias", False)])
def test_edited_conv_spec_is_refused(field, value, forge, saved, tmp_path):
    _, path = saved

    def change(specs):
        specs["grouped"][field] = value
        if field == "bias":
            del specs["grouped"]["bias_dtype"]
        return specs
    bad = rewrite(path, tmp_path / "spec.safetensors", edit_metadata("tinykern.modules", change, forge))
    for where in ("meta", "cpu"):
        message = assert_refused(bad, where)
        assert ("'grouped'" in message and field in message) if forge else "checksum" in message


def test_a_spec_must_replace_a_layer_of_its_kind(saved, tmp_path):
    _, path = saved
    cases = {"": "proj", "norm": "proj", "nowhere": "proj", "dw.weight": "proj", "conv": "proj", "proj": "conv"}
    for name, source in cases.items():
        def move(specs):
            specs[name] = specs.pop(source)
            return specs
        bad = rewrite(path, tmp_path / "moved.safetensors", edit_metadata("tinykern.modules", move, forge=True))
        for where in ("meta", "cpu"):
            assert f"quantized module {name!r}" in assert_refused(bad, where), name


def test_conv_with_another_padding_mode_is_not_replaced(saved):
    _, path = saved
    model = Net()
    model.conv.padding_mode = "reflect"
    before = fingerprint(model)
    with pytest.raises(ValueError, match="'conv' does not match.*padding_mode"):
        load_quantized(model, path)
    assert_unchanged(model, before)


def test_conv_with_padding_same_takes_its_numeric_spec(saved):
    _, path = saved
    model = Net()
    model.conv = nn.Conv2d(16, 24, 3, padding="same")  # the saved conv has padding=1
    load_quantized(model, path)
    assert type(model.conv) is Q4Conv2d and model.conv.padding == (1, 1)


def forged(key, edit):
    return edit_metadata(key, edit, forge=True)


def spec_set(name, **fields):
    return forged("tinykern.modules", lambda specs: {**specs, name: {**specs[name], **fields}})


MALFORMED = {
    "header is a list": lambda head: [head],
    "header is null": lambda head: None,
    "__metadata__ is null": lambda head: head.update(__metadata__=None),
    "__metadata__ is a list": lambda head: head.update(__metadata__=[1]),
    "metadata value not a string": lambda head: head["__metadata__"].update({"tinykern.modules": {}}),
    "data_offsets missing": lambda head: head["conv.bias"].pop("data_offsets"),
    "data_offsets a string": lambda head: head["conv.bias"].update(data_offsets="0,96"),
    "data_offsets reversed": lambda head: head["conv.bias"].update(data_offsets=[96, 0]),
    "data_offsets negative": lambda head: head["conv.bias"].update(data_offsets=[-8, 88]),
    "data_offsets short": lambda head: head["conv.bias"].update(data_offsets=[0]),
    "tensor entry a number": lambda head: head.update({"conv.bias": 3}),
    "version missing": lambda head: head["__metadata__"].pop("tinykern.version"),
    "version from the future": lambda head: head["__metadata__"].update({"tinykern.version": "3"}),
    "checksum missing": lambda head: head["__metadata__"].pop("tinykern.checksum"),
    "specs a list": forged("tinykern.modules", lambda specs: list(specs)),
    "specs null": forged("tinykern.modules", lambda specs: None),
    "spec a string": forged("tinykern.modules", lambda specs: {**specs, "proj": "Q4Linear"}),
    "spec type a list": spec_set("proj", type=[]),
    "spec type unknown": spec_set("proj", type="Linear"),
    "spec key extra": spec_set("proj", rank=4),
    "spec key missing": forged("tinykern.modules", lambda specs: {**specs, "proj": {"type": "Q4Linear"}}),
    "spec value a float": spec_set("proj", in_features=320.0),
    "spec value a bool": spec_set("gate", out_features=True),
    "spec pair of three": spec_set("conv", stride=[1, 1, 1]),
    "bias_dtype not a dtype": spec_set("proj", bias_dtype="load"),
    "records a list": forged("tinykern.tensors", lambda records: [records]),
    "record missing": forged("tinykern.tensors", lambda records: {k: records[k] for k in list(records)[1:]}),
    "record without crc": forged("tinykern.tensors",
                                 lambda records: {**records, "conv.bias": {"dtype": "float32", "shape": [24]}}),
    "record shape a string": forged("tinykern.tensors",
                                    lambda records: {**records, "proj.bias": {**records["proj.bias"], "shape": "40"}}),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_header_or_metadata_is_a_value_error_naming_the_file(case, saved, tmp_path):
    _, path = saved

    def edit(head):
        replaced = MALFORMED[case](head)
        return head if replaced is None and case != "header is null" else replaced
    raw, (n, head) = path.read_bytes(), header(path)
    blob = json.dumps(edit(head)).encode()
    bad = tmp_path / "malformed.safetensors"
    bad.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    for where in ("meta", "cpu"):
        assert_refused(bad, where)


def test_file_from_an_older_tinykern_is_refused_with_advice(saved, tmp_path):
    model, _ = saved
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    old = tmp_path / "old.safetensors"
    modules = {name: serialization._spec(m) for name, m in quantized_modules(model)}
    checksums = {k: serialization._crc32(v) for k, v in tensors.items()}
    save_file(tensors, str(old), metadata={"format": "pt", "tinykern.modules": json.dumps(modules),
                                           "tinykern.crc32": json.dumps(checksums)})
    assert_refused(old, "meta", match="older tinykern.*re-save")


@pytest.mark.parametrize("where", ["meta", "cpu"])
def test_load_failing_midway_restores_every_parameter_and_buffer(where, saved):
    _, path = saved
    model = fresh_model(where)
    before = fingerprint(model)

    def refuse(*args):  # runs after the layers before `out` have been assigned
        raise RuntimeError("refused by a load_state_dict hook")
    model.out.register_load_state_dict_pre_hook(refuse)
    with pytest.raises(ValueError, match="refused by a load_state_dict hook"):
        load_quantized(model, path)
    assert_unchanged(model, before)


@pytest.mark.parametrize("where", ["meta", "cpu"])
@pytest.mark.parametrize("misfit", ["shape", "dtype"])
def test_file_that_misfits_one_dense_tensor_leaves_the_model_as_it_was(misfit, where, saved):
    _, path = saved
    model = fresh_model(where)
    with torch.device(where):
        if misfit == "shape":
            model.out = nn.Linear(64, 9)
        else:  # an integer parameter cannot take a floating tensor
            model.norm.weight = nn.Parameter(torch.ones(320, dtype=torch.int32), requires_grad=False)
    before = fingerprint(model)
    with pytest.raises(ValueError, match="out.weight: file .8, 64. vs model .9, 64." if misfit == "shape" else
                       "norm.weight: file torch.float32 vs model torch.int32"):
        load_quantized(model, path)
    assert_unchanged(model, before)


def saved_after(gen, tmp_path, change):
    """A file save_quantized wrote, consistent in bytes, records and checksums, of the quantized
    Net after `change(model)`: what a file that passes every checksum can hold."""
    model = make_quantized(gen)
    with torch.no_grad():
        change(model)
    path = tmp_path / "changed.safetensors"
    save_quantized(model, path)
    return path


def retyped(name, dtype):
    def change(model):
        layer = model.get_submodule(name)
        layer.bias = nn.Parameter(layer.bias.to(dtype), requires_grad=False)
    return change


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_quantized_bias_in_a_dtype_its_kernels_refuse_is_refused(dtype, gen, tmp_path):
    path = saved_after(gen, tmp_path, retyped("proj", dtype))
    for where in ("meta", "cpu"):
        assert_refused(path, where, match=r"quantized module 'proj': malformed spec .*'bias_dtype': '" + str(dtype)[6:])


@pytest.mark.parametrize("dtype,accepted", [(torch.float16, True), (torch.bfloat16, True), (torch.float64, False),
                                            (torch.int32, False)])
def test_dense_tensor_may_come_in_another_of_float16_bfloat16_float32(dtype, accepted, gen, tmp_path):
    """A dense float32 bias stored in float16 or bfloat16 keeps the file's dtype; in float64 (which
    the float32 input of the layer's forward would meet) or int32 it is refused."""
    path = saved_after(gen, tmp_path, retyped("out", dtype))
    for where in ("meta", "cpu"):
        if accepted:
            model = load_quantized(fresh_model(where), path)
            assert model.out.bias.dtype == dtype and model.out.weight.dtype == torch.float32
        else:
            assert_refused(path, where, match=rf"out\.bias: file {dtype} vs model torch\.float32")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_quantized_bias_holding_nan_or_inf_is_refused(value, gen, tmp_path):
    path = saved_after(gen, tmp_path, lambda model: model.conv.bias.__setitem__(3, value))
    for where in ("meta", "cpu"):
        assert_refused(path, where, match=r"conv\.bias: cannot keep a bias holding NaN or Inf \(1 of 24")


@pytest.mark.parametrize("shape", [[0, 2**64], [0, 2**63], [2**62, 2**62, 0], [0, -1]])
def test_tensor_of_no_elements_with_an_uncountable_shape_is_refused(shape, saved, tmp_path):
    """A tensor of no elements takes no bytes whatever its other dimensions: they must still make
    a shape torch can count. Its header entry and record agree and the checksum is forged."""
    _, path = saved

    def add(head):
        end = max(info["data_offsets"][1] for key, info in head.items() if key != "__metadata__")
        head["extra"] = {"dtype": "F32", "shape": shape, "data_offsets": [end, end]}
        edit_metadata("tinykern.tensors", lambda records: {**records, "extra": {"dtype": "float32", "shape": shape,
                                                                                "crc32": 0}}, forge=True)(head)
    bad = rewrite(path, tmp_path / "uncountable.safetensors", add)
    for where in ("meta", "cpu"):
        assert "'extra'" in assert_refused(bad, where, match="malformed shape")


# Unusable wherever this runs: a GPU index past the last, and "cuda" itself without a GPU.
UNUSABLE = [f"cuda:{torch.cuda.device_count()}", *([] if torch.cuda.is_available() else ["cuda"])]


@pytest.mark.parametrize("device", UNUSABLE)
def test_unusable_device_is_refused_before_reading(device, saved):
    """A ValueError naming the file and the device; the model is left as it was."""
    _, path = saved
    for where in ("meta", "cpu"):
        model = fresh_model(where)
        before = fingerprint(model)
        with pytest.raises(ValueError, match=f"{path}: cannot load onto device '{device}'"):
            load_quantized(model, path, device=device)
        assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------
# Atomic saves: the file is the old one or the whole new one, never a part


def test_save_failing_midway_keeps_the_old_file_and_leaves_nothing(gen, tmp_path, monkeypatch):
    model = make_quantized(gen)
    path = tmp_path / "model.safetensors"
    save_quantized(model, path)
    original = path.read_bytes()
    write = serialization._write_safetensors

    def half_then_fail(f, tensors, metadata):
        buffer = io.BytesIO()
        write(buffer, tensors, metadata)
        f.write(buffer.getvalue()[:buffer.tell() // 2])
        raise OSError("no space left on device")
    monkeypatch.setattr(serialization, "_write_safetensors", half_then_fail)
    with torch.no_grad():
        model.proj.bias.add_(1)
    with pytest.raises(OSError, match="no space left"):
        save_quantized(model, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name] and path.read_bytes() == original


KILLED_SAVE = """
import os, sys, time
import torch
from tinykern import QuantConfig, quantize_, save_quantized

def stop(fd):  # the temporary file is complete and not yet renamed: say so, and wait to be killed
    print("writing", flush=True)
    time.sleep(600)

os.fsync = stop
model = torch.nn.Sequential(torch.nn.Linear(256, 8))
quantize_(model, QuantConfig(min_features=1))
save_quantized(model, sys.argv[1])
"""


def test_killed_save_keeps_the_old_file_and_the_next_save_removes_its_temp(gen, tmp_path):
    model = make_quantized(gen)
    path = tmp_path / "model.safetensors"
    save_quantized(model, path)
    original = path.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(path)], stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(300, child.kill)  # a child that never writes fails the test, never hangs it
    watchdog.start()
    try:
        assert child.stdout.readline() == "writing\n"
    finally:
        watchdog.cancel()
        child.kill()
        child.wait()
    orphans = [p for p in tmp_path.iterdir() if p != path]
    assert len(orphans) == 1 and orphans[0].name.startswith(f".{path.name}.{socket.gethostname()}.{child.pid}-"), orphans
    assert path.read_bytes() == original
    old = time.time() - 11 * 60  # a dead save's temp is removed once 10 minutes old
    os.utime(orphans[0], (old, old))
    save_quantized(model, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name] and path.read_bytes() == original


def test_saved_file_mode_follows_the_umask_and_an_existing_file(gen, tmp_path):
    model = make_quantized(gen)
    old = os.umask(0o027)
    try:
        save_quantized(model, tmp_path / "a.safetensors")
        os.umask(0o002)
        save_quantized(model, tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o666 & ~0o027
    assert stat.S_IMODE((tmp_path / "b.safetensors").stat().st_mode) == 0o666 & ~0o002
    (tmp_path / "a.safetensors").chmod(0o600)  # as open(path, "w") would, a re-save keeps the mode
    save_quantized(model, tmp_path / "a.safetensors")
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o600


def test_saved_file_reads_as_plain_safetensors(saved):
    model, path = saved
    tensors = load_file(str(path))
    state = model.state_dict()
    assert tensors.keys() == state.keys()
    assert all(tensors[k].dtype == v.dtype and torch.equal(tensors[k], v) for k, v in state.items())


@pytest.mark.parametrize("where", ["meta", "cpu"])
def test_layer_shared_by_two_paths_round_trips_as_one_module(where, gen, tmp_path):
    def shared_model():
        layer = nn.Linear(256, 64)
        return nn.Sequential(layer, nn.ReLU(), nn.Linear(64, 256), layer)
    model = shared_model()
    quantize_(model, QuantConfig(min_features=64))
    path = tmp_path / "shared.safetensors"
    save_quantized(model, path)
    with torch.device(where):
        fresh = shared_model()
    load_quantized(fresh, path)
    assert type(fresh[0]) is Q4Linear and fresh[0] is fresh[3]
    x = torch.randn(3, 256, generator=gen)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_save_removes_only_its_own_dead_and_old_temps(gen, tmp_path):
    """Removed: a temp of this host whose process is gone, last written over 10 minutes ago. Kept:
    a recent one (a save in another PID namespace on a host of the same name looks dead from
    here), one whose process lives, another host's, another file."""
    path = tmp_path / "model.safetensors"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now names no process
    prefix = f".{path.name}.{socket.gethostname()}."
    names = {"dead": f"{prefix}{gone.pid}-0123abcd.tinykern-tmp",
             "dead, recent": f"{prefix}{gone.pid}-4567abcd.tinykern-tmp",
             "alive": f"{prefix}{os.getpid()}-0123abcd.tinykern-tmp",  # a save in progress
             "other host": f".{path.name}.elsewhere.{gone.pid}-0123abcd.tinykern-tmp",
             "other file": f".{path.name}.notes"}
    old = time.time() - 11 * 60
    for label, name in names.items():
        (tmp_path / name).write_bytes(b"partial")
        if label != "dead, recent":
            os.utime(tmp_path / name, (old, old))
    save_quantized(make_quantized(gen), path)
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {path.name} | set(names.values()) - {names["dead"]}


def test_save_through_a_symlink_writes_the_file_it_names(gen, tmp_path):
    real = tmp_path / "store" / "model.safetensors"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "model.safetensors"
    link.symlink_to(real)
    model = make_quantized(gen)
    save_quantized(model, link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert torch.equal(load_quantized(Net(), link).proj.qweight, model.proj.qweight)
    assert sorted(p.name for p in real.parent.iterdir()) == [real.name]


DETACHED = """
import sys
import torch
from tinykern import load_quantized
sys.path.insert(0, sys.argv[2])
from test_serialization import Net

path = sys.argv[1]
with torch.device("meta"):
    model = Net()
load_quantized(model, path)
before = {k: v.clone() for k, v in model.state_dict().items()}
with open(path, "r+b") as f:  # rewritten in place, then cut: neither may reach the loaded model
    f.seek(0, 2)
    size = f.tell()
    f.seek(0)
    f.write(bytes(size))
with open(path, "r+b") as f:
    f.truncate(0)
after = model.state_dict()
print(all(torch.equal(after[k], v) for k, v in before.items()))
"""


def test_loaded_model_is_detached_from_its_file(saved):
    _, path = saved
    done = subprocess.run([sys.executable, "-c", DETACHED, str(path), os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout) == (0, "True\n"), done.stderr[-2000:]
