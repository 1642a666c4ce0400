"""Training of the three stages: tokenizer (RQVAE), refiner, generator.

Each stage writes `<out>/<stage>.safetensors` (weights + config in the metadata; what
`load_*` reads), `<out>/<stage>-last.safetensors` every `checkpoint_every` steps (weights,
AdamW state and step, for `resume`) and `<out>/<stage>-metrics.jsonl`.
"""

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tinykern.pipelines import cli_checks as checks
from tinykern.pipelines.rqvae import data as rqdata
from tinykern.pipelines.rqvae.models import (PRESETS, RQVAE, Refiner, TokenGenerator, count_parameters, refiner_downsample,
                                             tokenizer_downsample)

STAGES = ("tokenizer", "refiner", "generator")
WEIGHTS = Path(__file__).parent / "weights"


# ---- saving and loading ----------------------------------------------------------------------

def save_model(path, stage, model, extra=None, optimizer=None, step=None):
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    tensors[f"optim.{names[id(p)]}.{key}"] = value.detach().reshape(-1).contiguous() if key == "step" \
                        else value.detach().contiguous()
    meta = {"stage": stage, "config": json.dumps(model.config), **(extra or {})}
    if step is not None:
        meta["step"] = str(step)
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)  # a run killed mid-write must not leave a truncated checkpoint


def _read(path, stage):
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rqvae: no {stage} weights at {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("stage") != stage:
        raise ValueError(f"rqvae: {path} holds {meta.get('stage')!r} weights, expected {stage!r}")
    tensors = load_file(str(path))
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    optim = {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}
    return meta, model, optim


def load_tokenizer(path=None):
    meta, state, _ = _read(path or WEIGHTS / "tokenizer.safetensors", "tokenizer")
    model = RQVAE(json.loads(meta["config"]))
    model.load_state_dict(state)
    return model.eval()


def load_refiner(path=None):
    meta, state, _ = _read(path or WEIGHTS / "refiner.safetensors", "refiner")
    model = Refiner(json.loads(meta["config"]))
    model.load_state_dict(state)
    return model.eval()


def load_generator(path=None, text_encoder=None):
    """(TokenGenerator, its prompt tokenizer) from a generator checkpoint. A generator trained
    over a CLIP text model reads that model from the folder recorded at training time, or from
    `text_encoder` when given (the CLIP weights are not in the checkpoint)."""
    meta, state, _ = _read(path or WEIGHTS / "generator.safetensors", "generator")
    config = json.loads(meta["config"])
    if meta.get("text_tokenizer") == "clip":
        tokenizer = rqdata.ClipBPETokenizer(config["text_length"])
    else:
        tokenizer = rqdata.WordTokenizer(json.loads(meta["vocab"]), max_length=config["text_length"])
    keys = ("dim", "depth", "heads", "mlp", "text_depth", "text_length", "clip_text_model")
    arch = {k: config[k] for k in keys if k in config}
    if text_encoder is not None:
        arch["clip_text_model"] = str(text_encoder)
    model = TokenGenerator(arch, config["vocab_size"], config["grid"], config["codebook_size"], config["num_levels"],
                           config["code_dim"])
    model.load_state_dict(state)
    return model.eval(), tokenizer


# ---- metrics ---------------------------------------------------------------------------------

def psnr(a, b):
    """Mean PSNR in dB of images in [0, 1] (clamped), per image then averaged."""
    mse = (a.detach().clamp(0, 1) - b.clamp(0, 1)).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def perceptual_loss(a, b):
    """1 - SSIM (pytorch-msssim; weight-free, so it works offline), window 11, or 7 under 128 px.
    Single-scale: MS-SSIM raises per-scale terms to fractional powers, whose gradient at 0 is
    infinite, and it went NaN within 100 steps in training here."""
    from pytorch_msssim import ssim

    win = 11 if min(a.shape[-2:]) >= 128 else 7
    return 1 - ssim(a.clamp(0, 1).float(), b.clamp(0, 1).float(), data_range=1.0, win_size=win, nonnegative_ssim=True)


@torch.no_grad()
def tokenizer_metrics(model, images, captions=None):
    """PSNR of the reconstruction from the first l levels (l = 1..levels) and codebook usage
    (fraction of codes used) per level, on `images`; with synthetic `captions`, also the share of
    full reconstructions the adherence checker passes (the ceiling for generated images)."""
    model.eval()
    codes = model.encode(images)
    out = {}
    for level in range(1, codes.shape[-1] + 1):
        recon = model.decode(codes[..., :level])
        out[f"psnr_l{level}"] = psnr(recon, images)
    if captions is not None:
        out["checker_real_codes"] = sum(rqdata.check_adherence(im, c)["all"]
                                        for im, c in zip(recon.clamp(0, 1), captions)) / len(captions)
    k = model.config["codebook_size"]
    for level in range(codes.shape[-1]):
        out[f"usage_l{level + 1}"] = codes[..., level].unique().numel() / k
    return out


@torch.no_grad()
def refiner_metrics(tokenizer, refiner, images):
    tokenizer.eval(), refiner.eval()
    recon = tokenizer.decode(tokenizer.encode(images)).clamp(0, 1)
    refined = refiner(recon).clamp(0, 1)
    return {"psnr_rqvae": psnr(recon, images), "psnr_refined": psnr(refined, images),
            "l1_rqvae": float((recon - images).abs().mean()), "l1_refined": float((refined - images).abs().mean()),
            "ssim_loss_rqvae": float(perceptual_loss(recon, images)),
            "ssim_loss_refined": float(perceptual_loss(refined, images))}


# ---- progress --------------------------------------------------------------------------------

class _Printer:
    """The fallback progress display when tqdm is not installed: a line every `every` steps."""

    def __init__(self, total, initial, desc, every=20):
        self.n, self.total, self.desc, self.every, self.start = initial, total, desc, every, time.time()
        self.postfix = ""

    def update(self, k=1):
        self.n += k
        if self.n % self.every == 0 or self.n == self.total:
            rate = (self.n) / max(time.time() - self.start, 1e-9)
            print(f"{self.desc} {self.n}/{self.total} ({rate:.2f} steps/s) {self.postfix}", flush=True)

    def set_postfix_str(self, s):
        self.postfix = s

    def close(self):
        pass


def _progress(total, initial, desc):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Printer(total, initial, desc)
    return tqdm(total=total, initial=initial, desc=desc, mininterval=2.0)


# ---- the loop --------------------------------------------------------------------------------

def train(stage, data="synthetic", out="rqvae-run", steps=1000, batch_size=32, lr=None, preset="shipped",
          resolution=None, tokenizer=None, checkpoint_every=200, eval_every=200, resume=False, seed=0,
          bf16=False, text_tokenizer="word", text_encoder=None, init=None, log=print):
    """Train one stage and return the last metrics logged. Every `eval_every` steps the held-out
    evaluation runs and its metrics are logged with the loss; the last step logs its loss, and
    is evaluated only when `eval_every` divides `steps` (at 256x256 an evaluation costs as much
    as many training steps). `tokenizer` is the RQ-VAE checkpoint the refiner and generator
    stages read (default: `<out>/tokenizer.safetensors` if present; else, with the shipped
    preset only, the shipped one: another preset's stages refuse to run without a tokenizer of
    their own). Arguments, the tokenizer and the data are checked before `out` is created.
    `bf16` runs the forward passes under bfloat16 autocast (the weights and the optimizer stay
    fp32; ResidualVQ always quantizes in fp32). `text_tokenizer` (generator):
    "word" (a vocabulary of the training captions' words) or "clip" (CLIP's BPE, 49,408 tokens:
    12.6M embedding parameters at dim 256). `text_encoder` (generator): a folder with a
    transformers CLIPTextModel to condition on, frozen, instead of the small trainable text
    encoder (implies the CLIP tokenizer). `init`: a trained checkpoint of this stage and
    configuration to start from (fine-tuning: a fresh optimizer and learning-rate schedule;
    `resume` takes precedence when there is a checkpoint to resume)."""
    _check_arguments(stage, preset, steps, batch_size, lr, checkpoint_every, eval_every, text_tokenizer)
    out = Path(out).expanduser()
    torch.manual_seed(seed)
    config = PRESETS[preset]

    vq = None
    if stage != "tokenizer":
        vq = load_tokenizer(_tokenizer_path(stage, preset, out, tokenizer, log))
        for p in vq.parameters():
            p.requires_grad_(False)
        resolution = vq.config["resolution"]
    else:
        resolution = resolution or config["tokenizer"]["resolution"]
        _check_resolution(resolution, config)
    if data != "synthetic":
        data = Path(data).expanduser()
    dataset = rqdata.open_dataset(data, resolution, seed=seed)
    heldout = rqdata.SyntheticShapes(resolution, seed=seed + 1, split="heldout") if data == "synthetic" else dataset
    eval_images, eval_captions = heldout.batch(range(64 if data == "synthetic" else min(64, len(dataset))))

    extra = {}
    if stage == "tokenizer":
        model = RQVAE({**config["tokenizer"], "resolution": resolution})
    elif stage == "refiner":
        model = Refiner(config["refiner"])
    else:
        length = config["generator"]["text_length"]
        arch = dict(config["generator"])
        if text_encoder is not None:
            arch["clip_text_model"] = str(Path(text_encoder).expanduser().resolve())
            text_tokenizer = "clip"
        if text_tokenizer == "clip":
            words = rqdata.ClipBPETokenizer(length)
            extra["text_tokenizer"] = "clip"
        else:
            words = rqdata.WordTokenizer.default() if data == "synthetic" else \
                rqdata.WordTokenizer.from_captions([c for _, c in dataset.items])
            words.max_length = length
            extra.update(text_tokenizer="word", vocab=json.dumps(words.words))
        books = vq.quantizer.level_codebooks()
        model = TokenGenerator(arch, len(words), vq.grid, books.shape[1], books.shape[0], books.shape[2])
        model.set_codebooks(books)
    lr = lr or {"tokenizer": 2e-3, "refiner": 1e-3, "generator": 1e-3}[stage]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # not a frozen CLIP
    decay = [p for n, p in trainable if p.dim() >= 2 and "embed" not in n and "pos" not in n]
    rest = [p for n, p in trainable if not (p.dim() >= 2 and "embed" not in n and "pos" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))

    start = 0
    last = out / f"{stage}-last.safetensors"
    if resume and last.is_file():
        start = _resume(last, stage, model, optimizer, extra)
        log(f"rqvae {stage}: resumed from {last} at step {start}")
    elif init:
        init = Path(init).expanduser()
        _matching(init, stage, model, extra)
        log(f"rqvae {stage}: starting from the weights in {init}")
    elif resume:
        log(f"rqvae {stage}: nothing to resume at {last}; starting fresh")
    log(f"rqvae {stage}: {count_parameters(model):,} parameters, data={data}, resolution={resolution}, "
        f"batch={batch_size}, steps={steps}, lr={lr}")

    out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no folder behind
    metrics_file = open(out / f"{stage}-metrics.jsonl", "a")
    gen = torch.Generator().manual_seed(seed * 7919 + start)
    bar = _progress(steps, start, f"rqvae {stage}")
    metrics = {}
    warmup = min(100, max(steps // 10, 1))
    began = time.time()
    try:
        for step in range(start, steps):
            model.train()
            scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in optimizer.param_groups:
                group["lr"] = lr * max(scale, 0.02)
            # Sample indices from a per-step generator so that a resumed run sees new batches.
            indices = torch.randint(0, 2**31 - 1 if data == "synthetic" else len(dataset), (batch_size,), generator=gen).tolist()
            images, captions = dataset.batch(indices)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, parts = _step(stage, model, vq, words if stage == "generator" else None, images, captions, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            bar.update(1)
            bar.set_postfix_str(f"loss={loss.item():.4f}")
            done = step + 1
            evaluate = done % eval_every == 0
            if evaluate or done == steps:
                metrics = {"step": done, "loss": loss.item(), **parts, "seconds": round(time.time() - began, 1)}
                if evaluate and stage == "tokenizer":
                    metrics.update(tokenizer_metrics(model, eval_images, eval_captions if data == "synthetic" else None))
                elif evaluate and stage == "refiner":
                    metrics.update(refiner_metrics(vq, model, eval_images))
                metrics_file.write(json.dumps(metrics) + "\n")
                metrics_file.flush()
                log(f"rqvae {stage} step {done}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                            for k, v in metrics.items()))
            if done % checkpoint_every == 0 or done == steps:
                save_model(last, stage, model, extra, optimizer, done)
    finally:
        bar.close()
        metrics_file.close()
    save_model(out / f"{stage}.safetensors", stage, model.eval(), extra)
    return metrics


def _check_arguments(stage, preset, steps, batch_size, lr, checkpoint_every, eval_every, text_tokenizer):
    if stage not in STAGES:
        raise ValueError(f"rqvae train: stage must be one of {STAGES}, got {stage!r}")
    if preset not in PRESETS:
        raise ValueError(f"rqvae train: preset must be one of {list(PRESETS)}, got {preset!r}")
    if text_tokenizer not in ("word", "clip"):
        raise ValueError(f"rqvae train: text_tokenizer must be 'word' or 'clip', got {text_tokenizer!r}")
    for flag, value in (("--steps", steps), ("--batch-size", batch_size), ("--checkpoint-every", checkpoint_every),
                        ("--eval-every", eval_every)):
        checks.at_least(flag, value, 1)
    checks.positive("--lr", lr)


def _tokenizer_path(stage, preset, out, tokenizer, log):
    """The RQ-VAE checkpoint the refiner and generator stages read: `tokenizer`, else
    OUT/tokenizer.safetensors, else (shipped preset only, saying so) the shipped one."""
    if tokenizer:
        return Path(tokenizer).expanduser()
    trained = out / "tokenizer.safetensors"
    if trained.is_file():
        return trained
    if preset != "shipped":
        raise ValueError(f"the {stage} stage with --preset {preset} needs a {preset} tokenizer and there is no "
                         f"{trained}: train one first (`tinykern rqvae train tokenizer --preset {preset} --out {out}`) "
                         f"or pass --tokenizer WEIGHTS")
    log(f"rqvae {stage}: no {trained}; reading the shipped tokenizer")
    return WEIGHTS / "tokenizer.safetensors"


def _check_resolution(resolution, config):
    """The image side must divide into the tokenizer's code grid and the refiner's levels."""
    step = math.lcm(tokenizer_downsample(config["tokenizer"]), refiner_downsample(config["refiner"]))
    if not (isinstance(resolution, int) and resolution > 0 and resolution % step == 0):
        raise ValueError(f"--resolution {resolution}: must be a positive multiple of {step} "
                         f"for this preset's tokenizer and refiner")


def _step(stage, model, vq, words, images, captions, gen):
    """(loss, logged parts) of one training batch."""
    if stage == "tokenizer":
        return _tokenizer_step(model, images, gen)
    if stage == "refiner":
        with torch.no_grad():
            recon = vq.decode(vq.encode(images))
        refined = model(recon).float()
        l1 = F.l1_loss(refined, images)
        perc = perceptual_loss(refined, images)
        return l1 + 0.5 * perc, {"l1": l1.item(), "perceptual": perc.item()}
    with torch.no_grad():
        codes = vq.encode(images).flatten(1, 2)
    # Classifier-free guidance: a tenth of the prompts are replaced by the empty prompt.
    keep = torch.rand(len(captions), generator=gen) > 0.1
    return model.loss(codes, words([c if k else "" for c, k in zip(captions, keep)])), {}


def _tokenizer_step(model, images, gen):
    """Reconstruction loss of half the batch from the full code stack, of the other half from
    its first l < L levels (straight-through to the encoder) so that partial decodes are
    pictures too."""
    latent = model.encode_latent(images)
    quantized, codes, commit = model.quantizer(latent)
    levels = codes.shape[-1]
    pick = torch.randint(1, levels, (images.shape[0],), generator=gen)
    pick = torch.where(torch.rand(images.shape[0], generator=gen) < 0.5, pick, torch.full_like(pick, levels))
    partial = torch.stack([model.quantizer.decode(codes[..., :level]) for level in range(1, levels)] + [quantized.detach()])
    chosen = partial[pick - 1, torch.arange(images.shape[0])]
    mixed = torch.where((pick == levels)[:, None, None, None], quantized, chosen + (latent - latent.detach()))
    recon = model.decode_latent(mixed).float()
    mse, l1 = F.mse_loss(recon, images), F.l1_loss(recon, images)
    return mse + l1 + commit, {"mse": mse.item(), "l1": l1.item(), "commit": commit.item()}


def _matching(path, stage, model, extra):
    """Load into `model` the weights of a checkpoint with the same config (and, for a word-level
    generator, the same vocabulary); (metadata, optimizer state)."""
    meta, state, optim = _read(path, stage)
    if json.loads(meta["config"]) != model.config:
        raise ValueError(f"rqvae: cannot start from {path}: its config {meta['config']} differs from {model.config}")
    if meta.get("vocab") != extra.get("vocab"):
        raise ValueError(f"rqvae: cannot start from {path}: its prompt vocabulary differs from this run's")
    model.load_state_dict(state)
    return meta, optim


def _resume(path, stage, model, optimizer, extra):
    meta, optim = _matching(path, stage, model, extra)
    params = dict(model.named_parameters())
    for key, value in optim.items():
        name, _, slot = key.rpartition(".")
        p = params[name]
        optimizer.state[p][slot] = value.reshape(()) if slot == "step" else value
    return int(meta["step"])
