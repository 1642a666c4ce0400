"""The three trainable models: RQVAE (image <-> residual codes), Refiner (a UNet restoring what
the codes lose) and TokenGenerator (text -> codes, autoregressive over positions).

Each takes a plain dict config so that it can be saved as safetensors metadata; the `STANDARD`
configs are the documented 256x256 -> 16x16x4 system, the `SHIPPED` ones the small 64x64 ->
8x8x4 model trained on this CPU and committed under weights/.
"""

import torch
import torch.nn.functional as F
from torch import nn

from tinykern import ops
from tinykern.nn.residual_vq import ResidualVQ

STANDARD = {
    "tokenizer": {"resolution": 256, "channels": [64, 128, 128, 256, 256], "latent_dim": 256,
                  "codebook_size": 1024, "num_levels": 4},
    "refiner": {"channels": [64, 128, 256, 256], "blocks": 2},
    "generator": {"dim": 512, "depth": 8, "heads": 8, "mlp": 4, "text_depth": 2, "text_length": 32},
}
SHIPPED = {
    "tokenizer": {"resolution": 64, "stem": 4, "channels": [96, 128], "latent_dim": 64,
                  "codebook_size": 256, "num_levels": 4},
    "refiner": {"channels": [16, 32, 64], "blocks": 1},
    "generator": {"dim": 256, "depth": 4, "heads": 4, "mlp": 2, "text_depth": 1, "text_length": 24},
}
PRESETS = {"standard": STANDARD, "shipped": SHIPPED}


def _norm(c):
    return nn.GroupNorm(min(8, c // 4) or 1, c)


def tokenizer_downsample(config):
    """Image side / code grid side of an RQVAE config: the stem's stride, then a halving per
    entry of `channels` after the first."""
    return config.get("stem", 1) * 2 ** (len(config["channels"]) - 1)


def refiner_downsample(config):
    """What the image side must be a multiple of for a Refiner config: a halving per entry of
    `channels` after the first."""
    return 2 ** (len(config["channels"]) - 1)


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class RQVAE(nn.Module):
    """Conv encoder (a stem of stride `stem`, default 1, then each entry of `channels` after
    the first halves the resolution: stem 1 and five entries downsample by 16), ResidualVQ with `num_levels` levels over `latent_dim`-channel
    features, conv decoder. Images are [B, 3, R, R] in [0, 1]; codes [B, R/f, R/f, levels]."""

    def __init__(self, config):
        super().__init__()
        self.config = dict(config)
        ch, stem = config["channels"], config.get("stem", 1)
        self.downsample = tokenizer_downsample(config)
        # stem > 1 patchifies first (a stem x stem stride-stem conv) and ends the decoder with a
        # pixel shuffle: far fewer full-resolution FLOPs, for the CPU-trained shipped model.
        enc = [nn.Conv2d(3, ch[0], stem, stride=stem) if stem > 1 else nn.Conv2d(3, ch[0], 3, padding=1)]
        for a, b in zip(ch, ch[1:]):
            enc += [ResBlock(a, a), nn.Conv2d(a, b, 3, stride=2, padding=1)]
        enc += [ResBlock(ch[-1], ch[-1]), _norm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], config["latent_dim"], 1)]
        self.encoder = nn.Sequential(*enc)
        dec = [nn.Conv2d(config["latent_dim"], ch[-1], 3, padding=1), ResBlock(ch[-1], ch[-1])]
        for a, b in zip(ch[::-1], ch[-2::-1]):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(a, b, 3, padding=1), ResBlock(b, b)]
        dec += [_norm(ch[0]), nn.SiLU(), nn.Conv2d(ch[0], 3 * stem * stem, 3, padding=1), nn.PixelShuffle(stem)]
        self.decoder = nn.Sequential(*dec)
        self.quantizer = ResidualVQ(config["latent_dim"], config["codebook_size"], config["num_levels"],
                                    channels_first=True, dead_code_threshold=1.0)

    @property
    def grid(self):
        return self.config["resolution"] // self.downsample

    def encode_latent(self, images):
        return self.encoder(images * 2 - 1)

    def decode_latent(self, latent):
        return (self.decoder(latent) + 1) / 2

    def forward(self, images):
        """(reconstruction, codes, commitment loss); in training mode the codebooks update."""
        quantized, codes, loss = self.quantizer(self.encode_latent(images))
        return self.decode_latent(quantized), codes, loss

    @torch.no_grad()
    def encode(self, images):
        return self.quantizer.encode(self.encode_latent(images))

    def decode(self, codes):
        """Images from codes [B, h, w, l]: l < num_levels gives the coarser picture of the first
        l levels. The lookup runs on tinykern.ops.rvq_decode."""
        return self.decode_latent(self.quantizer.decode(codes))


class Refiner(nn.Module):
    """UNet over the RQ-VAE output predicting a residual: refined = x + unet(x). Its last conv
    starts at zero, so an untrained refiner is the identity."""

    def __init__(self, config):
        super().__init__()
        self.config = dict(config)
        ch, blocks = config["channels"], config["blocks"]
        self.inp = nn.Conv2d(3, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips = [ch[0]]
        for i, c in enumerate(ch):
            prev = ch[max(i - 1, 0)]
            stage = nn.ModuleList([ResBlock(prev if j == 0 else c, c) for j in range(blocks)])
            self.down.append(nn.ModuleDict({"blocks": stage, "pool": nn.Conv2d(c, c, 3, stride=2, padding=1)
                                            if i < len(ch) - 1 else nn.Identity()}))
            skips += [c] * blocks
        self.mid = nn.Sequential(ResBlock(ch[-1], ch[-1]), ResBlock(ch[-1], ch[-1]))
        self.up = nn.ModuleList()
        cur = ch[-1]
        for i, c in reversed(list(enumerate(ch))):
            stage = nn.ModuleList()
            for _ in range(blocks):
                stage.append(ResBlock(cur + skips.pop(), c))
                cur = c
            self.up.append(nn.ModuleDict({"blocks": stage, "upsample": nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)) if i > 0 else nn.Identity()}))
        self.out = nn.Sequential(_norm(cur + ch[0]), nn.SiLU(), nn.Conv2d(cur + ch[0], 3, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x):
        h = self.inp(x * 2 - 1)
        skips = [h]
        for stage in self.down:
            for block in stage["blocks"]:
                h = block(h)
                skips.append(h)
            h = stage["pool"](h)
        h = self.mid(h)
        for stage in self.up:
            for block in stage["blocks"]:
                h = block(torch.cat([h, skips.pop()], 1))
            h = stage["upsample"](h)
        return x + self.out(torch.cat([h, skips.pop()], 1)) / 2


class Block(nn.Module):
    """Pre-norm transformer block; plain nn.Linear layers so tinykern.quantize_ converts them."""

    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, mlp * dim), nn.Linear(mlp * dim, dim)

    def forward(self, x, mask=None, cache=None):
        """x [B, N, dim]; `mask` [N, N] (True: may attend); `cache` a KVCache that keeps this
        block's keys and values across calls, so that decoding feeds one new token at a time."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.append(k, v)
        x = x + self.proj(_attention(q, k, v, mask).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class KVCache:
    """One block's keys and values [B, heads, capacity, d], filled in order: decoding appends a
    token per step into memory allocated once."""

    def __init__(self, capacity):
        self.capacity, self.length, self.k, self.v = capacity, 0, None, None

    def append(self, k, v):
        """Store k, v [B, heads, n, d] after the tokens so far; (keys, values) of all of them."""
        if self.k is None:
            shape = (*k.shape[:2], self.capacity, k.shape[-1])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KVCache: {end} tokens do not fit the capacity of {self.capacity}")
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def _attention(q, k, v, mask):
    """Softmax attention written out: with a mask, the CPU's fused SDPA backward took 3x as long
    as this at the generator's sizes (88 tokens, bf16 autocast)."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


class TextEncoder(nn.Module):
    """Token embeddings + positions + a few transformer blocks; [B, T] ids -> [B, T, dim].
    An all-padding prompt is the unconditional (classifier-free guidance) input."""

    def __init__(self, vocab_size, dim, depth, heads, mlp, length):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids):
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.norm(h)


class ClipTextEncoder(nn.Module):
    """A user-supplied transformers CLIPTextModel (a folder with its config.json and weights, e.g.
    SD1.5's text_encoder/), frozen, with a trainable projection of its last hidden states to the
    generator's width. The CLIP weights stay the user's: they are left out of the generator's
    state_dict and read from `path` whenever the generator is built."""

    def __init__(self, path, dim):
        super().__init__()
        from transformers import CLIPTextModel

        try:
            self.clip = CLIPTextModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        except (OSError, ValueError) as e:
            raise ValueError(f"ClipTextEncoder: cannot load a CLIPTextModel from {path} (a generator trained over "
                             f"CLIP needs its folder: --text-encoder PATH): {e}") from None
        self.proj = nn.Linear(self.clip.config.hidden_size, dim)
        self.norm = nn.LayerNorm(dim)
        self.register_state_dict_post_hook(_drop_clip_keys)
        self.register_load_state_dict_post_hook(_forgive_clip_keys)

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # frozen: no dropout, whatever the generator's mode
        return self

    def forward(self, ids):
        with torch.no_grad():
            hidden = self.clip(input_ids=ids).last_hidden_state
        return self.norm(self.proj(hidden))


def _drop_clip_keys(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + "clip.")]:
        del state_dict[key]


def _forgive_clip_keys(module, incompatible):
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if ".clip." not in f".{k}"]


class TokenGenerator(nn.Module):
    """Text-conditioned autoregressive generator of the codes (an RQ-Transformer with a light
    depth head): a spatial transformer reads [prompt features ; start token ; positions 0..P-2]
    with the prompt visible to every position and a causal mask over the positions, so its
    output at position i depends on the prompt and the codes of positions < i (raster order).
    The depth head then predicts position i's `num_levels` codes one after another, each from
    that output plus the partial sum of the codes already chosen for its lower levels
    (teacher-forced in training).

    Codes are read through the tokenizer's own codebooks (`codebooks`, a copy taken when
    training starts): a position's input is a projection of the quantized latents (the sums of
    codewords, tinykern.ops.rvq_decode) of the position before it in raster order and of the
    three above it (above-left, above, above-right), so codes that draw alike start out alike
    and an edge begun on the row above is in plain view of the position that continues it.

    The prompt goes through a small trainable TextEncoder, or, when the config names a
    `clip_text_model` folder, through that frozen CLIP text model (ClipTextEncoder)."""

    def __init__(self, config, vocab_size, grid, codebook_size, num_levels, code_dim):
        super().__init__()
        self.config = {**config, "vocab_size": vocab_size, "grid": grid, "codebook_size": codebook_size,
                       "num_levels": num_levels, "code_dim": code_dim}
        dim, heads, mlp = config["dim"], config["heads"], config["mlp"]
        if config.get("clip_text_model"):
            self.text = ClipTextEncoder(config["clip_text_model"], dim)
        else:
            self.text = TextEncoder(vocab_size, dim, config["text_depth"], heads, mlp, config["text_length"])
        self.register_buffer("codebooks", torch.randn(num_levels, codebook_size, code_dim))
        self.code_in = nn.Linear(code_dim, dim)
        self.above_in = nn.Linear(3 * code_dim, dim)
        self.start = nn.Parameter(torch.randn(dim) * 0.02)
        # Row + column embeddings: "above"/"left of" are about rows and columns.
        self.row_pos = nn.Parameter(torch.randn(grid, 1, dim) * 0.02)
        self.col_pos = nn.Parameter(torch.randn(1, grid, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp) for _ in range(config["depth"])])
        self.norm = nn.LayerNorm(dim)
        self.depth_in = nn.Linear(code_dim, dim)
        self.depth_norm = nn.LayerNorm(dim)
        self.depth_fc = nn.Linear(dim, dim)
        self.depth_out = nn.ModuleList([nn.Linear(dim, codebook_size) for _ in range(num_levels)])

    def set_codebooks(self, codebooks):
        """Take the tokenizer's codebooks [num_levels, K, code_dim] (ResidualVQ.level_codebooks())."""
        self.codebooks.copy_(codebooks)

    def _latent(self, codes, first=0):
        """The sum of the codewords of codes [..., l] of levels first..first + l - 1: [..., code_dim]."""
        lead, levels = codes.shape[:-1], codes.shape[-1]
        books = self.codebooks[first:first + levels]
        return ops.rvq_decode(codes.reshape(-1, levels), books).reshape(*lead, -1)

    def _positions(self):
        return (self.row_pos + self.col_pos).flatten(0, 1)

    def _above(self, padded):
        """The latents above-left, above and above-right of every position, [B, P, 3D], from the
        latents laid out as `_padded` does ([B, grid + 1, grid + 2, D])."""
        g = self.config["grid"]
        return torch.cat([padded[:, :g, c:c + g] for c in range(3)], -1).flatten(1, 2)

    @staticmethod
    def _padded(latent):
        """Latents [B, grid, grid, D] with a zero row on top and a zero column each side, so
        position (r, c)'s row above is padded[:, r, c:c + 3]."""
        return F.pad(latent, (0, 0, 1, 1, 1, 0))

    def _inputs(self, codes):
        """Input of each position [B, P, dim]: the start token or the previous position's codes,
        plus the codes of the three positions above."""
        g = self.config["grid"]
        latent = self._latent(codes)
        start = self.start.expand(codes.shape[0], 1, -1)
        prev = torch.cat([start, self.code_in(latent[:, :-1])], 1)
        return prev + self.above_in(self._above(self._padded(latent.unflatten(1, (g, g))))) + self._positions()

    def hidden(self, codes, ids):
        """Spatial transformer output per position [B, P, dim] for codes [B, P, L] (position i
        sees only positions < i) and prompt ids [B, T]."""
        text = self.text(ids)
        t, p = text.shape[1], codes.shape[1]
        i = torch.arange(t + p, device=codes.device)
        # The prompt attends to itself only; position rows attend to the prompt and to the
        # positions up to their own.
        mask = (i[None, :] < t) | ((i[:, None] >= t) & (i[None, :] <= i[:, None]))
        h = torch.cat([text, self._inputs(codes)], 1)
        for block in self.blocks:
            h = block(h, mask)
        return self.norm(h[:, t:])

    def level_logits(self, h, partial, level):
        """Logits [..., K] of `level` given the position outputs h and `partial`, the sum of the
        codewords chosen for the lower levels (None at level 0)."""
        if level:
            h = h + self.depth_in(partial)
        return self.depth_out[level](F.gelu(self.depth_fc(self.depth_norm(h))))

    def teacher_forced_logits(self, h, codes):
        """Logits of every level, a list of [..., K], each given the lower levels of codes
        [..., L] (a running sum of their codewords)."""
        logits, partial = [], None
        for level in range(codes.shape[-1]):
            logits.append(self.level_logits(h, partial, level))
            if level + 1 < codes.shape[-1]:
                word = self._latent(codes[..., level:level + 1], first=level)
                partial = word if partial is None else partial + word
        return logits

    def loss(self, codes, ids):
        """Next-position cross entropy over every position and level, averaged over levels."""
        logits = self.teacher_forced_logits(self.hidden(codes, ids), codes)
        return sum(F.cross_entropy(lg.flatten(0, 1), codes[..., level].flatten())
                   for level, lg in enumerate(logits)) / len(logits)

    @torch.no_grad()
    def generate(self, ids, null_ids, guidance=2.0, temperature=1.0, generator=None):
        """Codes [B, grid, grid, levels] for prompt ids [B, T], position by position with a
        key/value cache; null_ids [1, T] is the empty prompt for classifier-free guidance
        (guidance 0 turns it off), run in the same batch as the prompts."""
        b = ids.shape[0]
        grid, levels = self.config["grid"], self.config["num_levels"]
        guided = guidance > 0
        h = self.text(torch.cat([ids, null_ids.expand(b, -1)]) if guided else ids)
        caches = [KVCache(h.shape[1] + grid * grid) for _ in self.blocks]
        for block, cache in zip(self.blocks, caches):  # the prompt, once: it attends to itself only
            h = block(h, cache=cache)
        rows = h.shape[0]
        positions = self._positions()
        x = self.start.expand(rows, 1, -1)
        codes = torch.zeros(b, grid * grid, levels, dtype=torch.long, device=ids.device)
        # The latents chosen so far, in _padded's layout: only the row above is read per step.
        padded = torch.zeros(rows, grid + 1, grid + 2, self.config["code_dim"], device=ids.device)
        for i in range(grid * grid):
            r, c = divmod(i, grid)
            h = x + self.above_in(padded[:, r, c:c + 3].flatten(1))[:, None] + positions[i]
            for block, cache in zip(self.blocks, caches):
                h = block(h, cache=cache)
            h = self.norm(h)
            chosen = torch.zeros(rows, 1, levels, dtype=torch.long, device=ids.device)
            partial = None
            for level in range(levels):
                logits = self.level_logits(h, partial, level).float()
                if guided:
                    cond, uncond = logits.chunk(2)
                    logits = uncond + (1 + guidance) * (cond - uncond)
                pick = _sample(F.log_softmax(logits, -1) / max(temperature, 1e-6), generator)
                chosen[..., level] = pick.repeat(2, 1) if guided else pick
                word = self._latent(chosen[..., level:level + 1], first=level)
                partial = word if partial is None else partial + word
            codes[:, i] = chosen[:b, 0]
            padded[:, r + 1, c + 1] = partial[:, 0]
            x = self.code_in(padded[:, r + 1, c + 1, None])
        return codes.reshape(b, grid, grid, levels)


def _sample(logp, generator):
    u = torch.rand(logp.shape, generator=generator, device=logp.device).clamp(1e-9, 1 - 1e-9)
    return (logp - torch.log(-torch.log(u))).argmax(-1)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())
