"""save_quantized / load_quantized: bit-identical round trips, and damaged files refused with a
message that names the file and the tensor. Every file lives under tmp_path."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tinykern import Q4Conv2d, Q4Linear, Q8Linear, QuantConfig, load_quantized, quantize_, save_quantized


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
