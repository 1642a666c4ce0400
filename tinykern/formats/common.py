"""Byte-level helpers shared by the block formats."""

import torch
import torch.nn.functional as F

# Block scales are stored as fp16, so a format's range is this times its largest scale factor.
FP16_MAX = torch.finfo(torch.float16).max


def check_finite(t, name, what):
    """Raise ValueError "{name}: {what} holding NaN or Inf (...)" if `t` holds any."""
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = (~finite).sum().item()
        raise ValueError(f"{name}: {what} holding NaN or Inf ({bad} of {t.numel()} values)")


def float32_in_range(w, name, fmt, low, high):
    """w as float32, after checking that it is finite and within [low, high], the range `fmt`
    can hold; raises ValueError naming `name` otherwise."""
    x = w.detach().float()  # checked in float32, the precision the quantizer works in
    if x.numel():
        # One pass in the common case: aminmax is NaN where any value is, failing both tests.
        lowest, highest = torch.aminmax(x)
        if bool((lowest >= low) & (highest <= high)):
            return x
    check_finite(w, name, "cannot quantize a weight")
    outside = (x < low) | (x > high)
    if bool(outside.any()):  # then x is not empty and lowest/highest are its ends
        farthest = lowest if lowest < low else highest
        raise ValueError(
            f"{name}: {fmt} holds weights in [{low:.9g}, {high:.9g}] (its block scales are fp16), but "
            f"{outside.sum().item()} of {w.numel()} values lie outside (the farthest: {farthest.item():.9g})"
        )
    return x


def native_quantize(op, x, *args):
    """x quantized by the compiled op `op` of tinykern._C (a port of GGML's reference quantizer,
    byte for byte; `args` follow x), or None where it does not run: x off the CPU, _C not built,
    or a backend other than "cpu" forced (`with tinykern.backend("torch")` gives the torch
    quantizer)."""
    from tinykern import _ext, backends

    if x.device.type != "cpu" or not _ext.available() or backends.current() not in ("auto", "cpu"):
        return None
    return getattr(torch.ops.tinykern, op)(x.contiguous(), *args)


def quantize_blocks(w, name, fmt, low, high, ggml_type, block, block_bytes, torch_quantizer, chunk):
    """w [..., K] (K a multiple of `block`) quantized to `fmt` blocks, uint8 [..., K/block*block_bytes]:
    checked (ValueError naming `name` for a row length that is not whole blocks, NaN, Inf or a
    value outside [low, high]), then the compiled block_quantize for `ggml_type` where it runs
    (native_quantize), else `torch_quantizer` ([n, block] float32 -> [n, block_bytes] uint8) over
    `chunk` blocks at a time, which keeps its temporaries in cache."""
    if w.shape[-1] % block:
        raise ValueError(f"{name}: {fmt} needs rows that are a multiple of {block}, got shape {list(w.shape)}")
    x = float32_in_range(w, name, fmt, low, high).reshape(-1, block)
    shape = (*w.shape[:-1], w.shape[-1] // block * block_bytes)
    out = native_quantize("block_quantize", x, ggml_type)
    if out is not None:
        return out.reshape(shape)
    out = torch.empty(x.shape[0], block_bytes, dtype=torch.uint8, device=w.device)
    for start in range(0, x.shape[0], chunk):
        out[start:start + chunk] = torch_quantizer(x[start:start + chunk])
    return out.reshape(shape)


def round_to_fp16(x):
    """x rounded to the nearest fp16, back in float32 (how the formats store scales)."""
    return x.to(torch.float16).float()


def fp16_bytes(x):
    """float32 [n] -> its fp16 little-endian bytes, uint8 [n, 2]."""
    return x.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def fp16_from_bytes(b):
    """uint8 [n, 2] little-endian fp16 -> float32 [n]."""
    return b.contiguous().view(torch.float16).reshape(-1).float()


def quantize_rows(fmt, rows, name):
    """rows [n, K] (any float dtype) zero-padded to whole blocks of `fmt` (a Format record) and
    quantized by it: uint8 [n, fmt.row_bytes(K)]. Raises ValueError naming `name` if the format
    has no quantizer."""
    if fmt.quantize is None:
        raise ValueError(f"{name}: tinykern reads and runs {fmt.name} but does not quantize to it")
    features = rows.shape[-1]
    return fmt.quantize(F.pad(rows.float(), (0, fmt.padded(features) - features)), name=name)
