"""What one benchmark row runs: the inputs of a case and a callable per implementation, with the
bytes and flops it is charged for. Shared by bench/*.py and `python -m tinykern.bench`.

Implementations of an op are the tinykern backends (each called through the public op with the
backend forced) and baselines:

- "dense": F.linear / F.conv2d with the dense weight (fp16 on GPU, fp32 on CPU).
- "dequant_then_matmul": dequantize the whole weight in torch, then F.linear / F.conv2d: what
  diffusers' GGUFLinear does on every forward. diffusers' own class runs when diffusers is
  importable and the rows are whole GGUF blocks; otherwise tinykern's torch backend, which does
  exactly that. `detail` says which ran.
- rvq_encode: "cdist_argmin" (torch.cdist + argmin per level, the N x K matrix included) and
  "vector_quantize_pytorch" (its ResidualVQ in eval mode with the same codebooks).
- q4k_quantize / q8_0_quantize: "tinykern" (tinykern.formats: the compiled quantizer on CPU,
  vectorized torch on a GPU), "tinykern_torch" (the torch quantizer forced), and on CPU
  "ggml_ref" (libggml's C reference quantizer, one thread) and for Q8_0 "gguf_numpy" (gguf-py's
  numpy quantizer; it has none for Q4_K).

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
from tinykern.formats import q4k, q8_0

OPS = ("q4k_matmul", "q8_0_matmul", "q4k_conv2d", "rvq_encode", "q4k_quantize", "q8_0_quantize")
BASELINES = {
    "q4k_matmul": ("dense", "dequant_then_matmul"),
    "q8_0_matmul": ("dense", "dequant_then_matmul"),
    "q4k_conv2d": ("dense", "dequant_then_matmul"),
    "rvq_encode": ("cdist_argmin", "vector_quantize_pytorch"),
    "q4k_quantize": ("ggml_ref",),
    "q8_0_quantize": ("gguf_numpy", "ggml_ref"),
}
CASES = {"q4k_matmul": shapes.q4k_matmul, "q8_0_matmul": shapes.q8_0_matmul, "q4k_conv2d": shapes.q4k_conv2d,
         "rvq_encode": shapes.rvq, "q4k_quantize": shapes.quantize, "q8_0_quantize": shapes.quantize}
_FORMATS = {"q4k_matmul": q4k, "q8_0_matmul": q8_0, "q4k_conv2d": q4k, "q4k_quantize": q4k, "q8_0_quantize": q8_0}
# Relative RMS error of dequantize(quantize(w)) for Gaussian weights: Q4_K lands near 0.1, Q8_0
# near 0.005; a broken quantizer is far above.
MAX_QUANT_ERROR = {q4k: 0.15, q8_0: 0.01}
# Worst relative error vs the fp32 dense result a row may show before it counts as wrong: fp16
# activations, and diffusers' dequantization in fp16, stay near 1e-3; a broken kernel is near 1.
MAX_REL_ERROR = 2e-2
# An encode whose reconstruction error exceeds the torch reference's by more than this is wrong;
# near-ties may pick other codes of (almost) the same error.
MAX_RECON_RATIO = 1.02


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
    own = ("tinykern", "tinykern_torch") if op.endswith("_quantize") else backends.BACKENDS
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
    if impl == "gguf_numpy" and device.type != "cpu":
        raise Unavailable("gguf-py's quantizer is numpy code: it runs on the CPU only")
    if impl == "ggml_ref":
        if device.type != "cpu":
            raise Unavailable("libggml's reference quantizer runs on the CPU only")
        reason = ggml.unavailable_reason()
        if reason is not None:
            raise Unavailable(reason)
    data = workspace.get(op, case, device)
    build = {"rvq_encode": _rvq_row, "q4k_conv2d": _conv_row, "q4k_quantize": _quantize_row,
             "q8_0_quantize": _quantize_row}.get(op, _matmul_row)
    return build(op, case, impl, device, data)


def random_blocks(fmt, rows, cols, device, gen):
    """Valid packed rows of `fmt` holding `cols` weights in whole blocks, with random codes and
    scales: kernels read every byte alike, so they time as real weights do, and building them
    costs nothing next to quantizing. Weights past `cols` (row padding) are random too; the ops
    never pair them with an input."""
    nb = -(-cols // fmt.BLOCK)
    blocks = torch.randint(0, 256, (rows * nb, fmt.BLOCK_BYTES), dtype=torch.uint8, device=device, generator=gen)
    # Normal fp16 scales keep every weight finite and of a trained layer's size (|w| < 0.3).
    scales = 1e-4 + 2e-4 * torch.rand(rows * nb, 2, device=device, generator=gen)
    count = 2 if fmt is q4k else 1  # Q4_K: d and dmin; Q8_0: d
    blocks[:, :2 * count] = scales[:, :count].to(torch.float16).view(torch.uint8)
    return blocks.reshape(rows, nb * fmt.BLOCK_BYTES)


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
    fmt = _FORMATS[op]
    if op.endswith("_quantize"):
        return {"w": 0.02 * torch.randn(case.rows, case.cols, device=device, generator=gen)}
    if op == "q4k_conv2d":
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
        elif op == "q4k_conv2d":
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
    fmt = _FORMATS[op]
    op_fn = ops.q4k_matmul if op == "q4k_matmul" else ops.q8_0_matmul
    if impl == "dense":
        fn, detail = (lambda: F.linear(x, dense, bias)), f"F.linear, dense {_dtype_name(x.dtype)} weight"
    elif impl == "dequant_then_matmul":
        fn, detail = _dequant_then_linear(op_fn, x, w, bias, case.k, fmt)
    else:
        fn, detail = _backend_call(impl, op_fn, x, w, bias), f"tinykern.ops.{op} with backend {impl!r}"
    weight_bytes = dense.numel() * dense.element_size() if impl == "dense" else w.numel()
    nbytes = x.numel() * x.element_size() + weight_bytes + case.m * case.n * x.element_size()
    nbytes += 0 if bias is None else bias.numel() * bias.element_size()
    return Row(op, case, impl, _kind(op, impl), detail, fn, _output_check(op, case, data), nbytes,
               2 * case.m * case.n * case.k, _dtype_name(x.dtype), str(device))


def _dequant_then_linear(op_fn, x, w, bias, k, fmt):
    torch_backend = _backend_call("torch", op_fn, x, w, bias)
    try:
        import diffusers
        import gguf
        from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter
    except ImportError as e:
        return torch_backend, f"tinykern's torch backend (dequantize, then F.linear): diffusers is not importable ({e})"
    if k % fmt.BLOCK:
        return torch_backend, (f"tinykern's torch backend (dequantize, then F.linear): K={k} is not a whole number of "
                               f"{fmt.BLOCK}-weight blocks, which GGUF (and so GGUFLinear) cannot hold")
    qtype = gguf.GGMLQuantizationType.Q4_K if fmt is q4k else gguf.GGMLQuantizationType.Q8_0
    layer = GGUFLinear(k, w.shape[0], bias=bias is not None, compute_dtype=x.dtype, device="meta")
    layer.weight = GGUFParameter(w, quant_type=qtype)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return (lambda: layer(x)), f"diffusers {diffusers.__version__} GGUFLinear (dequantize in torch, then F.linear)"


def _conv_row(op, case, impl, device, data):
    x, w, bias, dense = data["x"], data["w"], data["bias"], data["dense"]
    args = (x, w, bias, case.cin, case.kernel, case.stride, case.padding)
    if impl == "dense":
        fn, detail = (lambda: F.conv2d(x, dense, bias, case.stride, case.padding)), f"F.conv2d, dense {_dtype_name(x.dtype)} weight"
    elif impl == "dequant_then_matmul":
        # diffusers' GGUF support replaces nn.Linear only; its approach applied to a conv is
        # tinykern's torch backend.
        fn = _backend_call("torch", ops.q4k_conv2d, *args)
        detail = "tinykern's torch backend (dequantize, then F.conv2d): diffusers' GGUF has no conv layer"
    else:
        fn, detail = _backend_call(impl, ops.q4k_conv2d, *args), f"tinykern.ops.q4k_conv2d with backend {impl!r}"
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
    fmt = _FORMATS[op]
    short = fmt.__name__.rsplit(".", 1)[-1]  # "q4k" or "q8_0": ggml's name for it too
    if impl == "gguf_numpy":
        import gguf
        from gguf import quants

        array = w.numpy()

        def fn():
            return torch.from_numpy(quants.quantize(array, gguf.GGMLQuantizationType.Q8_0))

        detail = f"gguf-py {machine.dist_version('gguf')} quants.quantize (numpy)"
    elif impl == "ggml_ref":
        fn = lambda: ggml.quantize_ref(short, w)  # noqa: E731
        detail = f"libggml-python {ggml.version()} quantize_row_{'q4_K' if fmt is q4k else short}_ref (C, one thread)"
    elif impl == "tinykern_torch":
        fn = _backend_call("torch", fmt.quantize, w)
        detail = f"tinykern.formats.{short}.quantize with the torch backend forced"
    else:
        fn, detail = (lambda: fmt.quantize(w)), f"tinykern.formats.{short}.quantize on {device.type}"

    def check(out):
        err = ((fmt.dequantize(out.to(w.device)) - w).norm() / w.norm()).item()
        if not err <= MAX_QUANT_ERROR[fmt]:
            raise AssertionError(f"{op} {case.id}: relative error {err:.3g} of the round trip exceeds {MAX_QUANT_ERROR[fmt]}")
        return {"rel_error": err}

    packed = case.rows * case.cols // fmt.BLOCK * fmt.BLOCK_BYTES
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
