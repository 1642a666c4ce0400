"""load_pipeline / save_pipeline: SD1.x from a diffusers folder, an LDM single file, a GGUF
UNet or a tinykern pre-quantized folder, fully offline, in the low-VRAM layout."""

import importlib.util
import json
import logging
import os
import shutil
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from tinykern.formats import DENSE_TYPES, FORMATS
from tinykern.formats.common import quantize_rows
from tinykern.nn import QuantConv2d, QuantLinear
from tinykern.pipelines.sd import ldm
from tinykern.pipelines.sd.layout import SDQuantConfig, move, quantize_on, warn_if_slow
from tinykern.pipelines.sd.pipeline import TinySDPipeline, stage
from tinykern.pipelines.sd.tokenizer import clip_tokenizer
from tinykern.quantize import _replace, quantize_, quantized_modules
from tinykern.serialization import load_quantized, save_quantized

log = logging.getLogger("tinykern.sd")

MARKER = "tinykern_sd.json"  # marks a folder written by save_pipeline
WEIGHTS = "tinykern.safetensors"
COMPONENTS = ("unet", "text_encoder", "vae")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."


def sd15_config_dir():
    """The shipped SD1.5 config folder (model_index.json and one config per component)."""
    return Path(str(resources.files(__package__).joinpath("configs/sd15")))


def load_pipeline(path, *, device=None, dtype=None, quantize=True, unet=None, config=None, vae_on_cpu=True,
                  vae_tiling=False, sequential_cfg=False, slicing=None):
    """A TinySDPipeline for the SD1.x model at `path`, nothing downloaded.

    path: a diffusers folder (unet/, text_encoder/, vae/, ...), an LDM single-file .safetensors,
        a whole-model GGUF (stable-diffusion.cpp naming), or a folder written by save_pipeline.
    unet: optional separate UNet file replacing the UNet of `path`: a GGUF (ComfyUI-GGUF or
        stable-diffusion.cpp naming) or a .safetensors with LDM or diffusers keys.
    device: where the UNet and text encoder run ("cuda" when available, else "cpu").
    dtype: dense weights' and activations' dtype (float16 on a GPU, float32 on the CPU).
    quantize: True for the low-VRAM layout (Q4_K UNet, Q8_0 text encoder), False for dense, or
        an SDQuantConfig. Ignored for a pre-quantized folder, which is loaded as written.
    config: the config folder for single files and GGUF (default: the shipped SD1.5 configs).
    vae_on_cpu: decode on the CPU (latents are moved there); False puts the VAE on `device`.
    vae_tiling: with the VAE on a GPU, decode in tiles.
    sequential_cfg: run the unconditional and conditional UNet passes one after the other.
    slicing: feature slicing with operator grouping (True, a tinykern.pipelines.sd.slicing.Slicing,
        or None: off); see TinySDPipeline.enable_slicing.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    qconfig = SDQuantConfig.of(quantize)
    path = _existing(path)
    with stage("sd.load"):
        kind = _kind(path)
        unet_file = _existing(unet) if unet is not None else (path if kind == "gguf" else None)
        if kind == "tinykern":
            parts = _load_prequantized(path, device)
        else:
            parts = _load_dense(path, kind, Path(config) if config else sd15_config_dir(), unet_file is not None)
        if unet_file is not None:
            parts["unet"] = _load_unet_file(unet_file, parts["unet_config"], qconfig)
        if not isinstance(parts["unet"], torch.nn.Module):  # still only a state dict
            parts["unet"] = _build_unet(parts["unet"], parts["unet_config"])
        for name, cfg in (("unet", qconfig.unet_config()), ("text_encoder", qconfig.text_encoder_config())):
            module = parts[name]
            if kind == "tinykern" or quantized_modules(module):
                move(module, device, dtype)  # already quantized; the dtype applies to dense weights only
            else:
                warn_if_slow(module, cfg, device)
                _, report = quantize_on(module, cfg, device, dtype)
                _log_report(name, report)
        vae_device = torch.device("cpu") if vae_on_cpu else device
        # The CPU decodes in float32: half-precision convs are slow or missing there.
        move(parts["vae"], vae_device, torch.float32 if vae_device.type == "cpu" else dtype)
        if vae_device.type != "cpu":  # text to image only decodes: the encoder stays on the CPU
            move(parts["vae"].encoder, "cpu", torch.float32)
            move(parts["vae"].quant_conv, "cpu", torch.float32)
        pipe = TinySDPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                              unet=parts["unet"], scheduler=parts["scheduler"], safety_checker=None,
                              feature_extractor=None, requires_safety_checker=False)
    if vae_tiling:
        pipe.enable_vae_tiling()
    if sequential_cfg:
        pipe.enable_sequential_cfg()
    if slicing:
        pipe.enable_slicing(slicing)
    return pipe


def save_pipeline(pipe, out_dir):
    """Write `pipe` (quantized) as a folder that load_pipeline reads without re-quantizing:
    per component config.json + tinykern.safetensors, the scheduler config, the tokenizer.

    `out_dir` must be new or an empty folder. The folder is written under a temporary name
    beside it and renamed at the end, so a failed save leaves nothing at `out_dir`."""
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; save_pipeline writes a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir()
        _write_pipeline(pipe, tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_pipeline(pipe, out):
    for name in COMPONENTS:
        module = getattr(pipe, name)
        (out / name).mkdir()
        if name == "text_encoder":  # a transformers config
            module.config.to_json_file(out / name / "config.json")
        else:
            module.save_config(out / name)
        save_quantized(module, out / name / WEIGHTS)
    pipe.scheduler.save_config(out / "scheduler")
    pipe.tokenizer.save_pretrained(out / "tokenizer")
    formats = {name: sorted({m.format.name for _, m in quantized_modules(getattr(pipe, name))}) for name in COMPONENTS}
    (out / MARKER).write_text(json.dumps({"format": "tinykern-sd", "version": 1, "formats": formats}, indent=1))


# ---------------------------------------------------------------------------------------------
# Where the weights come from


def _existing(path):
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"model path {str(path)!r} is not readable")
    return path


def _kind(path):
    if path.is_dir():
        if (path / MARKER).exists():
            return "tinykern"
        if (path / "unet").is_dir():
            return "diffusers"
        raise ValueError(f"{path}: a folder, but neither a diffusers pipeline (no unet/ subfolder) nor one written by "
                         f"`tinykern sd quantize` (no {MARKER})")
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return "gguf"
    if suffix == ".safetensors":
        return "single_file"
    raise ValueError(f"{path}: expected a diffusers folder, a .safetensors single file, a .gguf file or a tinykern "
                     f"folder; .ckpt pickles are not loaded (convert them to safetensors first)")


def _scheduler(folder):
    import diffusers

    sub = folder / "scheduler"
    if not (sub / "scheduler_config.json").exists():
        sub = sd15_config_dir() / "scheduler"
    cfg = diffusers.PNDMScheduler.load_config(sub)
    cls = getattr(diffusers, cfg.get("_class_name", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"{sub}: unknown scheduler class {cfg.get('_class_name')!r}")
    return cls.from_config(cfg)


def _tokenizer(folder):
    sub = folder / "tokenizer"
    if (sub / "vocab.json").exists() or (sub / "tokenizer.json").exists():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(sub, local_files_only=True)
    return clip_tokenizer()


def _load_dense(path, kind, config_dir, skip_unet):
    """Dense components: {"unet": module or state dict, "unet_config", "text_encoder", "vae",
    "tokenizer", "scheduler"}."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if kind == "diffusers":
        # Without accelerate diffusers warns unless told not to build on meta.
        common = dict(local_files_only=True, low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
        unet_config = UNet2DConditionModel.load_config(path / "unet")
        return {
            "unet": {} if skip_unet else UNet2DConditionModel.from_pretrained(path, subfolder="unet", **common),
            "unet_config": unet_config,
            "text_encoder": CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True),
            "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", **common),
            "tokenizer": _tokenizer(path),
            "scheduler": _scheduler(path),
        }
    tensors = _ldm_tensors(path, kind)
    unet_config = UNet2DConditionModel.load_config(config_dir / "unet")
    missing = [p for p in (CLIP_PREFIX, VAE_PREFIX) if not any(k.startswith(p) for k in tensors)]
    if missing:
        raise ValueError(f"{path}: no {' or '.join(missing)} tensors: not a complete SD1.x checkpoint "
                         f"(for a UNet-only file, pass it as unet= beside a complete model)")
    return {
        "unet": {} if skip_unet else _unet_state_from_ldm(tensors, unet_config, path),
        "unet_config": unet_config,
        "text_encoder": _text_encoder_from_ldm(tensors, config_dir),
        "vae": _vae_from_ldm(tensors, config_dir),
        "tokenizer": _tokenizer(config_dir),
        "scheduler": _scheduler(config_dir),
    }


def _ldm_tensors(path, kind):
    """{name: dense float tensor} of a single file (or of a GGUF's non-UNet tensors)."""
    if kind == "gguf":
        from tinykern.io.gguf import read_gguf

        return {t.name: _gguf_dense(path, t) for t in read_gguf(path) if _is_vae_or_clip(t.name)}
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def _is_vae_or_clip(name):
    return name.startswith(VAE_PREFIX) or name.startswith("cond_stage_model.")


def _unet_selector(names):
    """Whole-model files put the UNet under model.diffusion_model. beside other tensors (the
    DDPM schedule, EMA copies); UNet-only files hold nothing else."""
    if any(n.startswith(UNET_PREFIX) for n in names):
        return lambda n: n.startswith(UNET_PREFIX)
    return lambda n: not _is_vae_or_clip(n)


def _unet_state_from_ldm(tensors, unet_config, path):
    """Diffusers-named UNet state dict from LDM keys (with or without model.diffusion_model.),
    or from keys already in diffusers naming."""
    state, unknown = {}, []
    is_unet = _unet_selector(tensors)
    for key, value in tensors.items():
        if not is_unet(key):
            continue
        name = _unet_name(key, unet_config)
        if name is None:
            unknown.append(key)
        else:
            state[name] = value
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} UNet tensors have names that fit neither the LDM nor the diffusers "
                         f"layout of this config, e.g. {unknown[:5]}")
    return state


def _unet_name(key, unet_config):
    bare = key.removeprefix(UNET_PREFIX)
    name = ldm.ldm_to_diffusers(bare, unet_config)
    if name is None and ldm.diffusers_to_ldm(bare, unet_config) is not None:
        name = bare  # already diffusers-named
    return name


def _build_unet(state, unet_config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    _assign(unet, state, "UNet")
    return unet


def _assign(model, state, what):
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"the {what} weights do not fit its config: {e}") from e


def _text_encoder_from_ldm(tensors, config_dir):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    state = convert_ldm_clip_checkpoint({k: v for k, v in tensors.items() if k.startswith("cond_stage_model.")})
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True))
    # Checkpoints have a text_model. level or not, and so do transformers versions' CLIPTextModel.
    level = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    state = {level + k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    _assign(model, state, "text encoder")
    _materialize_position_ids(model)
    return model


def _vae_from_ldm(tensors, config_dir):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = AutoencoderKL.load_config(config_dir / "vae")
    state = convert_ldm_vae_checkpoint({k: v for k, v in tensors.items() if k.startswith(VAE_PREFIX)}, config)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    _assign(vae, state, "VAE")
    return vae


def _materialize_position_ids(model):
    """Non-persistent buffers are not in any file: rebuild CLIP's position ids off the meta device."""
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner = model.get_submodule(name.rpartition(".")[0])
            leaf = name.rpartition(".")[2]
            if leaf != "position_ids":
                raise ValueError(f"buffer {name!r} has no value in the file")
            owner.register_buffer(leaf, torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)


# ---------------------------------------------------------------------------------------------
# GGUF UNets


def _load_unet_file(path, unet_config, qconfig):
    if _kind(path) == "gguf":
        return _unet_from_gguf(path, unet_config, qconfig)
    tensors = _ldm_tensors(path, "single_file")
    return _build_unet(_unet_state_from_ldm(tensors, unet_config, path), unet_config)


def _unet_from_gguf(path, unet_config, qconfig):
    """A UNet built on meta and filled from GGUF tensors; the file decides each layer's format.

    A Linear/Conv2d weight in a format of tinykern.formats.FORMATS is adopted byte for byte when
    its rows (in_features, or in_channels/groups*kh*kw) are whole blocks, ComfyUI-GGUF's reshape
    undone, whatever `qconfig` says of the layer (unless it quantizes nothing: then every weight
    is dequantized). Otherwise `qconfig` decides: a layer it keeps dense is dequantized; one it
    quantizes is re-quantized in the file's format (its blocks straddle output channels: rows
    zero-padded), or quantized from a dense (F16/F32/BF16) weight in the layout's format. A type tinykern cannot run is dequantized by gguf-py, or refused
    naming the tensor where gguf-py cannot either. Each case but the first is one warning line."""
    from diffusers import UNet2DConditionModel

    from tinykern.io.gguf import read_gguf

    everything = list(read_gguf(path))
    is_unet = _unet_selector([t.name for t in everything])
    tensors = {}
    for t in everything:
        if is_unet(t.name):
            name = _unet_name(t.name, unet_config)
            if name is None:
                raise ValueError(f"{path}: tensor {t.name!r} fits neither the LDM nor the diffusers UNet layout")
            tensors[name] = t
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    cfg = qconfig.unet_config()
    state, kinds = {}, {"adopted": [], "requantized": [], "quantized": [], "dequantized": []}
    for name, module in list(unet.named_modules()):
        if type(module) not in (nn.Linear, nn.Conv2d):
            continue
        t = tensors.pop(name + ".weight", None)
        if t is None:
            raise ValueError(f"{path}: no tensor for {name}.weight")
        if tuple(t.shape) != tuple(module.weight.shape):
            raise ValueError(f"{path}: tensor {t.name!r} ({t.type}) has shape {list(t.shape)}, but the UNet's "
                             f"{name}.weight is {list(module.weight.shape)}")
        out, row = module.weight.shape[0], module.weight[0].numel()
        if cfg is not None and t.format is not None and row % t.format.block == 0:
            _replace(unet, name, _quantized_like(module, t.format))
            state[name + ".qweight"] = t.data.reshape(out, -1)  # the file's bytes, ComfyUI's reshape undone
            kinds["adopted"].append(name)
            continue
        planned = cfg.format_for(name, module)[0] if cfg is not None else None
        if planned is None:
            if t.type not in DENSE_NAMES:
                kinds["dequantized"].append(f"{name} ({t.type})")
            state[name + ".weight"] = _gguf_dense(path, t)
            continue
        # Rows that straddle blocks: quantized again, in the file's format where tinykern runs it.
        fmt = t.format or FORMATS[planned]
        kinds["requantized" if t.format is not None else "quantized"].append(f"{name} ({t.type})")
        state[name + ".qweight"] = quantize_rows(fmt, _gguf_dense(path, t).reshape(out, row), f"{path}: {t.name}")
        _replace(unet, name, _quantized_like(module, fmt))
    _report_gguf_layout(path, kinds)
    state.update({n: _gguf_dense(path, t) for n, t in tensors.items()})
    try:
        unet.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: does not fit the UNet config: {e}") from e
    left = [n for n, p in [*unet.named_parameters(), *unet.named_buffers()] if p.is_meta]
    if left:
        raise ValueError(f"{path}: no tensors for {len(left)} UNet weights, e.g. {left[:5]}")
    return unet


DENSE_NAMES = tuple(name.upper() for name in DENSE_TYPES)


def _quantized_like(module, fmt):
    """An empty (meta) QuantLinear/QuantConv2d of `fmt` with the geometry of `module`."""
    bias = module.bias is not None
    if isinstance(module, nn.Conv2d):
        return fmt.conv_class(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                              module.dilation, module.groups, bias, device="meta", format=fmt)
    return fmt.linear_class(module.in_features, module.out_features, bias, device="meta", format=fmt)


def _report_gguf_layout(path, kinds):
    why = {
        "requantized": "dequantized and re-quantized in their own format, rows zero-padded: their rows are not whole "
                       "blocks (the file's blocks straddle output channels)",
        "quantized": "quantized by the layout from the file's dense weights (or from a type tinykern does not run)",
        "dequantized": "dequantized: kept dense (by the layout, whose format could not adopt their blocks, or by "
                       "quantize=False)",
    }
    for kind, reason in why.items():
        names = kinds[kind]
        if names:
            more = f" and {len(names) - 8} more" if len(names) > 8 else ""
            log.warning("%s: %d UNet weights %s: %s%s", path.name, len(names), reason, ", ".join(names[:8]), more)
    log.info("%s: adopted %d packed UNet weights as they are", path.name, len(kinds["adopted"]))


def _gguf_dense(path, t):
    """A GGUFTensor as a float32 tensor of its logical shape, or ValueError naming it when no
    dequantizer knows its type."""
    try:
        return t.dequantize()
    except NotImplementedError as e:
        raise ValueError(f"{path}: tensor {t.name!r} is {t.type}, which neither tinykern nor gguf-py can "
                         f"dequantize ({e})") from None


# ---------------------------------------------------------------------------------------------
# Pre-quantized folders


def _load_prequantized(path, device):
    """Build every component on meta from its config and fill it from its file: no dense UNet
    is ever materialized."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_config = UNet2DConditionModel.load_config(path / "unet")
    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel.from_config(unet_config),
                 "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(path / "text_encoder", local_files_only=True)),
                 "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(path / "vae"))}
    for name, module in parts.items():
        load_quantized(module, path / name / WEIGHTS, device="cpu" if name == "vae" else device)
    _materialize_position_ids(parts["text_encoder"])
    return {**parts, "unet_config": unet_config, "tokenizer": _tokenizer(path), "scheduler": _scheduler(path)}


def _log_report(name, report):
    before, after = report.totals()
    if report and before != after:
        log.info("%s: %.1f MB -> %.1f MB (%d layers quantized)", name, before / 1e6, after / 1e6,
                 sum(r.format != "dense" for r in report))
