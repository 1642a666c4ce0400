"""`tinykern sd generate|quantize`: Stable Diffusion 1.x from the command line.

Only argparse and the preset names are imported here, so `tinykern --help` works without the
`sd` extra; diffusers and transformers load when a subcommand runs. Every argument that can be
checked without a model (paths, device, output file, numbers) is checked before one loads; a bad
one is refused in one line with exit code 2 (tinykern.pipelines.cli_checks).
"""

import argparse
import sys
import time

from tinykern.pipelines import cli_checks as checks
from tinykern.pipelines.sd.presets import PRESETS, SCHEDULERS

DEFAULT_STEPS, DEFAULT_GUIDANCE = 25, 7.5


def add_parser(subparsers):
    """Add the `sd` command (with `generate` and `quantize`) to an argparse subparsers object."""
    sd = subparsers.add_parser("sd", help="Stable Diffusion 1.x in little VRAM: generate images, pre-quantize a model")
    commands = sd.add_subparsers(dest="sd_command", required=True)

    gen = commands.add_parser("generate", help="text to image")
    _model_arguments(gen)
    gen.add_argument("--dense", action="store_true", help="keep every weight dense (no quantization)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative", default=None, help="negative prompt")
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                     help="LoRA safetensors (kohya, diffusers or PEFT keys); repeat for several")
    gen.add_argument("--merge-lora", action="store_true", help="merge LoRAs into the weights instead of a side branch")
    gen.add_argument("--preset", choices=sorted(PRESETS), help="scheduler, steps and guidance for a distilled LoRA")
    gen.add_argument("--steps", type=int, help=f"denoising steps (default: the preset's, else {DEFAULT_STEPS})")
    gen.add_argument("--guidance", type=float, help=f"CFG scale (default: the preset's, else {DEFAULT_GUIDANCE})")
    gen.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="default: the preset's, else the model's")
    gen.add_argument("--size", type=_size, default=(512, 512), metavar="WxH", help="image size (default 512x512)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--vae-on-gpu", action="store_true",
                     help="decode on the GPU (sliced; in tiles with --slice off); default on CUDA when the planned peak fits")
    gen.add_argument("--vae-on-cpu", action="store_true", help="decode on the CPU")
    gen.add_argument("--sequential-cfg", action="store_true", help="run the two CFG passes one after the other")
    _memory_arguments(gen)
    _layout_arguments(gen)
    gen.add_argument("--out", required=True, help="output image (.png, .jpg, ...)")
    gen.set_defaults(func=generate)

    mem = commands.add_parser("memory", help="predict peak GPU memory per component (meta-device trace, no weights read)")
    mem.add_argument("--model", help="diffusers or `sd quantize` folder (its configs), or a single file (SD1.5 configs)")
    mem.add_argument("--config", help="config folder (default: the model's, else the shipped SD1.5 configs)")
    mem.add_argument("--dense", action="store_true", help="plan dense weights (no quantization)")
    mem.add_argument("--size", type=_size, default=(512, 512), metavar="WxH")
    mem.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="> 1 plans CFG (UNet batch 2)")
    mem.add_argument("--lora", action="append", default=[], metavar="FILE", help="LoRA safetensors (only shapes are read)")
    mem.add_argument("--lora-rank", type=int, help="plan a rank-R LoRA on every UNet and text-encoder Linear and Conv")
    mem.add_argument("--merge-lora", action="store_true", help="LoRAs merged into the weights (no branch)")
    mem.add_argument("--sequential-cfg", action="store_true")
    mem.add_argument("--vae-on-cpu", action="store_true", help="decode on the CPU (default: plan the VAE on the GPU)")
    mem.add_argument("--backend", choices=("triton", "cuda", "torch"), default="triton",
                     help="tinykern kernels whose allocations to model (default triton: what `auto` runs on a GPU with Triton)")
    mem.add_argument("--attention", choices=("flash", "efficient", "math"), default="flash")
    mem.add_argument("--arch", choices=("sm90", "sm80"), default="sm90", help="for the cuBLAS workspace size")
    mem.add_argument("--json", help="also write the plan to this JSON file")
    _memory_arguments(mem)
    _layout_arguments(mem)
    mem.set_defaults(func=memory)

    quant = commands.add_parser("quantize", help="write a pre-quantized model folder that loads in seconds")
    _model_arguments(quant)
    quant.add_argument("--out", required=True, help="output folder (new, or empty)")
    _layout_arguments(quant)
    quant.set_defaults(func=quantize)
    return sd


def _model_arguments(parser):
    parser.add_argument("--model", required=True,
                        help="diffusers folder, SD1.x single-file .safetensors, whole-model .gguf or `sd quantize` folder")
    parser.add_argument("--unet", help="separate UNet file (.gguf, or .safetensors) replacing the model's UNet")
    parser.add_argument("--config", help="config folder for single files (default: the shipped SD1.5 configs)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")


def _writable():
    from tinykern.formats import FORMATS

    return [name for name, fmt in FORMATS.items() if fmt.quantize is not None]


def _layout_arguments(parser):
    writable = _writable()
    parser.add_argument("--weight", choices=writable, default="q4_k", help="the UNet's format (default q4_k)")
    parser.add_argument("--text-encoder-weight", choices=writable, default="q8_0",
                        help="the CLIP text encoder's format (default q8_0)")
    parser.add_argument("--override", action="append", default=[], metavar="GLOB=FORMAT",
                        help="UNet layers matching GLOB get FORMAT (a format above, or fp16 for dense); repeatable, "
                             "the first match wins")


def _layout(args):
    """The SDQuantConfig that --dense, --weight, --text-encoder-weight and --override name."""
    from tinykern.pipelines.sd.layout import SDQuantConfig
    from tinykern.quantize import DENSE

    if getattr(args, "dense", False):
        return False
    overrides = {}
    for spec in args.override:
        glob, sep, fmt = spec.rpartition("=")
        choices = [*_writable(), DENSE]
        if not sep or not glob or fmt not in choices:
            raise ValueError(f"--override: expected GLOB=FORMAT with FORMAT one of {choices}, got {spec!r}")
        if glob in overrides:
            raise ValueError(f"--override: {glob!r} is given twice")
        overrides[glob] = fmt
    return SDQuantConfig(unet=args.weight, text_encoder=args.text_encoder_weight, unet_overrides=overrides)


def _memory_arguments(parser):
    parser.add_argument("--slice", default="auto", metavar="off|on|auto|unet=N,vae=M",
                        help="feature slicing with operator grouping (default auto: on for CUDA, off on the CPU)")
    parser.add_argument("--rehash", type=int, metavar="N", help="step rehash: a full UNet step every N (default off)")
    parser.add_argument("--rehash-layers", type=int, metavar="K",
                        help="between full steps recompute only the last K resnets of the last up block (default: all of it)")
    parser.add_argument("--lora-format", choices=("fp16", "q8_0"), default="fp16",
                        help="unmerged LoRA factors in the model's dtype (fp16 on a GPU) or Q8_0")


def _slicing(text, cuda):
    from tinykern.pipelines.sd.slicing import parse

    if text.strip().lower() == "auto":
        return parse("on") if cuda else None
    try:
        return parse(text)
    except ValueError as e:
        raise ValueError(f"--slice: {e}") from None


def memory(args):
    from tinykern.pipelines.sd import memory as planner

    with checks.one_line_errors("tinykern sd memory"):
        if args.model is not None:
            args.model = checks.existing("--model", args.model)
        args.config = args.config and checks.existing("--config", args.config, "dir")
        loras = [checks.existing("--lora", path, "file") for path in args.lora]
        checks.at_least("--lora-rank", args.lora_rank, 1)
        checks.at_least("--rehash", args.rehash, 1)
        checks.at_least("--rehash-layers", args.rehash_layers, 1)
        slicing = _slicing(args.slice, cuda=True)
        pipe = _planned_pipeline(args, [(path, 1.0) for path in loras], slicing, vae_on_gpu=not args.vae_on_cpu,
                                 lora_rank=args.lora_rank)
    width, height = args.size
    result = planner.plan(pipe, width, height, args.guidance, backend=args.backend, attention=args.attention, arch=args.arch)
    print(result.report())
    if args.json:
        planner.save(result, args.json)


def _size(text):
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None
    if width % 8 or height % 8 or width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"width and height must be positive multiples of 8, got {text!r}")
    return width, height


GENERATE, QUANTIZE = "tinykern sd generate", "tinykern sd quantize"


def _check_model_arguments(args):
    """Paths with `~` expanded and refused unless they exist; the device refused unless it is
    there. Nothing is loaded."""
    args.model = checks.existing("--model", args.model)
    args.unet = args.unet and checks.existing("--unet", args.unet, "file")
    args.config = args.config and checks.existing("--config", args.config, "dir")
    if args.device is not None:
        checks.device("--device", args.device)


def _load(args, **kwargs):
    from tinykern.pipelines.sd import load_pipeline

    quantize = _layout(args) if hasattr(args, "weight") else not getattr(args, "dense", False)
    return load_pipeline(args.model, device=args.device, quantize=quantize, unet=args.unet, config=args.config, **kwargs)


def _lora_spec(spec):
    """FILE[:SCALE] -> (existing path, scale)."""
    path, _, scale = spec.rpartition(":") if _has_scale(spec) else (spec, "", "1")
    return checks.existing("--lora", path, "file"), float(scale)


def generate(args):
    import torch

    from tinykern.pipelines.sd import apply_preset, make_scheduler

    start = time.perf_counter()
    with checks.one_line_errors(GENERATE):
        _check_model_arguments(args)
        _layout(args)
        args.out = checks.image_file("--out", args.out)
        checks.at_least("--steps", args.steps, 1)
        checks.at_least("--guidance", args.guidance, 0)
        loras = [_lora_spec(spec) for spec in args.lora]
        checks.at_least("--rehash", args.rehash, 1)
        checks.at_least("--rehash-layers", args.rehash_layers, 1)
        cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
        slicing = _slicing(args.slice, cuda)
        factor_format = _factor_format(args)
        predicted = _predict(args, loras, slicing, vae_on_gpu=not args.vae_on_cpu) if cuda else None
        # The VAE decodes on the GPU when asked, or by default when the planned peak fits the GPU.
        vae_on_gpu = not args.vae_on_cpu and (args.vae_on_gpu or (
            predicted is not None and predicted.peak <= 0.9 * torch.cuda.mem_get_info()[0]))
        if cuda and not vae_on_gpu and not args.vae_on_cpu:  # planned with the VAE on the GPU: again without
            predicted = _predict(args, loras, slicing, vae_on_gpu=False)
        pipe = _load(args, vae_on_cpu=not vae_on_gpu, vae_tiling=args.vae_on_gpu and slicing is None,
                     sequential_cfg=args.sequential_cfg)
        for path, scale in loras:
            pipe.load_lora(path, scale, merge=args.merge_lora, factor_format=factor_format)
        pipe.enable_slicing(slicing)
        pipe.enable_rehash(args.rehash, args.rehash_layers)
    call = {"num_inference_steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE}
    if args.preset:
        call.update(apply_preset(pipe, args.preset))
    if args.scheduler:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    if args.steps is not None:
        call["num_inference_steps"] = args.steps
    if args.guidance is not None:
        call["guidance_scale"] = args.guidance
    for label, text in (("prompt", args.prompt), ("negative prompt", args.negative)):
        _warn_if_truncated(pipe.tokenizer, label, text)
    loaded = time.perf_counter()

    cuda = pipe.unet.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # from here: weights loaded, what the planner's peak counts
    step_ends = []

    def on_step_end(pipe_, step, timestep, kwargs):
        step_ends.append(time.perf_counter())
        return kwargs

    width, height = args.size
    t0 = time.perf_counter()
    image = pipe(args.prompt, negative_prompt=args.negative, width=width, height=height,
                 generator=torch.Generator().manual_seed(args.seed), callback_on_step_end=on_step_end, **call).images[0]
    wall = time.perf_counter() - t0
    with checks.one_line_errors(GENERATE):
        checks.save_image(image, args.out)
    steps = len(step_ends)
    denoise = step_ends[-1] - t0 if step_ends else 0.0
    print(f"{args.out}: {width}x{height}, {steps} steps, wall {wall:.2f} s ({denoise / max(steps, 1):.3f} s/step, "
          f"VAE decode on {pipe.vae.device.type} {wall - denoise:.2f} s, load {loaded - start:.1f} s), "
          f"peak VRAM {_vram(cuda)}")
    if cuda:
        print(f"peak allocated: measured {torch.cuda.max_memory_allocated() / 1e9:.3f} GB, predicted by the planner "
              f"{predicted.peak / 1e9:.3f} GB (`tinykern sd memory` with the same options)")


def _predict(args, loras, slicing, vae_on_gpu):
    """The memory planner's plan for this run, on the meta device."""
    from tinykern.pipelines.sd import memory as planner

    pipe = _planned_pipeline(args, loras, slicing, vae_on_gpu=vae_on_gpu)
    width, height = args.size
    guidance = args.guidance if args.guidance is not None else (PRESETS[args.preset].guidance if args.preset
                                                                 else DEFAULT_GUIDANCE)
    return planner.plan(pipe, width, height, guidance)


def _planned_pipeline(args, loras, slicing, vae_on_gpu, lora_rank=0):
    """The run's pipeline on the meta device, for the memory planner: loras [(path, scale)]."""
    from tinykern.pipelines.sd import memory as planner

    return planner.planned_pipeline(planner.config_dir(args.model, args.config), quantize=_layout(args),
                                    vae_on_gpu=vae_on_gpu, loras=loras, lora_rank=lora_rank, merge=args.merge_lora,
                                    factor_format=_factor_format(args),
                                    sequential_cfg=args.sequential_cfg, slicing=slicing, rehash=args.rehash,
                                    rehash_layers=args.rehash_layers)


def _factor_format(args):
    return None if args.lora_format == "fp16" else args.lora_format


def _has_scale(spec):
    head, sep, tail = spec.rpartition(":")
    if not sep or not head:
        return False
    try:
        float(tail)
    except ValueError:
        return False  # a Windows drive letter or a colon in the file name
    return True


def _warn_if_truncated(tokenizer, label, text):
    if not text:
        return
    ids = tokenizer(text).input_ids
    if len(ids) > tokenizer.model_max_length:
        kept = tokenizer.decode(ids[1: tokenizer.model_max_length - 1])
        print(f"warning: the {label} is {len(ids)} tokens; CLIP reads {tokenizer.model_max_length} (with start and end), "
              f"so it is truncated to: {kept!r}", file=sys.stderr)


def _vram(cuda):
    if not cuda:
        return "n/a (CPU)"
    import torch

    text = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
            f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved")
    process = _process_vram()
    return text + (f", process total {process / 2**30:.2f} GiB (driver)" if process is not None else ", driver total n/a")


def _process_vram():
    """This process's GPU memory as the driver counts it (CUDA context included), via NVML."""
    import os

    import torch

    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid():
                return proc.usedGpuMemory
    except Exception:  # no pynvml, no permission, or a driver without per-process accounting
        return None
    return None


def quantize(args):
    import torch

    from tinykern.pipelines.sd import save_pipeline
    from tinykern.pipelines.sd.layout import move

    start = time.perf_counter()
    with checks.one_line_errors(QUANTIZE):
        _check_model_arguments(args)
        _layout(args)
        args.out = checks.new_folder("--out", args.out)
        # Dense weights are stored in float16: the loader casts them to the run's dtype.
        pipe = _load(args, dtype=torch.float16)
        move(pipe.vae, "cpu", torch.float16)
        out = save_pipeline(pipe, args.out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: written in {time.perf_counter() - start:.1f} s, {size / 1e6:.1f} MB")
