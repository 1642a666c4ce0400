"""The SD pipeline's memory planner: predicted peak GPU memory (allocated bytes, as
torch.cuda.max_memory_allocated counts them) of one text-to-image run, per component.

The prediction is a trace, not a formula: the pipeline's own modules (with every option that
changes memory: slicing, sequential CFG, step rehash, LoRA branches) are built on the meta
device and run there under tinykern.memtrace.MemoryTrace, which books every tensor the code
allocates (rounded to the caching allocator's 512 bytes) and frees it when the code drops it.
The kernels are modelled on the meta device by what they allocate on the GPU:

- tinykern ops, per backend (`backend`): "triton" allocates the output only; "cuda"
  dequantizes a whole weight to the activation dtype for every conv and for matmuls of more
  than 16 rows (csrc/cuda: kGemvMaxRows), then calls cuDNN/cuBLAS; "torch" dequantizes always.
- attention (`attention`): "flash" and "efficient" allocate the output and the softmax
  statistics (float32 [B, heads, tokens]), as those kernels do; "math" is the fallback that
  materializes the scores [B, heads, tokens, tokens] in float32.

Not traced, listed apart: the cuBLAS workspace (allocated once through the caching allocator;
its size is torch's default for the architecture, `CUBLAS_WORKSPACE_CONFIG` changes it) and
cuDNN's per-call convolution workspace (its algorithm is picked at run time; not predicted).
"""

import contextlib
import dataclasses
import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tinykern import backends
from tinykern.memtrace import MemoryTrace, rounded

MiB = 2**20
# torch's default cuBLAS workspace: ":4096:8" (32 MiB) on sm90, ":4096:2:16:8" (8.125 MiB) before.
CUBLAS_WORKSPACE = {"sm90": 32 * MiB, "sm80": 8 * MiB + 128 * 1024}
GEMV_MAX_ROWS = 16  # csrc/cuda: up to this many rows the cuda matmuls decode on the fly
PHASES = ("text encoder", "denoise", "decode")


@dataclasses.dataclass
class Phase:
    """One phase of the run: its traced peak (activations and pipeline state on the GPU, on
    top of the weights) and the allocations live at that peak, largest first."""

    name: str
    peak: int
    at_peak: list
    largest: list


@dataclasses.dataclass
class MemoryPlan:
    """Predicted bytes: `weights` {component: bytes} resident for the whole run (rounded per
    tensor), `phases` [Phase], `workspace` {name: bytes} added to the peak (not traced),
    `settings` {what was planned}. `peak` is weights + the largest phase + workspace."""

    weights: dict
    phases: list
    workspace: dict
    settings: dict

    @property
    def weight_bytes(self):
        return sum(self.weights.values())

    @property
    def peak_phase(self):
        return max(self.phases, key=lambda p: p.peak)

    @property
    def peak(self):
        return self.weight_bytes + self.peak_phase.peak + sum(self.workspace.values())

    def phase(self, name):
        return next(p for p in self.phases if p.name == name)

    def report(self, top=8):
        """The plan as text, in MiB."""
        s = self.settings
        lines = [f"SD memory plan (predicted, meta-device trace): {s['width']}x{s['height']}, guidance {s['guidance']}, "
                 f"batch {s['unet_batch']} per UNet call, slicing {s['slicing']}, rehash {s['rehash']}, "
                 f"{s['dtype']}, tinykern backend {s['backend']}, attention {s['attention']}",
                 "weights (resident on the GPU):"]
        lines += [f"  {name:<28} {n / MiB:9.2f} MiB" for name, n in self.weights.items()]
        lines.append(f"  {'total':<28} {self.weight_bytes / MiB:9.2f} MiB")
        lines.append("activation peak per phase (on top of the weights):")
        for p in self.phases:
            lines.append(f"  {p.name:<28} {p.peak / MiB:9.2f} MiB")
        for p in self.phases:
            if not p.at_peak:
                continue
            lines.append(f"largest activations in {p.name} (made by):")
            lines += [f"  {a.describe()}" for a in p.largest[:top]]
        lines.append("kernel workspaces (not traced):")
        lines += [f"  {name:<28} {n / MiB:9.2f} MiB" for name, n in self.workspace.items()]
        lines.append("  cuDNN conv workspace         not predicted (chosen per call by cuDNN)")
        lines.append(f"predicted peak allocated: {self.peak / MiB:.2f} MiB = {self.peak / 1e9:.3f} GB "
                     f"(in {self.peak_phase.name})")
        return "\n".join(lines)

    def to_json(self):
        return {"settings": self.settings, "weights": self.weights, "workspace": self.workspace, "peak": self.peak,
                "peak_phase": self.peak_phase.name,
                "phases": {p.name: {"peak": p.peak, "largest": [dataclasses.asdict(a) | {"dtype": str(a.dtype)}
                                                                 for a in p.largest[:8]]} for p in self.phases}}


# ---------------------------------------------------------------------------------------------
# The pipeline on the meta device


def config_dir(model=None, config=None):
    """The folder holding unet/, text_encoder/ and vae/ configs for `model`: the model itself
    when it is a folder (diffusers or `sd quantize`), else `config` or the shipped SD1.5 one."""
    from tinykern.pipelines.sd.loaders import sd15_config_dir

    if config is not None:
        return Path(config).expanduser()
    if model is not None and Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    return sd15_config_dir()


def meta_pipeline(folder=None, quantize=True, dtype=torch.float16, vae_on_gpu=True, vae_decoder_only=True):
    """A TinySDPipeline with every component on the meta device in the low-VRAM layout
    (quantize: True, False or an SDQuantConfig), from the configs in `folder` (default SD1.5).
    A `tinykern sd quantize` folder keeps the layout it was saved with (its files' layer specs).
    Nothing is read but the configs and those headers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tinykern.pipelines.sd.layout import SDQuantConfig, move
    from tinykern.pipelines.sd.loaders import WEIGHTS, _scheduler
    from tinykern.pipelines.sd.pipeline import TinySDPipeline
    from tinykern.pipelines.sd.tokenizer import clip_tokenizer
    from tinykern.quantize import quantize_
    from tinykern.serialization import layout_of

    folder = Path(folder) if folder is not None else config_dir()
    qconfig = SDQuantConfig.of(quantize)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    for name, module, cfg in (("unet", unet, qconfig.unet_config()),
                              ("text_encoder", text_encoder, qconfig.text_encoder_config())):
        move(module.eval(), "meta", dtype)
        saved = folder / name / WEIGHTS
        if saved.is_file():
            layout_of(module, saved)
        elif cfg is not None:
            quantize_(module, cfg)
    move(vae.eval(), "meta", dtype)
    pipe = TinySDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                          scheduler=_scheduler(folder), safety_checker=None, feature_extractor=None,
                          requires_safety_checker=False)
    pipe._tinykern_plan = {"vae_on_gpu": vae_on_gpu, "vae_decoder_only": vae_decoder_only}
    return pipe


def planned_pipeline(folder=None, quantize=True, vae_on_gpu=True, loras=(), lora_rank=0, merge=False,
                     factor_format=None, sequential_cfg=None, slicing=None, rehash=None, rehash_layers=None):
    """meta_pipeline with a run's memory options applied as the run applies them, ready for plan:
    LoRA files `loras` [(path, scale)] read as meta tensors, then a synthetic LoRA of rank
    `lora_rank` (0: none), both with `merge` and `factor_format`; sequential CFG (None: left as
    built), `slicing` (see TinySDPipeline.enable_slicing), step rehash every `rehash` steps."""
    pipe = meta_pipeline(folder, quantize=quantize, vae_on_gpu=vae_on_gpu)
    for path, scale in loras:
        pipe.load_lora(lora_from_file_meta(path), scale, merge=merge, factor_format=factor_format)
    if lora_rank:
        pipe.load_lora(synthetic_lora(pipe, lora_rank), merge=merge, factor_format=factor_format)
    if sequential_cfg is not None:
        pipe.enable_sequential_cfg(sequential_cfg)
    pipe.enable_slicing(slicing)
    pipe.enable_rehash(rehash, rehash_layers)
    return pipe


def lora_from_file_meta(path):
    """A LoRA file's tensors as meta tensors of their shapes and dtypes (alphas read for real):
    enough to plan its memory without reading its weights."""
    from safetensors import safe_open

    state = {}
    with safe_open(str(Path(path).expanduser()), framework="pt") as f:
        for key in f.keys():
            if key.endswith(".alpha"):
                state[key] = f.get_tensor(key)
            else:
                part = f.get_slice(key)
                state[key] = torch.empty(part.get_shape(), dtype=_DTYPES[part.get_dtype()], device="meta")
    return state


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def synthetic_lora(pipe, rank, device="meta", dtype=torch.float16):
    """A rank-`rank` LoRA state dict (PEFT keys) on every Linear and Conv2d (dense or packed) of
    the UNet and the text encoder: the issue's worst case, for planning and benchmarks. Factors
    are random (`device` "cpu") or empty (meta); the up factors are small so the LoRA is mild."""
    from tinykern.pipelines.sd.lora import _CONVS, _TARGETS, _features

    state = {}
    gen = torch.Generator().manual_seed(0)
    for component in ("unet", "text_encoder"):
        for name, module in getattr(pipe, component).named_modules():
            if not isinstance(module, _TARGETS):
                continue
            out_f, in_f = _features(module)
            kernel = tuple(module.kernel_size) if isinstance(module, _CONVS) else ()
            r = min(rank, out_f, in_f)
            shapes = {"lora_A": (r, in_f, *kernel), "lora_B": (out_f, r, *((1, 1) if kernel else ()))}
            for part, shape in shapes.items():
                if device == "meta":
                    value = torch.empty(shape, dtype=dtype, device="meta")
                else:
                    value = (torch.randn(shape, generator=gen) * (0.01 if part == "lora_B" else 1 / in_f**0.5)).to(dtype)
                state[f"{component}.{name}.{part}.weight"] = value
    return state


# ---------------------------------------------------------------------------------------------
# Kernel models for the meta device


def kernel_models(backend):
    """{op: meta implementation} that allocates what `backend` allocates on a GPU."""
    from tinykern.formats import FORMATS
    from tinykern.kernels import native

    if backend not in ("triton", "cuda", "torch", "cpu"):
        raise ValueError(f"backend must be 'triton', 'cuda', 'torch' or 'cpu', got {backend!r}")
    kinds = ("matmul", "conv2d", "conv2d_grouped", "dequantize")
    if backend == "cpu":  # the CPU kernels themselves: on meta tensors their fake kernels run
        return {fmt.op(kind): backends._IMPLS[(fmt.op(kind), "cpu")] for fmt in FORMATS.values() for kind in kinds}
    models = {}
    for fmt in FORMATS.values():
        # The dequantize kernels allocate their output only (the native ops' fake kernels).
        dequantize = native.native_ops(fmt)[0]
        models[fmt.op("dequantize")] = dequantize
        if backend == "triton":
            # Implicit GEMM: the conv's output only (the stand-in dense weight is made untraced).
            models[fmt.op("matmul")] = _output_only
            models[fmt.op("conv2d")] = models[fmt.op("conv2d_grouped")] = _outside_weight
        else:
            # csrc/cuda/block_matmul.cu fuses at every M; q4k.cu and q8_0.cu dequantize above the GEMV.
            fused = backend == "cuda" and fmt.name not in native.NAMED
            models[fmt.op("matmul")] = _output_only if fused else functools.partial(_dense_matmul, fmt, backend)
            models[fmt.op("conv2d")] = models[fmt.op("conv2d_grouped")] = functools.partial(native.conv2d, dequantize)
    return models


def _output_only(x, w, bias):
    return x.new_empty((x.shape[0], w.shape[0]))


def _dense_matmul(fmt, backend, x, w, bias):
    """The cuda/torch backends' allocations: a GEMV below GEMV_MAX_ROWS on cuda, else the whole
    dequantized weight and the product."""
    if backend == "cuda" and x.shape[0] <= GEMV_MAX_ROWS:
        return x.new_empty((x.shape[0], w.shape[0]))
    dense = x.new_empty((w.shape[0], w.shape[1] // fmt.block_bytes * fmt.block))
    wt = dense.narrow(1, 0, x.shape[1]).t()
    return torch.addmm(bias.to(x.dtype), x, wt) if bias is not None else torch.mm(x, wt)


def _outside_weight(x, w, bias, kernel_size, stride, padding, dilation, groups):
    with torch.utils._python_dispatch._disable_current_modes():
        weight = torch.empty((w.shape[0], x.shape[1] // groups, *kernel_size), dtype=x.dtype, device="meta")
    return F.conv2d(x, weight, None, stride, padding, dilation, groups)


class AttentionModel(torch.overrides.TorchFunctionMode):
    """Routes F.scaled_dot_product_attention on meta tensors to the kernel a GPU would run:
    "flash" (fp16/bf16, head dim a multiple of 8 up to 256, no mask), else "efficient";
    "math" keeps the decomposition that materializes the scores; "cpu" is the CPU's fused
    kernel (to compare a meta trace with a real CPU run)."""

    def __init__(self, kind="flash"):
        super().__init__()
        if kind not in ("flash", "efficient", "math", "cpu"):
            raise ValueError(f"attention must be 'flash', 'efficient', 'math' or 'cpu', got {kind!r}")
        self.kind = kind

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].is_meta and self.kind != "math":
            return self._fused(*args, **kwargs)
        return func(*args, **kwargs)

    def _fused(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if self.kind == "cpu" and attn_mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)[0]
        flash = (self.kind == "flash" and attn_mask is None and q.dtype in (torch.float16, torch.bfloat16)
                 and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)
        if flash:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, False, dropout_p, is_causal,
                                                                      scale=scale)[0]


# ---------------------------------------------------------------------------------------------
# The plan


def weight_bytes(module):
    """Bytes of a module's parameters and buffers as the caching allocator books them (each
    tensor rounded to 512 bytes), each storage counted once."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = (t.untyped_storage()._cdata, t.device)
        if key not in seen:
            seen.add(key)
            total += rounded(t.untyped_storage().nbytes())
    return total


def lora_bytes(pipe):
    """Bytes of the unmerged LoRA branches' factors (rounded per tensor)."""
    return sum(weight_bytes(branch) for lora in pipe.loras if not lora.merged for branch in lora.branches.values())


def plan(pipe, width=512, height=512, guidance=7.5, backend="triton", attention="flash", arch="sm90", steps=2,
         top=8):
    """Trace one run of `pipe` (all on the meta device: see meta_pipeline) at width x height
    and return a MemoryPlan. guidance > 1 is CFG (the UNet sees batch 2, or 2 x 1 with
    sequential CFG). `steps` UNet steps are traced (2 is enough to meet a step-rehash cache)."""
    from tinykern.pipelines.sd.lora import _dtype_of

    unet, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
    options = getattr(pipe, "_tinykern_plan", {"vae_on_gpu": vae.device.type != "cpu", "vae_decoder_only": False})
    dtype = _dtype_of(unet)
    cfg = guidance > 1
    weights = {"unet": weight_bytes(unet), "text encoder": weight_bytes(text_encoder)}
    if options["vae_on_gpu"]:
        weights["vae decoder" if options["vae_decoder_only"] else "vae"] = (
            weight_bytes(vae.decoder) + weight_bytes(vae.post_quant_conv) if options["vae_decoder_only"] else weight_bytes(vae))
    else:
        weights["vae"] = 0
    weights["lora branches"] = lora_bytes(pipe)
    names = {m: f"unet.{n}" if n else "unet" for n, m in unet.named_modules()}
    names.update({m: f"text_encoder.{n}" if n else "text_encoder" for n, m in text_encoder.named_modules()})
    names.update({m: f"vae.{n}" if n else "vae" for n, m in vae.named_modules()})
    names.update({branch: f"lora:{key}" for lora in pipe.loras for key, branch in lora.branches.items()})
    meta = torch.device("meta")
    latent_h, latent_w = height // 8, width // 8
    tokens = pipe.tokenizer.model_max_length
    phases = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(backends.meta_implementations(kernel_models(backend)))
        stack.enter_context(AttentionModel(attention))
        trace = stack.enter_context(MemoryTrace("meta", names))
        # Text: the prompt (and the negative prompt, one call each), kept for the whole run.
        embeds = []
        for _ in range(2 if cfg else 1):
            ids = torch.zeros((1, tokens), dtype=torch.long, device=meta)
            embeds.append(text_encoder(ids)[0])
            del ids
        prompt_embeds = torch.cat(embeds) if cfg else embeds[0]
        del embeds
        phases.append(_phase("text encoder", trace, top))
        trace.reset_peak()
        latents = torch.empty((1, unet.config.in_channels, latent_h, latent_w), dtype=dtype, device=meta)
        rehash = getattr(unet, "_tinykern_rehash", None)
        if rehash is not None:
            rehash.reset()
        for step in range(steps):
            model_input = torch.cat([latents] * 2) if cfg else latents
            t = torch.full((), 999 - step, dtype=torch.long, device=meta)
            noise = unet(model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            if cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance * (cond - uncond)
                del uncond, cond
            latents = latents - noise * 0.1  # the scheduler step: a latent-sized update
            del model_input, noise, t
        phases.append(_phase("denoise", trace, top))
        del prompt_embeds
        trace.reset_peak()
        if options["vae_on_gpu"]:
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
            del image
        phases.append(_phase("decode", trace, top))
    workspace = {f"cuBLAS workspace ({arch})": CUBLAS_WORKSPACE[arch]}
    settings = {"width": width, "height": height, "guidance": guidance, "dtype": str(dtype).removeprefix("torch."),
                "unet_batch": 2 if cfg and not pipe.sequential_cfg else 1,
                "sequential_cfg": bool(pipe.sequential_cfg), "slicing": str(getattr(pipe, "slicing", None)),
                "rehash": getattr(rehash, "interval", None), "backend": backend, "attention": attention,
                "vae_on_gpu": options["vae_on_gpu"], "loras": [repr(lora) for lora in pipe.loras]}
    return MemoryPlan(weights, phases, workspace, settings)


def _phase(name, trace, top):
    return Phase(name, trace.peak, trace.at_peak, trace.largest[:top])


def save(plan_, path):
    Path(path).write_text(json.dumps(plan_.to_json(), indent=1))
