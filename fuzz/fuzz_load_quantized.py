"""Fuzz target: tinykern.load_quantized on mutated files of save_quantized (conventions in harness.py).

`python fuzz/fuzz_load_quantized.py [libFuzzer args...]`. Each input, and a copy whose metadata
checksum is recomputed (so that mutations of the module specs and tensor records reach the checks
behind it), is loaded into a fresh model built on the meta device and into one on the CPU. A
refusal must be a ValueError naming the file that leaves the model as it was; both models must
agree. An accepted file must give the model of one of the seeds (`suspicious` says where it
differs), since a file that loads into other weights or other layers is a silent success.
"""

import json
import struct
import tempfile

import harness

with harness.instrumented("tinykern.serialization"):
    import torch
    from torch import nn

    from tinykern import QuantConfig, load_quantized, quantize_, save_quantized, serialization

SUFFIX = ".safetensors"
CONFIG = QuantConfig(overrides={"gate": "q8_0", "mix": "q5_0"}, min_features=64)
DTYPES = (torch.float32, torch.float16)  # one seed each: float16 makes F16/BF16 relabels meaningful


class Net(nn.Module):
    """Every kind of tensor a file holds: Q4Conv2d, Q4Linear, Q8Linear (one without a bias) and a
    generic QuantLinear (its spec names its format),
    dense layers left as they are (a depthwise conv, a norm, a short linear), a buffer of no
    elements."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 3, stride=2, padding=1, dilation=1)  # row 72: Q4Conv2d
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)  # depthwise: dense
        self.norm = nn.LayerNorm(64)
        self.proj = nn.Linear(64, 8)  # Q4Linear
        self.gate = nn.Linear(64, 4, bias=False)  # Q8Linear
        self.mix = nn.Linear(64, 4)  # QuantLinear, Q5_0
        self.out = nn.Linear(12, 2)  # row 12: dense
        self.register_buffer("empty", torch.empty(0, 3))


def model_of(dtype):
    """The seed model in `dtype`: random weights (seeded), quantized by CONFIG."""
    gen = torch.Generator().manual_seed(DTYPES.index(dtype))
    model = Net()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / 4)
    model = model.to(dtype)
    quantize_(model, CONFIG)
    return model


def describe(model):
    """What the model's outputs depend on: every module's repr (type and geometry) and every
    tensor's device, dtype, shape and bytes (None on the meta device)."""
    tensors = {**dict(model.named_parameters(remove_duplicate=False)),
               **dict(model.named_buffers(remove_duplicate=False))}
    return repr(model), {k: (str(t.device), t.dtype, tuple(t.shape),
                             None if t.is_meta else serialization._bytes(t).tobytes()) for k, t in tensors.items()}


_SEED_MODELS = []


def seed_descriptions():
    if not _SEED_MODELS:
        _SEED_MODELS.extend(describe(model_of(dtype)) for dtype in DTYPES)
    return _SEED_MODELS


def seeds():
    out = []
    with tempfile.TemporaryDirectory() as folder:
        for dtype in DTYPES:
            path = f"{folder}/seed{SUFFIX}"
            save_quantized(model_of(dtype), path)
            with open(path, "rb") as f:
                out.append(f.read())
    return out


def fresh(device):
    with torch.device(device):
        return Net()


def load(path):
    """Load `path`, and the same file with its metadata checksum forged, each into a meta and a
    CPU model; re-raise the refusal of `path` once both models refused it alike."""
    refusal = _load_into_both(path)
    other = forged(path)
    if other is not None and _load_into_both(other) is None:
        difference = suspicious(other)
        assert difference is None, f"with its metadata checksum forged: {difference}"
    if refusal is not None:
        raise refusal


def _load_into_both(path):
    """The ValueError both models refused `path` with, or None when both accepted it."""
    refusals = []
    for device in ("meta", "cpu"):
        model = fresh(device)
        before = describe(model)
        try:
            load_quantized(model, path)
        except ValueError as e:
            assert path in str(e), f"the error does not name the file: {e}"
            assert describe(model) == before, f"a refused load changed the {device} model: {e}"
            refusals.append(e)
    assert len(refusals) in (0, 2), f"refused into one model only: {refusals[0]}"
    return refusals[0] if refusals else None


def forged(path):
    """A copy of `path` whose metadata checksum is recomputed, as a forger would (what must then
    hold is that every spec matches its layer and every tensor fits), or None where there is no
    metadata to forge or it already matches."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        meta = header["__metadata__"]
        checksum = serialization._metadata_checksum(meta["tinykern.version"], meta["tinykern.modules"],
                                                    meta["tinykern.tensors"])
    except (ValueError, struct.error, TypeError, KeyError, RecursionError):  # nothing a forger could fix
        return None
    if meta.get("tinykern.checksum") == checksum:
        return None
    meta["tinykern.checksum"] = checksum
    blob = json.dumps(header).encode()
    other = path + ".forged"
    with open(other, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data[8 + n:])
    return other


def suspicious(path):
    """For an accepted file: how the model it gives differs from every seed's, or None."""
    model = fresh("meta")
    load_quantized(model, path)
    found = describe(model)
    if found in seed_descriptions():
        return None
    layers, tensors = found
    closest = min(seed_descriptions(), key=lambda seed: sum(seed[1].get(k) != v for k, v in tensors.items()))
    differ = sorted(k for k in tensors.keys() | closest[1].keys() if tensors.get(k) != closest[1].get(k))
    if not differ:
        return "loaded other layers than any seed's"
    return f"loaded, but unlike every seed's model: tensors {differ}"


if __name__ == "__main__":
    harness.main(__file__)
