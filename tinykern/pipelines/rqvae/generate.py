"""Text -> image with the three models: the generator (Linear layers in Q4_K by default) samples
the codes, the RQ-VAE decodes them through ResidualVQ.decode (tinykern.ops.rvq_decode), the
refiner adds the detail back."""

import resource
import sys
import time
from pathlib import Path

import torch

import tinykern
from tinykern.pipelines.cli_checks import save_image
from tinykern.pipelines.rqvae.train import WEIGHTS, load_generator, load_refiner, load_tokenizer
from tinykern.profile import stage

# Sampling defaults of the CLI, the demo and the tests. Guidance 2 was chosen on the validation
# prompts (validation_prompts() x 2, three sampling seeds; disjoint from the test prompts) with
# the generator before the last fine-tuning cycle: 67 / 79 / 78 / 83 / 80 / 83 / 83 / 86 / 86 / 85 /
# 80% adherence at guidance 0 / 0.5 / 0.75 / 1 / 1.25 / 1.5 / 1.75 / 2 / 2.25 / 2.5 / 3 (temperature
# 1; 83 / 82 / 84% at temperature 0.8 / 0.6 / 0.4). The shipped one, six seeds: 87.5 / 87.1 / 84.1%
# at guidance 1.5 / 2 / 2.5.
GUIDANCE = 2.0
TEMPERATURE = 1.0


def quantize_generator(generator):
    """Every Linear of the generator (text encoder, transformer, depth head) to Q4_K, those of a
    CLIP text model to Q8_0 (as in the SD pipeline); the embeddings and norms stay fp32. Returns
    quantize_'s report."""
    config = tinykern.QuantConfig(weight="q4_k", overrides={"text.clip.*": "q8_0"}, min_features=128, convs=False)
    return tinykern.quantize_(generator, config)


class Pipeline:
    def __init__(self, tokenizer, refiner, generator, words, device="cpu"):
        self.device = torch.device(device)
        self.tokenizer = tokenizer.to(self.device).eval()
        self.refiner = refiner.to(self.device).eval() if refiner is not None else None
        self.generator = generator.to(self.device).eval()
        self.words = words
        self.quant_report = None

    @classmethod
    def load(cls, weights=None, quantize=True, device="cpu", text_encoder=None):
        """The models in `weights` (a directory with tokenizer/refiner/generator.safetensors;
        default: the shipped ones); with `quantize` the generator's Linear layers become Q4_K.
        `text_encoder`: the CLIP text model folder of a generator trained over one, when it is
        no longer where training found it."""
        root = Path(weights).expanduser() if weights else WEIGHTS
        generator, words = load_generator(root / "generator.safetensors", text_encoder)
        refiner = load_refiner(root / "refiner.safetensors") if (root / "refiner.safetensors").is_file() else None
        pipe = cls(load_tokenizer(root / "tokenizer.safetensors"), refiner, generator, words, device)
        if quantize:
            pipe.quant_report = quantize_generator(pipe.generator)
        return pipe

    @torch.no_grad()
    def codes(self, prompts, seed=0, guidance=GUIDANCE, temperature=TEMPERATURE):
        ids = self.words(prompts).to(self.device)
        null = self.words([""]).to(self.device)
        gen = torch.Generator(self.device).manual_seed(seed)
        with stage("rqvae.generate_tokens"):
            return self.generator.generate(ids, null, guidance=guidance, temperature=temperature, generator=gen)

    @torch.no_grad()
    def decode(self, codes, refine=True):
        with stage("rqvae.decode"):
            images = self.tokenizer.decode(codes).clamp(0, 1)
        if refine and self.refiner is not None:
            with stage("rqvae.refine"):
                images = self.refiner(images).clamp(0, 1)
        return images

    def generate(self, prompts, seed=0, guidance=GUIDANCE, temperature=TEMPERATURE, refine=True):
        """(images [N, 3, R, R] in [0, 1], stats: seconds, images_per_s, peak_memory_mb,
        memory_kind)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        images = self.decode(self.codes(prompts, seed, guidance, temperature), refine)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        return images.cpu(), {"seconds": seconds, "images_per_s": len(prompts) / seconds, **peak_memory(self.device)}


def peak_memory(device):
    """Peak GPU memory allocated by torch on CUDA; on the CPU the process's peak resident set
    (everything: Python, torch's libraries, the models)."""
    if torch.device(device).type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "memory_kind": "peak CUDA allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_mb": rss / (2**20 if sys.platform == "darwin" else 2**10), "memory_kind": "peak process RSS"}


def save_grid(images, path, columns=None, scale=None):
    """Images [N, 3, H, W] in [0, 1] as one image grid (format from `path`'s extension, written
    atomically), `columns` wide (default up to 8), enlarged by nearest neighbour to at least
    128 px per cell."""
    from PIL import Image

    n, _, h, w = images.shape
    columns = columns or min(n, 8)
    rows = -(-n // columns)
    scale = scale or max(1, 128 // h)
    pad = 2
    grid = torch.ones(3, rows * (h * scale + pad) + pad, columns * (w * scale + pad) + pad)
    big = torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="nearest")
    for i in range(n):
        r, c = divmod(i, columns)
        y, x = pad + r * (h * scale + pad), pad + c * (w * scale + pad)
        grid[:, y:y + h * scale, x:x + w * scale] = big[i]
    data = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous().numpy()
    return save_image(Image.fromarray(data), path)
