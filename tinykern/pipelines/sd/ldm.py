"""UNet names in the original LDM layout (single-file checkpoints, GGUF files, kohya LoRAs)
against diffusers' UNet2DConditionModel names, derived from the UNet config.

LDM numbers the UNet as flat lists: input_blocks.k holds one resnet (and one transformer, in a
cross-attention block) or a downsampler; output_blocks likewise, with the upsampler appended to
the last layer of a block; resnet layers have their own names (in_layers.2 is conv1, ...).
"""

import functools
import json

# diffusers resnet child -> LDM ResBlock child
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_BACK = {v: k for k, v in _RESNET.items()}


def _block_prefixes(config):
    """[(diffusers prefix, LDM prefix, is_resnet)] for every block of an SD1.x-style UNet."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"LDM naming needs one layers_per_block for every block, got {layers!r}")
    pairs = [("conv_in", "input_blocks.0.0", False), ("time_embedding.linear_1", "time_embed.0", False),
             ("time_embedding.linear_2", "time_embed.2", False), ("conv_norm_out", "out.0", False),
             ("conv_out", "out.2", False)]
    down, up = config["down_block_types"], config["up_block_types"]
    for i, kind in enumerate(down):
        for j in range(layers):
            k = 1 + i * (layers + 1) + j
            pairs.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", True))
            if "CrossAttn" in kind:
                pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1", False))
        if i < len(down) - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{1 + i * (layers + 1) + layers}.0.op", False))
    pairs += [("mid_block.resnets.0", "middle_block.0", True), ("mid_block.attentions.0", "middle_block.1", False),
              ("mid_block.resnets.1", "middle_block.2", True)]
    for i, kind in enumerate(up):
        attn = "CrossAttn" in kind
        for j in range(layers + 1):
            k = i * (layers + 1) + j
            pairs.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", True))
            if attn:
                pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1", False))
        if i < len(up) - 1:
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{i * (layers + 1) + layers}.{2 if attn else 1}.conv", False))
    return pairs


@functools.lru_cache(maxsize=8)
def _tables(config_json):
    pairs = _block_prefixes(json.loads(config_json))
    to_ldm = {d: (l, r) for d, l, r in pairs}
    to_diffusers = {l: (d, r) for d, l, r in pairs}
    return to_ldm, to_diffusers


def _convert(name, table, resnet_children):
    parts = name.split(".")
    # Whole dotted components only, longest first, so "out.0" never matches "output_blocks.0".
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in table:
            new, is_resnet = table[prefix]
            rest = parts[n:]
            if is_resnet and rest:
                for m in (2, 1):
                    child = ".".join(rest[:m])
                    if child in resnet_children:
                        rest = resnet_children[child].split(".") + rest[m:]
                        break
                else:
                    return None
            return ".".join([new, *rest])
    return None


def _key(config):
    return json.dumps({k: config[k] for k in ("layers_per_block", "down_block_types", "up_block_types")}, sort_keys=True)


def diffusers_to_ldm(name, config):
    """The LDM name of a diffusers UNet module or parameter (no `model.diffusion_model.`
    prefix), or None if the name has no LDM counterpart."""
    return _convert(name, _tables(_key(config))[0], _RESNET)


def ldm_to_diffusers(name, config):
    """The diffusers name of an LDM UNet module or parameter (without `model.diffusion_model.`),
    or None if it is not part of the UNet."""
    return _convert(name, _tables(_key(config))[1], _RESNET_BACK)
