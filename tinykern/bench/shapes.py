"""The shapes the benchmarks run, shared by bench/*.py and `python -m tinykern.bench`.

Three sets: "full" (every distinct SD1.5 UNet Linear/Conv2d shape at 512x512 with classifier-free
guidance, CLIP-L, RQ-VAE, LLM GEMV/GEMM shapes; the default on a GPU or with
TINYKERN_BENCH_FULL=1), "small" (a few of each that a CPU runs in minutes; the CPU default) and
"tiny" (seconds; smoke tests). Every format runs the same matmul, conv2d and quantize shapes, so
rows compare across formats. Case ids are stable: pytest-benchmark's --benchmark-compare and
the JSON results match rows across runs by them.
"""

import dataclasses
import functools
import os

from torch import nn

from tinykern.bench import sd15

SETS = ("tiny", "small", "full")
CFG = 2  # classifier-free guidance runs the UNet on a batch of 2
LLM_SHAPES = ((4096, 4096), (11008, 4096), (4096, 14336))  # (N, K): 4096x4096, 4096x11008, 14336x4096
LLM_ROWS = (1, 8, 64, 512, 8192)


@dataclasses.dataclass(frozen=True)
class MatmulCase:
    """x [m, k] @ W[n, k].T (+ bias): `layers` counts the model layers sharing this shape."""

    name: str
    m: int
    n: int
    k: int
    bias: bool = True
    layers: int = 1

    @property
    def id(self):
        return f"{self.name}-M{self.m}-N{self.n}-K{self.k}"

    def shape(self):
        return {"M": self.m, "N": self.n, "K": self.k, "bias": self.bias}


@dataclasses.dataclass(frozen=True)
class ConvCase:
    """conv2d of x [batch, cin, height, width] with a [cout, cin, kernel, kernel] weight."""

    name: str
    batch: int
    cin: int
    cout: int
    height: int
    width: int
    kernel: int
    stride: int = 1
    layers: int = 1

    @property
    def padding(self):
        return self.kernel // 2

    @property
    def out_hw(self):
        return tuple((size + 2 * self.padding - self.kernel) // self.stride + 1 for size in (self.height, self.width))

    @property
    def id(self):
        return (f"{self.name}-B{self.batch}-C{self.cin}-O{self.cout}-{self.height}x{self.width}"
                f"-k{self.kernel}s{self.stride}")

    def shape(self):
        return {"B": self.batch, "C_in": self.cin, "C_out": self.cout, "H": self.height, "W": self.width,
                "kernel": self.kernel, "stride": self.stride, "padding": self.padding}


@dataclasses.dataclass(frozen=True)
class RVQCase:
    """Residual VQ of n vectors of dim d against `levels` codebooks of k codes."""

    n: int
    d: int
    k: int
    levels: int

    @property
    def name(self):
        return "rvq"

    @property
    def id(self):
        return f"rvq-N{self.n}-D{self.d}-K{self.k}-L{self.levels}"

    def shape(self):
        return {"N": self.n, "D": self.d, "K": self.k, "L": self.levels}


@dataclasses.dataclass(frozen=True)
class QuantizeCase:
    """Quantizing one weight [rows, cols] (cols a multiple of the format's block)."""

    name: str
    rows: int
    cols: int

    @property
    def id(self):
        return f"{self.name}-{self.rows}x{self.cols}"

    def shape(self):
        return {"rows": self.rows, "cols": self.cols}


def default_set(device_type):
    """"full" on a GPU or with TINYKERN_BENCH_FULL=1, else "small"."""
    return "full" if device_type == "cuda" or os.environ.get("TINYKERN_BENCH_FULL") == "1" else "small"


def matmul(which):
    """x @ W.T shapes, the same for every format: SD1.5 UNet and CLIP-L layers, LLM GEMV/GEMM."""
    if which == "tiny":
        return [MatmulCase("tiny", 4, 256, 512), MatmulCase("tiny.padded", 16, 128, 320)]
    if which == "small":
        sd, clip = _by_name(sd15_linears()), _by_name(CLIP_L)
        return [sd["sd15.ff.geglu@64x64"], sd["sd15.attn1.to_q@16x16"], clip["clip-l.attn.q_proj"],
                clip["clip-l.mlp.fc1"], clip["clip-l.mlp.fc2"], MatmulCase("llm", 1, 4096, 4096, bias=False),
                MatmulCase("llm", 512, 4096, 4096, bias=False)]
    return sd15_linears() + CLIP_L + llm()


def conv2d(which):
    """conv2d shapes, the same for every format: SD1.5 UNet convs (batch 2 for CFG), RQ-VAE's decoder."""
    if which == "tiny":
        return [ConvCase("tiny", 1, 32, 64, 8, 8, 3), ConvCase("tiny.1x1", 1, 320, 64, 8, 8, 1)]
    if which == "small":
        sd, rq = _by_name(sd15_convs()), _by_name(RQVAE_CONVS)
        return [sd["sd15.resnet.conv2@32x32"], sd["sd15.proj_in@64x64"], sd["sd15.downsample@64x64"],
                rq["rqvae.dec.conv3x3@16x16"]]
    return sd15_convs() + RQVAE_CONVS


def rvq(which):
    if which == "tiny":
        return [RVQCase(256, 16, 64, 2)]
    if which == "small":
        return [RVQCase(4096, d, 1024, 4) for d in (64, 256)] + [RVQCase(512, d, 16384, 4) for d in (64, 256)]
    # RQ-VAE's own setting is D=256, K=16,384 shared across 4 depths; 65,536 vectors are a
    # batch of 1,024 images at 8x8 positions. D=64/K=1024 is the audio-codec-like setting.
    return [RVQCase(65536, d, k, 4) for d in (64, 256) for k in (1024, 16384)]


def quantize(which):
    """Weights to time the quantizers on: SD1.5 UNet weights as quantize_ packs them. Every
    width is a whole number of blocks of every format (multiples of 256)."""
    if which == "tiny":
        return [QuantizeCase("tiny", 64, 512)]
    if which == "small":
        return [QuantizeCase("sd15.attn1.to_q@16x16", 1280, 1280), QuantizeCase("llm.4096x4096", 4096, 4096)]
    return [QuantizeCase("sd15.resnet.conv1@8x8", 1280, 11520)]  # 1280*9 = 11520 = 45 blocks


# CLIP ViT-L/14's text encoder with CFG: 2 prompts x 77 tokens.
CLIP_L = [
    MatmulCase("clip-l.attn.q_proj", CFG * sd15.TEXT_TOKENS, 768, 768, layers=12 * 4),  # q, k, v, out
    MatmulCase("clip-l.mlp.fc1", CFG * sd15.TEXT_TOKENS, 3072, 768, layers=12),
    MatmulCase("clip-l.mlp.fc2", CFG * sd15.TEXT_TOKENS, 768, 3072, layers=12),
]

# RQ-VAE (ch 128, ch_mult 1,1,2,2,4,4, 256x256 -> 8x8): its decoder's convs for one image, from
# the 8x8 latent (512 channels) up to 256x256 (128 channels); the mid-block attention is 1x1 convs.
RQVAE_CONVS = [
    ConvCase("rqvae.dec.conv_in", 1, 256, 512, 8, 8, 3),
    ConvCase("rqvae.dec.conv3x3@8x8", 1, 512, 512, 8, 8, 3, layers=8),
    ConvCase("rqvae.dec.attn1x1@8x8", 1, 512, 512, 8, 8, 1, layers=4),
    ConvCase("rqvae.dec.conv3x3@16x16", 1, 512, 512, 16, 16, 3, layers=7),
    ConvCase("rqvae.dec.conv3x3@64x64", 1, 256, 256, 64, 64, 3, layers=7),
    ConvCase("rqvae.dec.conv3x3@256x256", 1, 128, 128, 256, 256, 3, layers=6),
]


def llm():
    return [MatmulCase("llm", m, n, k, bias=False) for n, k in LLM_SHAPES for m in LLM_ROWS]


@functools.cache
def _sd15_layers():
    """(linears, convs): SD1.5's distinct shapes among the layers quantize_ converts by default."""
    from tinykern.quantize import QuantConfig

    model, sites = sd15.unet()
    config = QuantConfig()
    linears, convs = {}, {}
    for path, module in model.named_modules():
        if path not in sites or config.format_for(path, module)[0] is None:
            continue
        site = sites[path]
        name = f"sd15.{site.label}@{site.height}x{site.width}" if site.height else f"sd15.{site.label}"
        if isinstance(module, nn.Linear):
            _count(linears, (CFG * site.tokens, module.out_features, module.in_features), name,
                   bias=module.bias is not None)
        else:
            key = (module.in_channels, module.out_channels, site.height, site.width, module.kernel_size[0], module.stride[0])
            _count(convs, key, name)
    return (
        [MatmulCase(v["name"], *key, bias=v["bias"], layers=v["layers"]) for key, v in linears.items()],
        [ConvCase(v["name"], CFG, *key[:4], kernel=key[4], stride=key[5], layers=v["layers"]) for key, v in convs.items()],
    )


def sd15_linears():
    return list(_sd15_layers()[0])


def sd15_convs():
    return list(_sd15_layers()[1])


def _count(table, key, name, **fields):
    # The first layer of a shape names it; the others only add to its count.
    entry = table.setdefault(key, {"name": name, "layers": 0, **fields})
    entry["layers"] += 1


def _by_name(cases):
    # Several shapes can share a name (the first layer of each); take the first.
    found = {}
    for c in cases:
        found.setdefault(c.name, c)
    return found
