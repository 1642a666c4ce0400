"""Feature slicing with operator grouping for the SD UNet and VAE decoder (Streamlined Inference's
two memory techniques), exact up to float rounding.

A block's spatial positions (and its batch: the two CFG halves) are split into slices of whole
rows, and groups of consecutive operators run slice by slice, so that no full-size intermediate
of the group exists; only the tensors between groups are full size:

- ResnetBlock2D: group 1 = norm1, SiLU, conv1 (+ time embedding) per slice with conv1's halo
  rows -> h (full); group 2 = norm2, SiLU, conv2, shortcut, residual add per slice -> output.
  GroupNorm statistics are gathered slice by slice first (Chan's parallel mean/variance in
  float32), since a slice cannot see its group's whole extent. Five to eight full-size tensors of
  the unsliced block become three (input, h, output); two in the VAE decoder, where the output
  overwrites the input (nothing else holds it there).
- Transformer2DModel: norm + proj_in per slice -> the token stream (full, C channels); for each
  transformer block the self-attention keys and values (full, from norm1 per slice), then the
  whole block (norm1, attention to all keys, norm2, cross-attention, norm3, GEGLU feed-forward,
  the residual adds) per query slice; proj_out + residual per slice. The GEGLU projection
  [tokens, 8C] and the attention output exist only per slice.
- Upsample2D: nearest x2 and the conv per output slice (from the input rows it needs).
- The VAE decoder's tail: norm_out, SiLU and conv_out per slice.

Every other module runs unchanged. A block whose configuration the sliced code does not cover
(scale-shift time embedding, attention masks, transposed convs, ...) runs unsliced.
"""

import dataclasses

import torch
import torch.nn.functional as F
from diffusers.hooks.hooks import HookRegistry, ModelHook
from torch import nn

HOOK = "tinykern_slicing"


@dataclasses.dataclass(frozen=True)
class Slicing:
    """Slice sizes. unet_tokens: positions per slice (whole rows, one image at a time) in the
    UNet's resnets, transformers and upsamplers; vae_pixels: the same for the VAE decoder."""

    unet_tokens: int = 1024
    vae_pixels: int = 2048
    vae_recompute: bool = True

    def __post_init__(self):
        if self.unet_tokens < 1 or self.vae_pixels < 1:
            raise ValueError(f"slice sizes must be >= 1, got unet_tokens={self.unet_tokens}, vae_pixels={self.vae_pixels}")

    def __str__(self):
        return f"unet_tokens={self.unet_tokens}, vae_pixels={self.vae_pixels}, vae_recompute={self.vae_recompute}"


def parse(text):
    """`--slice` text -> Slicing or None: "off", "on" (defaults), or "unet=N,vae=M"."""
    text = text.strip().lower()
    if text in ("off", "none", "0"):
        return None
    if text in ("on", "auto", "default"):
        return Slicing()
    values = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("unet", "vae"):
            raise ValueError(f"slicing must be 'off', 'on' or 'unet=TOKENS,vae=PIXELS', got {text!r}")
        values[key.strip()] = int(value)
    return Slicing(values.get("unet", Slicing.unet_tokens), values.get("vae", Slicing.vae_pixels))


def enable(unet, vae, slicing):
    """Slice `unet`'s and `vae`'s decoder blocks with `slicing` (None: remove the slicing)."""
    for module in [*unet.modules(), *vae.decoder.modules()]:
        registry = HookRegistry.check_if_exists_or_initialize(module)
        if registry.get_hook(HOOK) is not None:
            registry.remove_hook(HOOK, recurse=False)
    if slicing is None:
        return
    for module in unet.modules():
        _attach(module, slicing.unet_tokens, inplace=False)
    for module in vae.decoder.modules():
        _attach(module, slicing.vae_pixels, inplace=True)
    HookRegistry.check_if_exists_or_initialize(vae.decoder).register_hook(
        _SlicedDecoder(slicing.vae_pixels, slicing.vae_recompute), HOOK)


def _attach(module, pixels, inplace):
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.upsampling import Upsample2D

    hook = {ResnetBlock2D: lambda: _SlicedResnet(pixels, inplace), Transformer2DModel: lambda: _SlicedTransformer(pixels),
            Upsample2D: lambda: _SlicedUpsample(pixels)}.get(type(module))
    if hook is not None:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook(), HOOK)


# ---------------------------------------------------------------------------------------------
# Slices and group norm by slices


def row_slices(batch, height, width, pixels):
    """[(image, first row, end row)]: whole rows, at most `pixels` positions (one row at least)."""
    rows = max(1, pixels // max(width, 1))
    return [(b, r, min(r + rows, height)) for b in range(batch) for r in range(0, height, rows)]


def group_norm_stats(x, norm, slices):
    """(mean, rstd) [B, groups] float32 of GroupNorm `norm` over x [B, C, H, W], one slice at a
    time (see _stream_stats)."""
    return _stream_stats(lambda b, r0, r1: x[b:b + 1, :, r0:r1], norm, slices, x.shape[0])


def group_norm_apply(x, norm, mean, rstd, chunks=4):
    """GroupNorm of x [1, C, h, W] (a slice of one image) with that image's mean, rstd [groups],
    computed in float32 a quarter of the groups at a time (in place on one float32 copy)."""
    channels, groups = x.shape[1], norm.num_groups
    per = channels // groups
    out = torch.empty_like(x)
    step = max(1, groups // chunks)
    for g0 in range(0, groups, step):
        g1 = min(g0 + step, groups)
        c0, c1 = g0 * per, g1 * per
        y = x[:, c0:c1].to(torch.float32, copy=True).reshape(g1 - g0, per, *x.shape[2:])
        y.sub_(mean[g0:g1, None, None, None]).mul_(rstd[g0:g1, None, None, None])
        y = y.reshape(1, c1 - c0, *x.shape[2:])
        if norm.affine:
            y.mul_(norm.weight[c0:c1].float()[:, None, None]).add_(norm.bias[c0:c1].float()[:, None, None])
        out[:, c0:c1] = y
        del y
    return out


def _act(module, x):
    """module's activation on x, in place when it is SiLU (x is a temporary of the slice)."""
    return F.silu(x, inplace=True) if isinstance(module, nn.SiLU) else module(x)


def _halo(conv):
    """Rows of context a stride-1 'same' conv needs on each side, or None if it is not one."""
    kh, kw = conv.kernel_size
    padding = conv.padding if isinstance(conv.padding, tuple) else None
    if (padding is None or tuple(conv.stride) != (1, 1) or tuple(getattr(conv, "dilation", (1, 1))) != (1, 1)
            or kh % 2 == 0 or padding != (kh // 2, kw // 2)):
        return None
    return kh // 2


def _rows_of(conv, x, r0, r1, lo):
    """conv over a window of rows starting at `lo` (with its halo), cut to rows r0..r1."""
    return conv(x)[:, :, r0 - lo:r1 - lo]


# ---------------------------------------------------------------------------------------------
# The sliced blocks


class _SlicedResnet(ModelHook):
    def __init__(self, pixels, inplace):
        super().__init__()
        self.pixels, self.inplace = pixels, inplace

    def new_forward(self, module, input_tensor, temb=None, *args, **kwargs):
        if args or kwargs or not _resnet_sliceable(module) or input_tensor.dim() != 4:
            return self.fn_ref.original_forward(input_tensor, temb, *args, **kwargs)
        x = input_tensor
        batch, _, height, width = x.shape
        slices = row_slices(batch, height, width, self.pixels)
        time = None
        if module.time_emb_proj is not None and temb is not None:
            time = module.time_emb_proj(temb if module.skip_time_act else module.nonlinearity(temb))[:, :, None, None]
        p1, p2 = _halo(module.conv1), _halo(module.conv2)
        mean, rstd = group_norm_stats(x, module.norm1, slices)
        h = x.new_empty(batch, module.conv1.out_channels, height, width)
        for b, r0, r1 in slices:
            lo, hi = max(r0 - p1, 0), min(r1 + p1, height)
            a = _act(module.nonlinearity, group_norm_apply(x[b:b + 1, :, lo:hi], module.norm1, mean[b], rstd[b]))
            c = _rows_of(module.conv1, a, r0, r1, lo)
            del a
            h[b:b + 1, :, r0:r1] = c + time[b:b + 1] if time is not None else c
            del c
        mean, rstd = group_norm_stats(h, module.norm2, slices)
        shortcut = module.conv_shortcut
        out = x if self.inplace and shortcut is None else x.new_empty(batch, h.shape[1], height, width)
        for b, r0, r1 in slices:
            lo, hi = max(r0 - p2, 0), min(r1 + p2, height)
            a = _act(module.nonlinearity, group_norm_apply(h[b:b + 1, :, lo:hi], module.norm2, mean[b], rstd[b]))
            c = _rows_of(module.conv2, module.dropout(a), r0, r1, lo)
            del a
            skip = x[b:b + 1, :, r0:r1]
            if shortcut is not None:
                skip = shortcut(skip)
            out[b:b + 1, :, r0:r1] = (skip + c) / module.output_scale_factor
            del c, skip
        return out


def _resnet_sliceable(module):
    # "group" is the VAE's (no time embedding): norm2 then is a plain GroupNorm, as in "default".
    plain = module.time_embedding_norm == "default" or (module.time_embedding_norm == "group" and module.time_emb_proj is None)
    return (module.upsample is None and module.downsample is None and plain
            and isinstance(module.norm1, nn.GroupNorm) and isinstance(module.norm2, nn.GroupNorm)
            and _halo(module.conv1) is not None and _halo(module.conv2) is not None
            and (module.conv_shortcut is None or (tuple(module.conv_shortcut.kernel_size) == (1, 1)
                                                  and tuple(module.conv_shortcut.stride) == (1, 1)
                                                  and tuple(module.conv_shortcut.padding) == (0, 0))))


class _SlicedUpsample(ModelHook):
    def __init__(self, pixels):
        super().__init__()
        self.pixels = pixels

    def new_forward(self, module, hidden_states, output_size=None, *args, **kwargs):
        x = hidden_states
        sliceable = not args and not kwargs and _upsample_sliceable(module) and x.dim() == 4
        if sliceable and output_size is not None:
            sliceable = tuple(output_size) == (2 * x.shape[2], 2 * x.shape[3])
        if not sliceable:
            return self.fn_ref.original_forward(hidden_states, output_size, *args, **kwargs)
        upsampled = _Upsampled(module, _Rows(x))
        batch, _, height2, width2 = upsampled.shape
        out = x.new_empty(upsampled.shape)
        for b, r0, r1 in row_slices(batch, height2, width2, self.pixels):
            out[b:b + 1, :, r0:r1] = upsampled.rows(b, r0, r1)
        return out


class _KeysValues:
    """attn1's processor while a transformer block runs by query slices: keys and values of
    every position are given (one image's [1, tokens, inner]), queries come from the slice."""

    def __init__(self, key, value):
        self.key, self.value = key, value

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        query = attn.to_q(hidden_states)
        heads = attn.heads
        head_dim = self.key.shape[-1] // heads
        q = query.view(1, -1, heads, head_dim).transpose(1, 2)
        del query
        k = self.key.view(1, -1, heads, head_dim).transpose(1, 2)
        v = self.value.view(1, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        del q
        out = out.transpose(1, 2).reshape(1, -1, heads * head_dim).to(k.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor if attn.rescale_output_factor != 1 else out


def _attention_sliceable(attn):
    from diffusers.models.attention_processor import AttnProcessor2_0

    return (isinstance(attn.processor, AttnProcessor2_0) and attn.spatial_norm is None and attn.group_norm is None
            and attn.norm_q is None and attn.norm_k is None and not attn.residual_connection and not attn.is_cross_attention)


def _block_sliceable(block):
    return (block.norm_type == "layer_norm" and block.pos_embed is None and not block.only_cross_attention
            and _attention_sliceable(block.attn1) and getattr(block, "_chunk_size", None) is None)


class _SlicedTransformer(ModelHook):
    def __init__(self, pixels):
        super().__init__()
        self.pixels = pixels

    def new_forward(self, module, hidden_states, encoder_hidden_states=None, timestep=None, added_cond_kwargs=None,
                    class_labels=None, cross_attention_kwargs=None, attention_mask=None, encoder_attention_mask=None,
                    return_dict=True):
        sliceable = (module.is_input_continuous and isinstance(module.norm, nn.GroupNorm) and attention_mask is None
                     and encoder_attention_mask is None and not cross_attention_kwargs and hidden_states.dim() == 4
                     and all(_block_sliceable(b) for b in module.transformer_blocks)
                     and (module.use_linear_projection or _halo(module.proj_in) == 0 == _halo(module.proj_out)))
        if not sliceable:
            return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, timestep, added_cond_kwargs,
                                                class_labels, cross_attention_kwargs, attention_mask,
                                                encoder_attention_mask, return_dict)
        x = hidden_states
        batch, channels, height, width = x.shape
        slices = row_slices(batch, height, width, self.pixels)
        mean, rstd = group_norm_stats(x, module.norm, slices)
        tokens = None
        for b, r0, r1 in slices:  # norm and proj_in -> the token stream [B, H*W, inner]
            n = group_norm_apply(x[b:b + 1, :, r0:r1], module.norm, mean[b], rstd[b])
            if module.use_linear_projection:
                t = module.proj_in(n.permute(0, 2, 3, 1).reshape(1, -1, channels))
            else:
                t = module.proj_in(n)
                t = t.permute(0, 2, 3, 1).reshape(1, -1, t.shape[1])
            del n
            if tokens is None:
                tokens = x.new_empty(batch, height * width, t.shape[-1])
            tokens[b:b + 1, r0 * width:r1 * width] = t
            del t
        inner = tokens.shape[-1]
        for block in module.transformer_blocks:
            attn1 = block.attn1
            for b in range(batch):
                image = [(r0, r1) for bb, r0, r1 in slices if bb == b]
                key = x.new_empty(1, height * width, attn1.to_k.out_features if hasattr(attn1.to_k, "out_features") else inner)
                value = torch.empty_like(key)
                for r0, r1 in image:
                    n = block.norm1(tokens[b:b + 1, r0 * width:r1 * width])
                    key[:, r0 * width:r1 * width] = attn1.to_k(n)
                    value[:, r0 * width:r1 * width] = attn1.to_v(n)
                    del n
                processor = attn1.processor
                attn1.processor = _KeysValues(key, value)
                try:
                    context = None if encoder_hidden_states is None else encoder_hidden_states[b:b + 1]
                    for r0, r1 in image:
                        part = tokens[b:b + 1, r0 * width:r1 * width]
                        tokens[b:b + 1, r0 * width:r1 * width] = block(part, encoder_hidden_states=context,
                                                                        timestep=timestep, class_labels=class_labels)
                        del part
                finally:
                    attn1.processor = processor
                del key, value
        out = x.new_empty(x.shape)
        for b, r0, r1 in slices:
            t = tokens[b:b + 1, r0 * width:r1 * width]
            if module.use_linear_projection:
                t = module.proj_out(t).reshape(1, r1 - r0, width, inner).permute(0, 3, 1, 2).contiguous()
            else:
                t = module.proj_out(t.reshape(1, r1 - r0, width, inner).permute(0, 3, 1, 2).contiguous())
            out[b:b + 1, :, r0:r1] = t + x[b:b + 1, :, r0:r1]
            del t
        del tokens
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


class _SlicedDecoder(ModelHook):
    """The VAE decoder by slices. recompute=False: each block sliced on its own (its input,
    h and output full size) and norm_out, SiLU, conv_out by slices. recompute=True: the up
    path as one group per resnet in which neither the upsampled input nor conv1's output
    exist whole: each slice recomputes them from the rows it needs (GroupNorm statistics in
    streaming passes), and a resnet with an identity shortcut writes its output over its
    input. About a third of the memory for a few times the upsampling convs' and twice
    conv1's work."""

    def __init__(self, pixels, recompute):
        super().__init__()
        self.pixels, self.recompute = pixels, recompute

    def new_forward(self, module, sample, latent_embeds=None):
        if (latent_embeds is not None or not isinstance(module.conv_norm_out, nn.GroupNorm)
                or _halo(module.conv_out) is None or (torch.is_grad_enabled() and module.gradient_checkpointing)):
            return self.fn_ref.original_forward(sample, latent_embeds)
        sample = module.conv_in(sample)
        sample = module.mid_block(sample, latent_embeds)
        source = _Rows(sample)
        del sample
        for up_block in module.up_blocks:
            if not self.recompute:
                source = _Rows(up_block(source.tensor(), latent_embeds))
                continue
            for resnet in up_block.resnets:
                if _resnet_sliceable(resnet):
                    source = _Rows(resnet_recomputed(resnet, source, self.pixels))
                else:
                    source = _Rows(resnet(source.tensor(), None))
            for upsampler in up_block.upsamplers or ():
                source = _Upsampled(upsampler, source) if _upsample_sliceable(upsampler) else _Rows(upsampler(source.tensor()))
        batch, _, height, width = source.shape
        slices = row_slices(batch, height, width, self.pixels)
        mean, rstd = _stream_stats(source.rows, module.conv_norm_out, slices, batch)
        p = _halo(module.conv_out)
        out = None
        for b, r0, r1 in slices:
            lo, hi = max(r0 - p, 0), min(r1 + p, height)
            a = _act(module.conv_act, group_norm_apply(source.rows(b, lo, hi), module.conv_norm_out, mean[b], rstd[b]))
            c = _rows_of(module.conv_out, a, r0, r1, lo)
            del a
            if out is None:
                out = c.new_empty(batch, c.shape[1], height, width)
            out[b:b + 1, :, r0:r1] = c
            del c
        return out


# ---------------------------------------------------------------------------------------------
# Row sources: a feature map held whole, or computed on demand from the rows of another


class _Rows:
    """A whole tensor [B, C, H, W] read by rows. Rows overwritten in place (by write) are read
    from a copy of the last `keep` original rows taken before the write, so that slices
    processed top to bottom still see their halo's original values."""

    def __init__(self, tensor):
        self._tensor, self.shape = tensor, tuple(tensor.shape)
        self._carry = {}  # image -> (first row, original rows [first, written end))

    def tensor(self):
        return self._tensor

    def rows(self, b, lo, hi):
        carry = self._carry.get(b)
        if carry is None or lo >= carry[0] + carry[1].shape[2]:
            return self._tensor[b:b + 1, :, lo:hi]
        first, saved = carry
        if lo < first:
            raise RuntimeError("row slices must be read top to bottom")
        end = first + saved.shape[2]
        head = saved[:, :, lo - first:min(hi, end) - first]
        return head if hi <= end else torch.cat([head, self._tensor[b:b + 1, :, end:hi]], dim=2)

    def write(self, b, r0, r1, value, keep):
        """Overwrite rows r0..r1 of image b, keeping the last `keep` original rows before r1."""
        first = max(r1 - keep, 0)
        self._carry[b] = (first, self.rows(b, first, r1).clone())  # rows() reads the older carry
        self._tensor[b:b + 1, :, r0:r1] = value


class _Upsampled:
    """Upsample2D (nearest x2, then its conv) of a row source, computed per requested rows."""

    def __init__(self, upsampler, source):
        self.upsampler, self.source = upsampler, source
        self.conv = _upsample_conv(upsampler)
        batch, _, height, width = source.shape
        self.shape = (batch, self.conv.out_channels, 2 * height, 2 * width)

    def tensor(self):
        return self.upsampler(self.source.tensor())

    def rows(self, b, r0, r1):
        p, height2 = _halo(self.conv), self.shape[2]
        lo, hi = max(r0 - p, 0), min(r1 + p, height2)
        i0, i1 = lo // 2, (hi + 1) // 2
        up = F.interpolate(self.source.rows(b, i0, i1), scale_factor=2.0, mode="nearest")[:, :, lo - 2 * i0:hi - 2 * i0]
        return _rows_of(self.conv, up, r0, r1, lo)


def _upsample_conv(module):
    """An Upsample2D's conv (None without one): `conv`, or `Conv2d_0` under its older name."""
    return getattr(module, "conv", None) if module.name == "conv" else getattr(module, "Conv2d_0", None)


def _upsample_sliceable(module):
    conv = _upsample_conv(module)
    return (module.norm is None and not module.use_conv_transpose and module.interpolate and module.use_conv
            and conv is not None and _halo(conv) is not None)


def _stream_stats(rows, norm, slices, batch):
    """(mean, rstd) [B, groups] float32 of GroupNorm `norm` over the feature map whose rows
    `rows(b, r0, r1)` returns as [1, C, r1 - r0, W], one slice at a time (Chan et al.'s pairwise
    merge of means and squared deviations)."""
    groups = norm.num_groups
    count, mean, m2 = None, None, None
    for b, r0, r1 in slices:
        part = rows(b, r0, r1)[0].float().reshape(groups, -1)
        if mean is None:
            count = torch.zeros(batch, 1, dtype=torch.float32, device=part.device)
            mean = torch.zeros(batch, groups, dtype=torch.float32, device=part.device)
            m2 = torch.zeros(batch, groups, dtype=torch.float32, device=part.device)
        var, avg = torch.var_mean(part, dim=1, unbiased=False)
        n = part.shape[1]
        total = count[b] + n
        delta = avg - mean[b]
        mean[b] += delta * (n / total)
        m2[b] += var * n + delta * delta * (count[b] * n / total)
        count[b] = total
        del part, var, avg, delta
    return mean, torch.rsqrt(m2 / count + norm.eps)


def resnet_recomputed(module, source, pixels):
    """A time-embedding-free ResnetBlock2D over a row source, conv1's output never whole: it
    is computed once for norm2's statistics and again, per slice with its halo, for conv2.
    An identity shortcut over a whole tensor writes the output over the input."""
    batch, _, height, width = source.shape
    slices = row_slices(batch, height, width, pixels)
    p1, p2 = _halo(module.conv1), _halo(module.conv2)
    mean1, rstd1 = _stream_stats(source.rows, module.norm1, slices, batch)

    def conv1_rows(b, r0, r1):
        lo, hi = max(r0 - p1, 0), min(r1 + p1, height)
        a = _act(module.nonlinearity, group_norm_apply(source.rows(b, lo, hi), module.norm1, mean1[b], rstd1[b]))
        return _rows_of(module.conv1, a, r0, r1, lo)

    mean2, rstd2 = _stream_stats(conv1_rows, module.norm2, slices, batch)
    inplace = module.conv_shortcut is None and isinstance(source, _Rows)
    out = source if inplace else None
    for b, r0, r1 in slices:
        lo, hi = max(r0 - p2, 0), min(r1 + p2, height)
        a = _act(module.nonlinearity, group_norm_apply(conv1_rows(b, lo, hi), module.norm2, mean2[b], rstd2[b]))
        c = _rows_of(module.conv2, module.dropout(a), r0, r1, lo)
        del a
        skip = source.rows(b, r0, r1)
        if module.conv_shortcut is not None:
            skip = module.conv_shortcut(skip)
        value = (skip + c) / module.output_scale_factor
        del skip, c
        if inplace:
            out.write(b, r0, r1, value, keep=p1 + p2)
        else:
            if out is None:
                out = _Rows(value.new_empty(batch, value.shape[1], height, width))
            out.tensor()[b:b + 1, :, r0:r1] = value
        del value
    return out.tensor()
