"""The Stable Diffusion 1.5 UNet's layers, by shape only: an nn.Module tree on the meta device with
diffusers' module names and parameter shapes (859,520,964 parameters), plus where each Linear and
Conv2d runs at 512x512 (its input's spatial size, or its tokens per image). No diffusers import,
no weights: building it takes milliseconds.
"""

import dataclasses

import torch
from torch import nn

PARAMETERS = 859_520_964
CHANNELS = (320, 640, 1280, 1280)
TIME_DIM = 1280
CROSS_DIM = 768  # CLIP-L's hidden size
TEXT_TOKENS = 77
LATENT = 64  # 512x512 pixels / the VAE's factor 8


@dataclasses.dataclass(frozen=True)
class Site:
    """Where a layer runs, per image: `label` names its role (shared by every block), `tokens`
    its rows for a Linear, (`height`, `width`) the input of a Conv2d or the feature map a
    transformer's Linear works at (0 for the time embedding's)."""

    label: str
    tokens: int = 0
    height: int = 0
    width: int = 0


def unet():
    """(model, sites): the UNet on the meta device in fp16 and {module path: Site} for every
    Linear and Conv2d in it."""
    sites = {}
    with torch.device("meta"):
        model = _Builder(sites).build()
    return model.half(), sites


class _Builder:
    def __init__(self, sites):
        self.sites = sites

    def build(self):
        root = nn.Module()
        root.conv_in = self.conv("conv_in", 4, CHANNELS[0], 3, LATENT)
        root.time_embedding = nn.Module()
        root.time_embedding.linear_1 = self.linear("time_embedding.linear_1", CHANNELS[0], TIME_DIM, 1)
        root.time_embedding.linear_2 = self.linear("time_embedding.linear_2", TIME_DIM, TIME_DIM, 1)

        # Down: two resnets per level (transformers on the first three), a stride-2 conv on all
        # but the last. `skips` holds the channels of every tensor the up path concatenates.
        root.down_blocks = nn.ModuleList()
        res, cin, skips = LATENT, CHANNELS[0], [CHANNELS[0]]
        for level, cout in enumerate(CHANNELS):
            block = nn.Module()
            block.resnets = nn.ModuleList()
            if level < 3:
                block.attentions = nn.ModuleList()
            for _ in range(2):
                block.resnets.append(self.resnet(cin, cout, res))
                if level < 3:
                    block.attentions.append(self.transformer(cout, res))
                cin = cout
                skips.append(cout)
            if level < 3:
                block.downsamplers = nn.ModuleList([self.sampler("downsample", cout, res, stride=2)])
                res //= 2
                skips.append(cout)
            root.down_blocks.append(block)

        root.mid_block = nn.Module()
        root.mid_block.resnets = nn.ModuleList([self.resnet(cin, cin, res), self.resnet(cin, cin, res)])
        root.mid_block.attentions = nn.ModuleList([self.transformer(cin, res)])

        # Up: three resnets per level, each taking one skip; transformers on the last three
        # levels, an upsampling conv (at the doubled size) on all but the last.
        root.up_blocks = nn.ModuleList()
        for level, cout in enumerate(reversed(CHANNELS)):
            block = nn.Module()
            block.resnets = nn.ModuleList()
            if level > 0:
                block.attentions = nn.ModuleList()
            for _ in range(3):
                block.resnets.append(self.resnet(cin + skips.pop(), cout, res))
                if level > 0:
                    block.attentions.append(self.transformer(cout, res))
                cin = cout
            if level < 3:
                res *= 2
                block.upsamplers = nn.ModuleList([self.sampler("upsample", cout, res, stride=1)])
            root.up_blocks.append(block)

        root.conv_norm_out = nn.GroupNorm(32, CHANNELS[0])
        root.conv_out = self.conv("conv_out", CHANNELS[0], 4, 3, LATENT)
        self._name(root)
        return root

    # Layers are created before their path is known; _name() maps them to paths afterwards.
    def linear(self, label, cin, cout, tokens, res=0, bias=True):
        layer = nn.Linear(cin, cout, bias=bias)
        layer._site = Site(label, tokens=tokens, height=res, width=res)
        return layer

    def conv(self, label, cin, cout, kernel, res, stride=1):
        layer = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)
        layer._site = Site(label, height=res, width=res)
        return layer

    def resnet(self, cin, cout, res):
        m = nn.Module()
        m.norm1 = nn.GroupNorm(32, cin)
        m.conv1 = self.conv("resnet.conv1", cin, cout, 3, res)
        m.time_emb_proj = self.linear("resnet.time_emb_proj", TIME_DIM, cout, 1)
        m.norm2 = nn.GroupNorm(32, cout)
        m.conv2 = self.conv("resnet.conv2", cout, cout, 3, res)
        if cin != cout:
            m.conv_shortcut = self.conv("resnet.conv_shortcut", cin, cout, 1, res)
        return m

    def transformer(self, c, res):
        tokens = res * res
        m = nn.Module()
        m.norm = nn.GroupNorm(32, c)
        m.proj_in = self.conv("proj_in", c, c, 1, res)  # SD1.5 projects with 1x1 convs
        block = nn.Module()
        block.norm1 = nn.LayerNorm(c)
        block.attn1 = self.attention("attn1", c, c, tokens, tokens, res)
        block.norm2 = nn.LayerNorm(c)
        block.attn2 = self.attention("attn2", c, CROSS_DIM, tokens, TEXT_TOKENS, res)
        block.norm3 = nn.LayerNorm(c)
        block.ff = nn.Module()
        geglu = nn.Module()
        geglu.proj = self.linear("ff.geglu", c, 8 * c, tokens, res)
        # net.1 is a parameterless Dropout in diffusers; Identity keeps the indices.
        block.ff.net = nn.ModuleList([geglu, nn.Identity(), self.linear("ff.out", 4 * c, c, tokens, res)])
        m.transformer_blocks = nn.ModuleList([block])
        m.proj_out = self.conv("proj_out", c, c, 1, res)
        return m

    def attention(self, label, c, context, tokens, context_tokens, res):
        m = nn.Module()
        m.to_q = self.linear(f"{label}.to_q", c, c, tokens, res, bias=False)
        m.to_k = self.linear(f"{label}.to_k", context, c, context_tokens, res, bias=False)
        m.to_v = self.linear(f"{label}.to_v", context, c, context_tokens, res, bias=False)
        m.to_out = nn.ModuleList([self.linear(f"{label}.to_out", c, c, tokens, res), nn.Identity()])
        return m

    def sampler(self, label, c, res, stride):
        m = nn.Module()
        # A downsampler's conv reads the full-size input; an upsampler's the doubled one.
        m.conv = self.conv(label, c, c, 3, res, stride=stride)
        return m

    def _name(self, root):
        for path, module in root.named_modules():
            site = module.__dict__.pop("_site", None)
            if site is not None:
                self.sites[path] = site


def sizes():
    """The UNet's bytes in fp16 and after tinykern.quantize_ with its default config (Q4_K for
    every Linear and Conv2d whose row holds at least 128 weights, everything else fp16), and how
    many weights quantize_ packs (rows zero-padded to whole 256-weight blocks)."""
    from tinykern.formats import q4k
    from tinykern.quantize import quantize_, quantized_modules

    model, _ = unet()
    parameters = sum(p.numel() for p in model.parameters())
    fp16 = _state_bytes(model)
    report = quantize_(model)
    packed = [m for _, m in quantized_modules(model)]
    return {
        "parameters": parameters,
        "fp16_bytes": fp16,
        "q4k_bytes": _state_bytes(model),
        "q4k_weight_bytes": sum(m.qweight.numel() for m in packed),
        "q4k_layers": len(packed),
        "dense_layers": {r.name: r.note for r in report if r.format == "dense"},
        "packed_weights": sum(m.qweight.numel() // q4k.BLOCK_BYTES * q4k.BLOCK for m in packed),
    }


def _state_bytes(model):
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
