"""Tiny SD-shaped models with random weights, and their files in every layout load_pipeline
reads: for tests and examples, never for generation."""

import json
import re

import torch

from tinykern.pipelines.sd import ldm

# SD1.5's structure (cross-attention down blocks then a plain one, mid attention, mirrored up
# blocks, 2 layers per block) at a tenth of the width, with a 256-wide time embedding so that
# some Linear rows fill whole Q4_K blocks (as every SD1.5 row of 1280 does).
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=32, sample_size=16, in_channels=4, out_channels=4, time_embedding_dim=256)
# The real vocabulary, so the shipped tokenizer fits; everything else small.
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, bos_token_id=0, eos_token_id=2,
                 pad_token_id=1)
TINY_VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, norm_num_groups=32,
                sample_size=32, scaling_factor=0.18215)
MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "requires_safety_checker": False,
               "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
               "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def tiny_components(seed=0):
    """(unet, text_encoder, vae, scheduler) with random weights, float32, on the CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tinykern.pipelines.sd.loaders import sd15_config_dir
    from tinykern.pipelines.sd.presets import make_scheduler

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).eval()
    vae = AutoencoderKL(**TINY_VAE).eval()
    scheduler = make_scheduler("pndm", json.loads((sd15_config_dir() / "scheduler" / "scheduler_config.json").read_text()))
    return unet, text_encoder, vae, scheduler


def write_config_dir(folder, unet, text_encoder, vae, scheduler):
    """The config-only folder that single-file and GGUF loading take as `config`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=1))
    unet.save_config(folder / "unet")
    vae.save_config(folder / "vae")
    (folder / "text_encoder").mkdir(exist_ok=True)
    text_encoder.config.to_json_file(folder / "text_encoder" / "config.json")
    scheduler.save_config(folder / "scheduler")
    return folder


def write_diffusers_folder(folder, unet, text_encoder, vae, scheduler):
    """A diffusers-format pipeline folder (without tokenizer/: the shipped one is used)."""
    write_config_dir(folder, unet, text_encoder, vae, scheduler)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    return folder


def ldm_state_dict(unet, text_encoder, vae):
    """The three models' weights under single-file (LDM) names."""
    state = {"model.diffusion_model." + ldm.diffusers_to_ldm(k, unet.config): v for k, v in unet.state_dict().items()}
    # Real SD1.x files name the text encoder cond_stage_model.transformer.text_model.*
    state.update({"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
                  for k, v in text_encoder.state_dict().items()})
    state.update({"first_stage_model." + _vae_ldm_name(k, len(vae.config.block_out_channels)): _vae_ldm_value(k, v)
                  for k, v in vae.state_dict().items()})
    return {k: v.contiguous() for k, v in state.items()}


_VAE_RULES = (
    (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", lambda m: f"{m[1]}.mid.attn_1."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
)
_VAE_LEAVES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
               "conv_shortcut": "nin_shortcut", "conv_norm_out": "norm_out"}


def _vae_ldm_name(key, levels):
    for pattern, repl in _VAE_RULES:
        key = re.sub(pattern, repl, key)
    # The decoder's up blocks are numbered from the bottom in LDM.
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", key)
    for new, old in ((f".{v}.", f".{k}.") for k, v in _VAE_LEAVES.items()):
        key = key.replace(old, new)
    return key


def _vae_ldm_value(key, value):
    # LDM's mid-block attention projections are 1x1 convs.
    if re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key):
        return value[:, :, None, None]
    return value
