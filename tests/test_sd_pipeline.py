"""SD pipeline loading routes and the low-VRAM layout, on tiny SD-shaped models (random weights)."""

import json
import logging
import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

from gguf import GGMLQuantizationType  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from tinykern import backends  # noqa: E402
from tinykern.formats import FORMATS, q4k, q8_0  # noqa: E402
from tinykern.io.gguf import GGUFTensor, dense_tensor, write_gguf  # noqa: E402
from tinykern.nn import Q4Conv2d, Q4Linear, Q8Linear, QuantLinear  # noqa: E402
from tinykern.pipelines.sd import SDQuantConfig, clip_tokenizer, load_pipeline, save_pipeline  # noqa: E402
from tinykern.pipelines.sd import ldm, loaders  # noqa: E402
from tinykern.pipelines.sd.layout import UNET_KEEP_DENSE  # noqa: E402
from tinykern.pipelines.sd.testing import (  # noqa: E402
    ldm_state_dict, tiny_components, write_config_dir, write_diffusers_folder)

# Tiny rows (64 inputs) would stay dense under the SD1.5 default; quantize them all here.
TINY_QUANT = SDQuantConfig(min_features=0)
CALL = dict(num_inference_steps=2, guidance_scale=7.5, height=16, width=16, output_type="latent")
# Q4_K UNet + Q8_0 text encoder vs float32, after 2 CFG steps on random weights: 28-29 dB seen.
MIN_SQNR_DB = 20.0


def sqnr_db(actual, expected):
    return (10 * torch.log10(expected.pow(2).mean() / (actual - expected).pow(2).mean())).item()


def latents(pipe, prompt="a photo of a cat", **kwargs):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **{**CALL, **kwargs}).images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    parts = tiny_components()
    write_diffusers_folder(root / "diffusers", *parts)
    write_config_dir(root / "config", *parts)
    save_file(ldm_state_dict(*parts[:3]), root / "model.safetensors")
    dense = load_pipeline(root / "diffusers", device="cpu", quantize=False)
    quant = load_pipeline(root / "diffusers", device="cpu", quantize=TINY_QUANT)
    return {"root": root, "parts": parts, "dense": dense, "quant": quant, "reference": latents(dense),
            "quant_latents": latents(quant)}


def test_tokenizer_is_sd15s():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and padded[3:] == [49407] * 74


def test_low_vram_layout(tiny):
    pipe = tiny["quant"]
    unet, text_encoder = pipe.unet, pipe.text_encoder
    for name in ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"):
        assert type(unet.get_submodule(name)) in (torch.nn.Conv2d, torch.nn.Linear), name
    assert isinstance(unet.down_blocks[0].resnets[0].conv1, Q4Conv2d)
    assert isinstance(unet.down_blocks[0].downsamplers[0].conv, Q4Conv2d)
    assert isinstance(unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k, Q4Linear)
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, Q4Conv2d)  # SD1.x: a 1x1 conv
    linears = [m for m in text_encoder.modules() if isinstance(m, (torch.nn.Linear, Q8Linear, Q4Linear))]
    assert linears and all(isinstance(m, Q8Linear) for m in linears)
    assert pipe.vae.device.type == "cpu"
    processor = unet.mid_block.attentions[0].transformer_blocks[0].attn1.processor
    assert type(processor).__name__ == "AttnProcessor2_0"  # scaled_dot_product_attention


def test_default_layout():
    unet_config, text_config = SDQuantConfig().unet_config(), SDQuantConfig().text_encoder_config()
    assert unet_config.weight == "q4_k" and unet_config.convs and text_config.weight == "q8_0" and not text_config.convs
    conv = torch.nn.Conv2d(320, 320, 3)
    assert unet_config.format_for("down_blocks.0.resnets.0.conv1", conv) == ("q4_k", None)
    for dense in ("conv_in", "conv_out", "time_embedding.linear_1"):
        assert unet_config.format_for(dense, conv)[0] is None
    assert unet_config.format_for("x", torch.nn.Linear(64, 64))[0] is None  # rows shorter than 128 stay dense
    assert SDQuantConfig(unet=None).unet_config() is None


def test_quantized_matches_dense(tiny):
    assert sqnr_db(tiny["quant_latents"], tiny["reference"]) >= MIN_SQNR_DB


def test_images_come_out(tiny):
    images = tiny["quant"]("a cat", num_inference_steps=1, height=16, width=16, output_type="np",
                           generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and images.min() >= 0 and images.max() <= 1
    pil = tiny["quant"]("a cat", num_inference_steps=1, height=16, width=16).images[0]
    assert pil.size == (16, 16)


def test_sequential_cfg_matches_batched(tiny):
    pipe = tiny["quant"]
    # fp32 both ways: the CPU kernels' default bf16 path depends on the rows (batch) they get.
    with backends.backend("auto", exact=True):
        batched = latents(pipe)
        pipe.enable_sequential_cfg()
        try:
            assert pipe.sequential_cfg
            sequential = latents(pipe)
        finally:
            pipe.enable_sequential_cfg(False)
    assert not pipe.sequential_cfg
    torch.testing.assert_close(sequential, batched, rtol=1e-4, atol=1e-4)


def test_single_file_matches_folder(tiny):
    pipe = load_pipeline(tiny["root"] / "model.safetensors", config=tiny["root"] / "config", device="cpu",
                         quantize=False)
    torch.testing.assert_close(latents(pipe), tiny["reference"], rtol=0, atol=0)


def test_ldm_names_agree_with_diffusers_converter(tiny):
    from diffusers import UNet2DConditionModel

    theirs = UNet2DConditionModel.from_single_file(str(tiny["root"] / "model.safetensors"), config=str(tiny["root"] / "config"),
                                                   subfolder="unet", local_files_only=True).state_dict()
    ours = tiny["parts"][0].state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], v) for k, v in ours.items())


def test_sd15_ldm_names():
    config = json.loads((loaders.sd15_config_dir() / "unet" / "config.json").read_text())
    assert ldm.diffusers_to_ldm("up_blocks.2.upsamplers.0.conv.weight", config) == "output_blocks.8.2.conv.weight"
    assert ldm.diffusers_to_ldm("up_blocks.0.upsamplers.0.conv.weight", config) == "output_blocks.2.1.conv.weight"
    assert ldm.diffusers_to_ldm("down_blocks.1.resnets.0.conv_shortcut.weight", config) == "input_blocks.4.0.skip_connection.weight"
    assert ldm.ldm_to_diffusers("middle_block.1.proj_out.bias", config) == "mid_block.attentions.0.proj_out.bias"
    assert ldm.ldm_to_diffusers("out.2.weight", config) == "conv_out.weight"
    assert ldm.ldm_to_diffusers("output_blocks.12.0.weight", config) is None


def test_prequantized_folder_loads_without_dense_unet(tiny, monkeypatch):
    out = save_pipeline(tiny["quant"], tiny["root"] / "prequantized")

    def forbidden(*args, **kwargs):
        raise AssertionError("a pre-quantized folder is built on meta and filled, never loaded dense or re-quantized")

    for name in ("quantize_on", "quantize_", "_load_dense", "_build_unet"):
        monkeypatch.setattr(loaders, name, forbidden)
    pipe = load_pipeline(out, device="cpu")
    assert not any(p.is_meta for p in [*pipe.unet.parameters(), *pipe.text_encoder.buffers()])
    torch.testing.assert_close(latents(pipe), tiny["quant_latents"], rtol=0, atol=0)


def _gguf_tensors(unet, prefix):
    """The tiny UNet the way GGUF tools store it: Q4_K where rows are a multiple of 256, Q8_0
    for the attention projections, one Q4_0 tensor, the rest F16/F32 (convs included)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    tensors, kinds = [], {}
    for key, value in unet.state_dict().items():
        name = prefix + ldm.diffusers_to_ldm(key, unet.config)
        if value.dim() == 2 and value.shape[1] % 256 == 0:
            tensors.append(GGUFTensor(name, "Q4_K", tuple(value.shape), q4k.quantize(value)))
        elif value.dim() == 2 and key.endswith(("to_k.weight", "to_v.weight")):
            tensors.append(GGUFTensor(name, "Q8_0", tuple(value.shape), q8_0.quantize(value)))
        elif key == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight":
            raw = torch.from_numpy(quantize(value.numpy(), GGMLQuantizationType.Q4_0))
            tensors.append(GGUFTensor(name, "Q4_0", tuple(value.shape), raw))
        else:
            tensors.append(dense_tensor(name, value.half() if value.dim() > 1 else value))
        kinds[key.removesuffix(".weight")] = tensors[-1].type
    return tensors, kinds


def test_gguf_unet_comfyui_style(tiny, caplog):
    unet = tiny["parts"][0]
    tensors, kinds = _gguf_tensors(unet, prefix="")
    path = tiny["root"] / "unet.gguf"
    write_gguf(path, tensors)
    # 3x3 convs stay dense here only to keep the CPU reference quantizer's time down.
    layout = SDQuantConfig(min_features=0, keep_dense=(*UNET_KEEP_DENSE, "*.conv1", "*.conv2", "*samplers.0.conv"))
    with caplog.at_level(logging.INFO, logger="tinykern.sd"):
        pipe = load_pipeline(tiny["root"] / "diffusers", unet=path, device="cpu", quantize=layout)
    packed = {t.name: t for t in tensors}
    adopted = "down_blocks.1.resnets.0.time_emb_proj"
    module = pipe.unet.get_submodule(adopted)
    assert kinds[adopted] == "Q4_K" and isinstance(module, Q4Linear)
    assert torch.equal(module.qweight, packed[ldm.diffusers_to_ldm(adopted + ".weight", unet.config)].data)
    k_proj = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    assert isinstance(pipe.unet.get_submodule(k_proj), Q8Linear)  # Q8_0 adopted as is, not re-quantized to Q4_K
    # The file decides: Q4_K where the layout keeps the layer dense, Q4_0 where it says Q4_K.
    assert type(pipe.unet.time_embedding.linear_2) is Q4Linear
    q_proj = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    module = pipe.unet.get_submodule(q_proj)
    assert type(module) is QuantLinear and module.format.name == "q4_0"
    assert torch.equal(module.qweight, packed[ldm.diffusers_to_ldm(q_proj + ".weight", unet.config)].data)
    assert "quantized by the layout from the file's dense weights" in caplog.text  # the F16 layers, said so
    assert sqnr_db(latents(pipe), tiny["reference"]) >= MIN_SQNR_DB


def test_gguf_whole_model_sdcpp_style(tiny):
    unet, text_encoder, vae = tiny["parts"][:3]
    tensors, _ = _gguf_tensors(unet, prefix="model.diffusion_model.")
    tensors += [dense_tensor(k, v) for k, v in ldm_state_dict(unet, text_encoder, vae).items()
                if not k.startswith("model.diffusion_model.")]
    path = tiny["root"] / "whole.gguf"
    write_gguf(path, tensors)
    # Dense: the packed tensors are dequantized, and the text encoder and VAE come from the file.
    pipe = load_pipeline(path, config=tiny["root"] / "config", device="cpu", quantize=False)
    assert type(pipe.unet.down_blocks[0].resnets[0].time_emb_proj) is torch.nn.Linear
    assert sqnr_db(latents(pipe), tiny["reference"]) >= MIN_SQNR_DB


# Latents SQNR floors after 2 CFG steps, the whole tiny UNet in one format (LDM layout, ComfyUI
# reshape): bits per weight set the error; Q2_K's 2.6 bits land lowest.
FORMAT_SQNR_FLOOR_DB = {"q2_k": 3.0, "q3_k": 8.0}


@pytest.mark.parametrize("name", list(FORMATS))
def test_gguf_unet_every_format_as_comfyui_writes_it(tiny, name, caplog, tmp_path):
    """Every 2-D and 4-D UNet weight quantized by libggml in `name`, tensors whose rows are not
    whole 256-blocks reshaped with comfy.gguf.orig_shape, the rest F32: layers whose rows are whole
    blocks of the format are adopted byte for byte, the others re-quantized in it and listed."""
    from test_gguf_comfy import comfy_tensor, write_file

    fmt = FORMATS[name]
    unet = tiny["parts"][0]
    entries, metadata, packed = [], [], {}
    for key, value in unet.state_dict().items():
        ldm_name = ldm.diffusers_to_ldm(key, unet.config)
        reshaped = value.numel() % 256 == 0 and value.shape[-1] % 256  # ComfyUI-GGUF's rule
        if value.dim() in (2, 4) and (reshaped or value.shape[-1] % fmt.block == 0):
            entry, meta = comfy_tensor(ldm_name, value.float(), fmt)
            packed[key.removesuffix(".weight")] = torch.from_numpy(entry[1])
        else:
            entry, meta = comfy_tensor(ldm_name, value.float(), GGMLQuantizationType.F32)
        entries.append(entry)
        metadata += meta
    path = tmp_path / f"unet-{name}.gguf"
    write_file(path, entries, metadata=metadata)
    with caplog.at_level(logging.INFO, logger="tinykern.sd"):
        pipe = load_pipeline(tiny["root"] / "diffusers", unet=path, device="cpu", quantize=TINY_QUANT)
    adopted = 0
    for layer, raw in packed.items():
        module = pipe.unet.get_submodule(layer)
        kept_dense = TINY_QUANT.unet_config().format_for(layer, unet.get_submodule(layer))[0] is None
        if unet.get_submodule(layer).weight[0].numel() % fmt.block == 0:  # rows of whole blocks: adopted
            assert module.format is fmt and torch.equal(module.qweight, raw.reshape(module.qweight.shape)), layer
            adopted += 1
        elif kept_dense:
            assert type(module) in (torch.nn.Linear, torch.nn.Conv2d), layer
        else:  # re-quantized in the file's format
            assert module.format is fmt, layer
    assert adopted > 0
    assert f"adopted {adopted} packed UNet weights" in caplog.text
    assert sqnr_db(latents(pipe), tiny["reference"]) >= FORMAT_SQNR_FLOOR_DB.get(name, MIN_SQNR_DB)


def test_clear_errors(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a diffusers pipeline"):
        load_pipeline(tmp_path / "empty")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_pipeline(tmp_path / "bad.safetensors")
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({k: v for k, v in ldm_state_dict(*tiny["parts"][:3]).items() if k.startswith("model.")}, unet_only)
    with pytest.raises(ValueError, match="not a complete SD1.x checkpoint"):
        load_pipeline(unet_only, config=tiny["root"] / "config")
