"""The public ops. Each checks its arguments once, then runs the backend that
`tinykern.backends` picks for the input's device.

Non-finite x in q4k_matmul and q8_0_matmul: a row of x holding NaN or Inf gives non-finite
outputs in that row and leaves the other rows as they would be. Whether NaN or +-Inf depends
on the backend and the number of rows: the Q4_K kernels that fold the block mins in through
sum(x) (cpu below 14 rows, triton's skinny kernel) meet Inf - Inf and give NaN where the
reference gives +-Inf. rvq_encode's rule is in its docstring.
"""

import torch

from tinykern import backends, formats

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
backends.preload(device_types=("cpu",))


def dequantize(blocks, format, dtype=torch.float32):
    """Blocks of `format` (a key of tinykern.formats.FORMATS, or its record) uint8
    [..., nb*block_bytes] -> dense [..., nb*block] of dtype."""
    fmt = formats.get(format, "dequantize")
    op = fmt.op("dequantize")
    _check_blocks(op, blocks, fmt.block_bytes)
    return _run(op, blocks.device, blocks, dtype)


def matmul(x, blocks, format, bias=None):
    """x [..., K] @ dequant(blocks).T + bias, blocks the rows of `format` [N, nb*block_bytes]
    with K <= nb*block (the row padding never meets x). Non-finite x: see the module docstring."""
    fmt = formats.get(format, "matmul")
    op = fmt.op("matmul")
    k = x.shape[-1] if x.dim() else 0
    _check_weight(op, x, blocks, bias, k, fmt)
    y = _run(op, x.device, x.reshape(-1, k).contiguous(), blocks, bias)
    return y.reshape(*x.shape[:-1], blocks.shape[0])


def conv2d(x, blocks, format, kernel_size, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Conv2d of x [B, C, H, W] with rows of `format` blocks [out, nb*block_bytes] holding each
    output channel's (C/groups)*kh*kw weights in F.unfold order, zero-padded to whole blocks.
    padding is an int, a pair, "valid" or "same" (stride 1 and an odd dilated kernel extent
    only: the padding is symmetric)."""
    fmt = formats.get(format, "conv2d")
    op = fmt.op("conv2d")
    kh, kw = _pair(kernel_size)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [B, C, H, W], got {list(x.shape)}")
    in_channels = x.shape[1]
    if in_channels % groups or blocks.shape[0] % groups:
        raise ValueError(f"{op}: groups={groups} must divide in_channels={in_channels} and out_channels={blocks.shape[0]}")
    _check_weight(op, x, blocks, bias, in_channels // groups * kh * kw, fmt)
    padding = _conv_padding(op, padding, (kh, kw), stride, dilation)
    # Grouped convs are a separate op so that backends without them say so.
    if groups != 1:
        op = fmt.op("conv2d_grouped")
    return _run(op, x.device, x, blocks, bias, (kh, kw), _pair(stride), padding, _pair(dilation), groups)


def q4k_dequantize(blocks, dtype=torch.float32):
    """Q4_K blocks [..., nb*144] uint8 -> dense [..., nb*256]."""
    return dequantize(blocks, "q4_k", dtype)


def q8_0_dequantize(blocks, dtype=torch.float32):
    """Q8_0 blocks [..., nb*34] uint8 -> dense [..., nb*32]."""
    return dequantize(blocks, "q8_0", dtype)


def q4k_matmul(x, w, bias=None):
    """x [..., K] @ dequant(w).T + bias, w the Q4_K rows [N, nb*144] with K <= nb*256.
    Non-finite x: see the module docstring."""
    return matmul(x, w, "q4_k", bias)


def q8_0_matmul(x, w, bias=None):
    """x [..., K] @ dequant(w).T + bias, w the Q8_0 rows [N, nb*34] with K <= nb*32.
    Non-finite x: see the module docstring."""
    return matmul(x, w, "q8_0", bias)


def q4k_conv2d(x, w, bias, in_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1):
    """conv2d(x, w, "q4_k", ...), checking that x has `in_channels` channels."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"q4k_conv2d: x must be [B, {in_channels}, H, W], got {list(x.shape)}")
    return conv2d(x, w, "q4_k", kernel_size, bias, stride, padding, dilation, groups)


def rvq_encode(x, codebooks):
    """Residual VQ codes of x [N, D] against codebooks [L, K, D] (K >= 1): (codes [N, L] int64,
    quantized [N, D] float32 = the sum of the chosen codewords).

    Every backend picks the lowest code of smallest distance, and a NaN distance never wins:
    a codeword holding NaN is never chosen, and a level where a row has no distance below
    +Inf (a row of x holding NaN, say) gets code 0 there."""
    if x.dim() != 2 or codebooks.dim() != 3 or x.shape[1] != codebooks.shape[2]:
        raise ValueError(f"rvq_encode: expected x [N, D] and codebooks [L, K, D], got {list(x.shape)} and {list(codebooks.shape)}")
    _check_codes_exist("rvq_encode", codebooks)
    if x.dtype not in _FLOATS or codebooks.dtype != torch.float32:
        raise ValueError(f"rvq_encode: x must be float32/float16/bfloat16 and codebooks float32, got {x.dtype} and {codebooks.dtype}")
    _same_device("rvq_encode", x, codebooks)
    return _run("rvq_encode", x.device, x.contiguous(), codebooks.contiguous())


def rvq_decode(codes, codebooks):
    """Sum over levels l < codes.shape[1] of codebooks[l, codes[:, l]] ([N, D]); -1 adds nothing.
    A code outside -1..K-1 raises an error naming it and its place on the cpu (RuntimeError,
    from the extension) and torch (ValueError) backends; on a GPU, where
    checking would cost a host sync, the cuda kernel device-asserts and the triton kernel
    writes NaN to that row."""
    if codes.dim() != 2 or codebooks.dim() != 3 or codes.shape[1] > codebooks.shape[0]:
        raise ValueError(f"rvq_decode: expected codes [N, L'] and codebooks [L, K, D] with L' <= L, got {list(codes.shape)} and {list(codebooks.shape)}")
    _check_codes_exist("rvq_decode", codebooks)
    if codes.dtype not in (torch.int32, torch.int64) or codebooks.dtype not in _FLOATS:
        raise ValueError(f"rvq_decode: codes must be int32/int64 and codebooks floating, got {codes.dtype} and {codebooks.dtype}")
    _same_device("rvq_decode", codes, codebooks)
    return _run("rvq_decode", codes.device, codes.contiguous(), codebooks.contiguous())


def _run(op, device, *args):
    return backends.resolve(op, device)[1](*args)


def _check_weight(op, x, w, bias, k, fmt):
    if x.dtype not in _FLOATS:
        raise ValueError(f"{op}: x must be float32/float16/bfloat16, got {x.dtype}")
    _check_blocks(op, w, fmt.block_bytes)
    if w.dim() != 2:
        raise ValueError(f"{op}: w must be 2-D [N, nb*{fmt.block_bytes}], got {list(w.shape)}")
    padded = w.shape[1] // fmt.block_bytes * fmt.block
    if not padded - fmt.block < k <= padded:
        raise ValueError(
            f"{op}: x has {k} features (shape {list(x.shape)}) but w {list(w.shape)} holds rows of "
            f"{padded} weights; expected {padded - fmt.block + 1}..{padded}"
        )
    if bias is not None and (bias.shape != (w.shape[0],) or bias.dtype not in _FLOATS):
        raise ValueError(f"{op}: bias must be float32/float16/bfloat16 of shape [{w.shape[0]}], "
                         f"got {bias.dtype} {list(bias.shape)}")
    _same_device(op, x, w, *([bias] if bias is not None else []))


def _check_blocks(op, blocks, block_bytes):
    if blocks.dtype != torch.uint8:
        raise ValueError(f"{op}: blocks must be uint8, got {blocks.dtype}")
    if blocks.dim() == 0 or blocks.shape[-1] % block_bytes:
        raise ValueError(f"{op}: the last dim of {list(blocks.shape)} is not a multiple of {block_bytes} bytes")


def _check_codes_exist(op, codebooks):
    if codebooks.shape[1] == 0:
        raise ValueError(f"{op}: codebooks {list(codebooks.shape)} hold no codes (K = 0); expected [L, K, D] with K >= 1")


def _conv_padding(where, padding, kernel_size, stride, dilation):
    """padding as a pair of ints: "valid" is 0, "same" is dilation*(k-1)/2 a side (stride 1
    only, as in torch; tinykern's convs pad symmetrically, so the extent must be even)."""
    if not isinstance(padding, str):
        return _pair(padding)
    if padding == "valid":
        return (0, 0)
    if padding != "same":
        raise ValueError(f"{where}: padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    if _pair(stride) != (1, 1):
        raise ValueError(f"{where}: padding='same' needs stride 1 (as in torch), got stride={stride}")
    total = [d * (k - 1) for d, k in zip(_pair(dilation), _pair(kernel_size))]
    if any(t % 2 for t in total):
        raise ValueError(f"{where}: padding='same' with kernel_size={kernel_size}, dilation={dilation} pads one side "
                         "more than the other; tinykern's convs pad symmetrically only")
    return tuple(t // 2 for t in total)


def _same_device(op, *tensors):
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors are on different devices: {', '.join(str(t.device) for t in tensors)}")


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)
