"""What one benchmark row runs: the inputs of a case and a callable per implementation, with the
bytes and flops it is charged for. Shared by bench/*.py and `python -m tinykern.bench`.

The ops come from tinykern.formats.FORMATS: for every format its matmul and conv2d (named as the
backend registry names them: Format.op("matmul"), e.g. "q4k_matmul", "q5_k_matmul") and, for
every format tinykern writes, its quantizer (Format.op("quantize"): "q4k_quantize", ...); then
rvq_encode. All formats run the same shapes, so rows compare across formats.

Implementations of an op are the tinykern backends (each called through the public op with the
backend forced) and baselines:

- "dense": F.linear / F.conv2d with the dense weight (fp16 on GPU, fp32 on CPU).
- "dequant_then_matmul": dequantize the whole weight in torch, then F.linear / F.conv2d: what
  diffusers' GGUFLinear does on every forward. diffusers' own class runs when diffusers is
  importable, dequantizes the format and the rows are whole GGUF blocks; otherwise tinykern's
  torch backend, which does exactly that. `detail` says which ran.
- rvq_encode: "cdist_argmin" (torch.cdist + argmin per level, the N x K matrix included) and
  "vector_quantize_pytorch" (its ResidualVQ in eval mode with the same codebooks).
- <format>_quantize: "tinykern" (tinykern.formats: the compiled quantizer on CPU where there is
  one, else vectorized torch), "tinykern_torch" (the torch quantizer forced; not run where
  "tinykern" already is it), and on CPU "gguf_numpy" (gguf-py's numpy quantizer, for the formats
  it quantizes) and "ggml_ref" (libggml's C reference quantizer, one thread, for the formats
  tinykern.bench.ggml binds). A baseline that does not cover a format is listed as not run,
  with the reason.

Bytes are the op's compulsory traffic: every input read once (packed weights with their
scales, activations, bias, codebooks) and every output written once. Rows that consume the
packed weight are charged the packed bytes, "dense" the dense weight's: a dequantize-then-matmul
row's own round trip through a dense copy is not counted, which is exactly what it wastes.
"""

import dataclasses

import torch
import torch.nn.functional as F

from tinykern import backends, ops
from tinykern.bench import ggml, machine, shapes
from tinykern.formats import FORMATS

# What runs unless a format selection says otherwise: the formats of tinykern's defaults (the
# UNet's and the text encoder's), so that a default run stays the size it always was.
DEFAULT_FORMATS = ("q4_k", "q8_0")
_LINEAR_BASELINES = ("dense", "dequant_then_matmul")
_QUANTIZE_BASELINES = ("gguf_numpy", "ggml_ref")


def _op_table():
    """{op: (kind, Format or None)} in report order: matmuls, convs, rvq_encode, quantizers."""
    table = {fmt.op("matmul"): ("matmul", fmt) for fmt in FORMATS.values()}
    table.update({fmt.op("conv2d"): ("conv2d", fmt) for fmt in FORMATS.values()})
    table["rvq_encode"] = ("rvq_encode", None)
    table.update({fmt.op("quantize"): ("quantize", fmt) for fmt in FORMATS.values() if fmt.quantize is not None})
    return table


_OPS = _op_table()
OPS = tuple(_OPS)
KINDS = ("matmul", "conv2d", "rvq_encode", "quantize")
BASELINES = {op: {"matmul": _LINEAR_BASELINES, "conv2d": _LINEAR_BASELINES, "quantize": _QUANTIZE_BASELINES,
                  "rvq_encode": ("cdist_argmin", "vector_quantize_pytorch")}[kind] for op, (kind, _) in _OPS.items()}
_SHAPES = {"matmul": shapes.matmul, "conv2d": shapes.conv2d, "rvq_encode": shapes.rvq, "quantize": shapes.quantize}
CASES = {op: _SHAPES[kind] for op, (kind, _) in _OPS.items()}
# Relative RMS error of dequantize(quantize(w)) for Gaussian weights is c * 2**-bits_per_weight
# with c about 1.6 to 2.5 for every format (each bit halves the code step; the scale bytes
# counted in bits_per_weight only move c). A bound of 4 * 2**-bpw leaves over 1.5x margin for
# every format; a broken quantizer lands near 1.
MAX_QUANT_ERROR = {name: 4 * 2 ** -fmt.bits_per_weight for name, fmt in FORMATS.items() if fmt.quantize is not None}
# Worst relative error vs the fp32 dense result a row may show before it counts as wrong: fp16
# activations, and diffusers' dequantization in fp16, stay near 1e-3; a broken kernel is near 1.
MAX_REL_ERROR = 2e-2
# An encode whose reconstruction error exceeds the torch reference's by more than this is wrong;
# near-ties may pick other codes of (almost) the same error.
MAX_RECON_RATIO = 1.02
# Packed weights are drawn from this many real blocks per format (see random_blocks).
POOL_BLOCKS = 1024


def kind(op):
    """"matmul", "conv2d", "rvq_encode" or "quantize"."""
    return _OPS[op][0]


def format_of(op):
    """The Format record `op` runs, or None (rvq_encode)."""
    return _OPS[op][1]


def parse_formats(text):
    """"q4_k,q8_0" (FORMATS keys, any case) or "all" -> a tuple of FORMATS keys; ValueError in
    one line for an unknown or empty selection."""
    if text.strip().lower() == "all":
        return tuple(FORMATS)
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise ValueError(f"unknown formats {unknown or [text]}; expected some of {','.join(FORMATS)} (or all)")
    return names


def ops_for(formats, kinds=KINDS):
    """The ops of `kinds` whose format is among `formats` (FORMATS keys), rvq_encode (no format)
    included when its kind is, in OPS order."""
    return tuple(op for op, (k, fmt) in _OPS.items() if k in kinds and (fmt is None or fmt.name in formats))


class Unavailable(Exception):
    """This implementation cannot run this row here; str() says why."""


@dataclasses.dataclass
class Row:
    op: str
    case: object  # a shapes.*Case
    impl: str
    kind: str  # "tinykern" or "baseline"
    detail: str
    fn: object  # no-argument callable: one call of the op
    check: object  # callable(output) -> dict of accuracy figures; raises AssertionError if wrong
    bytes: int
    flops: int
    dtype: str
    device: str
    torch_memory: bool = True  # False: it allocates outside torch, where peak memory cannot see

    def info(self):
        """The row's identity and cost model, for pytest-benchmark's extra_info and the JSON."""
        return {"op": self.op, "impl": self.impl, "kind": self.kind, "detail": self.detail, "case": self.case.id,
                "shape": self.case.shape(), "layers": getattr(self.case, "layers", 1), "dtype": self.dtype,
                "device": self.device, "bytes": self.bytes, "flops": self.flops}


def impls(op):
    own = ("tinykern", "tinykern_torch") if kind(op) == "quantize" else backends.BACKENDS
    return own + BASELINES[op]


def compute_dtype(device):
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def backend_reason(name, device, op):
    """Why backend `name` gets no row for `op` on `device`, or None. Only backends that `auto`
    could pick there are timed (so not the Triton interpreter on CPU)."""
    device_type = torch.device(device).type
    if name not in backends.AUTO_ORDER.get(device_type, ()):
        why = "the Triton interpreter is a correctness tool, not a performance path" if name == "triton" else \
            f"the {name} backend does not run {device_type} tensors"
        return f"auto never picks {name} on {device_type}: {why}"
    return backends.unavailable_reason(name, device_type, op)


class Workspace:
    """Builds a case's inputs once and keeps the latest case only (full-set inputs reach GBs)."""

    def __init__(self):
        self._key, self._data = None, None

    def get(self, op, case, device):
        key = (op, case, str(device))
        if key != self._key:
            self._key, self._data = None, None  # free the old inputs before building new ones
            self._data = _build(op, case, torch.device(device))
            self._key = key
        return self._data

    def clear(self):
        self._key, self._data = None, None


def prepare(op, case, impl, device, workspace):
    """The Row of `impl` on `case`, or raise Unavailable."""
    device = torch.device(device)
    if impl not in impls(op):
        raise ValueError(f"unknown implementation {impl!r} of {op}; expected one of {impls(op)}")
    if impl in backends.BACKENDS:
        reason = backend_reason(impl, device, op)
        if reason is not None:
            raise Unavailable(reason)
    if impl == "gguf_numpy":
        if device.type != "cpu":
            raise Unavailable("gguf-py's quantizer is numpy code: it runs on the CPU only")
        reason = _gguf_numpy_reason(format_of(op))
        if reason is not None:
            raise Unavailable(reason)
    if impl == "ggml_ref":
        if device.type != "cpu":
            raise Unavailable("libggml's reference quantizer runs on the CPU only")
        if _ggml_name(format_of(op)) is None:
            covered = [f.name for f in FORMATS.values() if _ggml_name(f) is not None]
            raise Unavailable(f"tinykern.bench.ggml binds libggml's reference quantizers for {', '.join(covered)} only")
        reason = ggml.unavailable_reason()
        if reason is not None:
            raise Unavailable(reason)
    if impl == "tinykern_torch" and device.type == "cpu" and not hasattr(torch.ops.tinykern, op):
        raise Unavailable(f"tinykern._C has no compiled {op}: the tinykern row already is the torch quantizer")
    fmt = format_of(op)
    if fmt is not None and fmt.quantize is None and kind(op) != "quantize":
        raise Unavailable(f"{fmt.name} has no quantizer to draw valid weights from")
    data = workspace.get(op, case, device)
    build = {"rvq_encode": _rvq_row, "conv2d": _conv_row, "quantize": _quantize_row, "matmul": _matmul_row}[kind(op)]
    return build(op, case, impl, device, data)


def _ggml_name(fmt):
    """tinykern.bench.ggml's name of fmt, or None where it does not bind the format."""
    return {t: name for name, t in ggml.GGML_TYPE.items()}.get(fmt.ggml_type)


def _gguf_numpy_reason(fmt):
    try:
        import gguf
        import numpy as np
        from gguf import quants
    except ImportError as e:
        return f"gguf-py is not importable ({e})"
    try:
        quants.quantize(np.zeros((1, fmt.block), np.float32), gguf.GGMLQuantizationType(fmt.ggml_type))
    except NotImplementedError:
        return f"gguf-py {machine.dist_version('gguf')} has no {fmt.name} quantizer"
    return None


def random_blocks(fmt, rows, cols, device, gen):
    """Valid packed rows of Format `fmt` holding `cols` weights in whole blocks, each block drawn
    at random from POOL_BLOCKS blocks quantized from Gaussian weights of a trained layer's size:
    kernels read every byte alike, so they time as real weights do, drawing costs nothing next to
    quantizing the whole weight, and no format's layout needs spelling out here. Weights past
    `cols` (row padding) are drawn too; the ops never pair them with an input."""
    nb = -(-cols // fmt.block)
    pool = _block_pool(fmt).to(device)
    pick = torch.randint(0, pool.shape[0], (rows * nb,), device=device, generator=gen)
    return pool[pick].reshape(rows, nb * fmt.block_bytes)


_POOLS = {}


def _block_pool(fmt):
    if fmt.name not in _POOLS:
        gen = torch.Generator().manual_seed(0)
        w = 0.02 * torch.randn(POOL_BLOCKS, fmt.block, generator=gen)
        _POOLS[fmt.name] = fmt.quantize(w).reshape(POOL_BLOCKS, fmt.block_bytes)
    return _POOLS[fmt.name]


def _generator(device):
    return torch.Generator(device).manual_seed(0)


def _build(op, case, device):
    gen = _generator(device)
    dtype = compute_dtype(device)
    if op == "rvq_encode":
        # Codebooks that shrink level by level, as trained residual codebooks do.
        scale = 0.5 ** torch.arange(case.levels, device=device, dtype=torch.float32)
        books = torch.randn(case.levels, case.k, case.d, device=device, generator=gen) * scale[:, None, None]
        x = torch.randn(case.n, case.d, device=device, generator=gen)
        return {"x": x, "codebooks": books}
    fmt = format_of(op)
    if kind(op) == "quantize":
        return {"w": 0.02 * torch.randn(case.rows, case.cols, device=device, generator=gen)}
    if kind(op) == "conv2d":
        row = case.cin * case.kernel * case.kernel
        w = random_blocks(fmt, case.cout, row, device, gen)
        x = torch.randn(case.batch, case.cin, case.height, case.width, device=device, generator=gen).to(dtype)
        dense = fmt.dequantize(w, dtype)[:, :row].reshape(case.cout, case.cin, case.kernel, case.kernel).contiguous()
        bias = torch.randn(case.cout, device=device, generator=gen).to(dtype)
    else:
        w = random_blocks(fmt, case.n, case.k, device, gen)
        x = torch.randn(case.m, case.k, device=device, generator=gen).to(dtype)
        dense = fmt.dequantize(w, dtype)[:, :case.k].contiguous()
        bias = torch.randn(case.n, device=device, generator=gen).to(dtype) if case.bias else None
    return {"x": x, "w": w, "bias": bias, "dense": dense}


def _reference(op, case, data):
    """The fp32 result of the dense weight (or the torch backend's encode), computed once."""
    if "reference" not in data:
        if op == "rvq_encode":
            with backends.backend("torch"):
                data["reference"] = ops.rvq_encode(data["x"], data["codebooks"])
        elif kind(op) == "conv2d":
            data["reference"] = F.conv2d(data["x"].float(), data["dense"].float(), _f32(data["bias"]), case.stride,
                                         case.padding)
        else:
            data["reference"] = F.linear(data["x"].float(), data["dense"].float(), _f32(data["bias"]))
    return data["reference"]


def _f32(t):
    return None if t is None else t.float()


def _output_check(op, case, data):
    def check(out):
        ref = _reference(op, case, data)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        if not err <= MAX_REL_ERROR:
            raise AssertionError(f"{op} {case.id}: relative error {err:.3g} vs the fp32 dense result exceeds {MAX_REL_ERROR}")
        return {"rel_error": err}

    return check


def _backend_call(name, op_fn, *args, exact=False):
    def call():
        with backends.backend(name, exact=exact):
            return op_fn(*args)

    return call


def _matmul_row(op, case, impl, device, data):
    x, w, bias, dense = data["x"], data["w"], data["bias"], data["dense"]
    fmt = format_of(op)
    if impl == "dense":
        fn, detail = (lambda: F.linear(x, dense, bias)), f"F.linear, dense {_dtype_name(x.dtype)} weight"
    elif impl == "dequant_then_matmul":
        fn, detail = _dequant_then_linear(x, w, bias, case.k, fmt)
    else:
        fn = _backend_call(impl, ops.matmul, x, w, fmt, bias)
        detail = f"tinykern.ops.matmul({fmt.name}) with backend {impl!r}"
    weight_bytes = dense.numel() * dense.element_size() if impl == "dense" else w.numel()
    nbytes = x.numel() * x.element_size() + weight_bytes + case.m * case.n * x.element_size()
    nbytes += 0 if bias is None else bias.numel() * bias.element_size()
    return Row(op, case, impl, _kind(op, impl), detail, fn, _output_check(op, case, data), nbytes,
               2 * case.m * case.n * case.k, _dtype_name(x.dtype), str(device))


def _dequant_then_linear(x, w, bias, k, fmt):
    torch_backend = _backend_call("torch", ops.matmul, x, w, fmt, bias)
    try:
        import diffusers
        import gguf
        from diffusers.quantizers.gguf import utils as diffusers_gguf
        from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter
    except ImportError as e:
        return torch_backend, f"tinykern's torch backend (dequantize, then F.linear): diffusers is not importable ({e})"
    if k % fmt.block:
        return torch_backend, (f"tinykern's torch backend (dequantize, then F.linear): K={k} is not a whole number of "
                               f"{fmt.block}-weight blocks, which GGUF (and so GGUFLinear) cannot hold")
    qtype = gguf.GGMLQuantizationType(fmt.ggml_type)
    if qtype not in getattr(diffusers_gguf, "dequantize_functions", {}):
        return torch_backend, (f"tinykern's torch backend (dequantize, then F.linear): diffusers "
                               f"{diffusers.__version__} cannot dequantize {fmt.name}")
    layer = GGUFLinear(k, w.shape[0], bias=bias is not None, compute_dtype=x.dtype, device="meta")
    layer.weight = GGUFParameter(w, quant_type=qtype)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return (lambda: layer(x)), f"diffusers {diffusers.__version__} GGUFLinear (dequantize in torch, then F.linear)"


def _conv_row(op, case, impl, device, data):
    x, w, bias, dense = data["x"], data["w"], data["bias"], data["dense"]
    fmt = format_of(op)
    args = (x, w, fmt, case.kernel, bias, case.stride, case.padding)
    if impl == "dense":
        fn, detail = (lambda: F.conv2d(x, dense, bias, case.stride, case.padding)), f"F.conv2d, dense {_dtype_name(x.dtype)} weight"
    elif impl == "dequant_then_matmul":
        # diffusers' GGUF support replaces nn.Linear only; its approach applied to a conv is
        # tinykern's torch backend.
        fn = _backend_call("torch", ops.conv2d, *args)
        detail = "tinykern's torch backend (dequantize, then F.conv2d): diffusers' GGUF has no conv layer"
    else:
        fn, detail = _backend_call(impl, ops.conv2d, *args), f"tinykern.ops.conv2d({fmt.name}) with backend {impl!r}"
    oh, ow = case.out_hw
    weight_bytes = dense.numel() * dense.element_size() if impl == "dense" else w.numel()
    nbytes = (x.numel() + case.batch * case.cout * oh * ow + case.cout) * x.element_size() + weight_bytes
    flops = 2 * case.batch * case.cout * oh * ow * case.cin * case.kernel * case.kernel
    return Row(op, case, impl, _kind(op, impl), detail, fn, _output_check(op, case, data), nbytes, flops,
               _dtype_name(x.dtype), str(device))


def _rvq_row(op, case, impl, device, data):
    x, books = data["x"], data["codebooks"]
    if impl == "cdist_argmin":
        fn, detail = (lambda: _cdist_argmin(x, books)), "torch.cdist + argmin per level (materializes N x K)"
    elif impl == "vector_quantize_pytorch":
        fn, detail = _vector_quantize_pytorch(x, books)
    else:
        fn, detail = _backend_call(impl, ops.rvq_encode, x, books), f"tinykern.ops.rvq_encode with backend {impl!r}"

    def check(out):
        codes, quantized = out
        ref_codes, ref_quantized = _reference(op, case, data)
        recon = (x - quantized.reshape(x.shape).float()).norm().item()
        ratio = recon / max((x - ref_quantized).norm().item(), torch.finfo(torch.float32).tiny)
        if not ratio <= MAX_RECON_RATIO:
            raise AssertionError(f"rvq_encode {case.id}: reconstruction error {ratio:.3f}x the torch reference's")
        agree = (codes.reshape(ref_codes.shape).long() == ref_codes).all(dim=1).float().mean().item()
        return {"recon_error_vs_torch": ratio, "codes_agree_with_torch": agree}

    nbytes = x.numel() * x.element_size() + books.numel() * books.element_size() + case.n * case.levels * 8 + x.numel() * 4
    return Row(op, case, impl, _kind(op, impl), detail, fn, check, nbytes, 2 * case.n * case.k * case.d * case.levels,
               _dtype_name(x.dtype), str(device))


def _quantize_row(op, case, impl, device, data):
    w = data["w"]
    fmt = format_of(op)
    if impl == "gguf_numpy":
        import gguf
        from gguf import quants

        array = w.numpy()

        def fn():
            return torch.from_numpy(quants.quantize(array, gguf.GGMLQuantizationType(fmt.ggml_type)))

        detail = f"gguf-py {machine.dist_version('gguf')} quants.quantize (numpy)"
    elif impl == "ggml_ref":
        fn = lambda: ggml.quantize_ref(_ggml_name(fmt), w)  # noqa: E731
        c_name = fmt.name[:-1] + "K" if fmt.name.endswith("_k") else fmt.name  # ggml spells K-quants "q4_K"
        detail = f"libggml-python {ggml.version()} quantize_row_{c_name}_ref (C, one thread)"
    elif impl == "tinykern_torch":
        fn = _backend_call("torch", fmt.quantize, w)
        detail = f"tinykern's {fmt.name} quantizer with the torch backend forced"
    else:
        fn, detail = (lambda: fmt.quantize(w)), f"tinykern's {fmt.name} quantizer on {device.type}"
    bound = MAX_QUANT_ERROR[fmt.name]

    def check(out):
        err = ((fmt.dequantize(out.to(w.device)) - w).norm() / w.norm()).item()
        if not err <= bound:
            raise AssertionError(f"{op} {case.id}: relative error {err:.3g} of the round trip exceeds {bound:.3g}")
        return {"rel_error": err}

    packed = case.rows * case.cols // fmt.block * fmt.block_bytes
    return Row(op, case, impl, _kind(op, impl), detail, fn, check, w.numel() * 4 + packed, 0, "float32", str(device),
               torch_memory=impl not in ("gguf_numpy", "ggml_ref"))


def _cdist_argmin(x, books):
    residual = x.float().clone()
    codes = []
    for level in books:
        idx = torch.cdist(residual, level).argmin(dim=1)
        codes.append(idx)
        residual -= level.index_select(0, idx)
    return torch.stack(codes, dim=1), x - residual


def _vector_quantize_pytorch(x, books):
    try:
        import vector_quantize_pytorch as vqp
    except ImportError as e:
        raise Unavailable(f"vector_quantize_pytorch is not importable ({e})") from None
    levels, k, d = books.shape
    rvq = vqp.ResidualVQ(dim=d, num_quantizers=levels, codebook_size=k, kmeans_init=False).to(x.device).eval()
    with torch.no_grad():
        for layer, book in zip(rvq.layers, books):
            layer._codebook.embed.copy_(book[None])
    batch = x[None]

    def call():
        with torch.no_grad():
            quantized, codes, _ = rvq(batch)
        return codes[0], quantized[0]

    version = getattr(vqp, "__version__", None) or machine.dist_version("vector-quantize-pytorch")
    return call, f"vector_quantize_pytorch {version} ResidualVQ, eval mode, same codebooks"


def _kind(op, impl):
    return "baseline" if impl in BASELINES[op] else "tinykern"


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")
