"""`tinykern sd generate|quantize` end to end on a tiny model folder."""

import argparse
import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from tinykern.pipelines.sd import cli  # noqa: E402
from tinykern.pipelines.sd.testing import tiny_components, write_diffusers_folder  # noqa: E402


def run(*argv):
    parser = argparse.ArgumentParser(prog="tinykern")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sd", *map(str, argv)])
    args.func(args)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdcli")
    unet, text_encoder, vae, scheduler = tiny_components()
    write_diffusers_folder(root / "model", unet, text_encoder, vae, scheduler)
    layer = "down_blocks.1.resnets.0.conv1"  # a 3x3 conv: down 3x3, up 1x1
    conv = unet.get_submodule(layer)
    key = "lora_unet_" + layer.replace(".", "_")
    save_file({f"{key}.lora_down.weight": torch.randn(4, conv.in_channels, 3, 3) * 0.01,
               f"{key}.lora_up.weight": torch.randn(conv.out_channels, 4, 1, 1) * 0.01,
               f"{key}.alpha": torch.tensor(4.0)}, root / "lora.safetensors")
    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 2)}, root / "odd.safetensors")
    return root


def test_generate_with_lora_and_preset(model, tmp_path, capsys):
    out = tmp_path / "image.png"
    run("generate", "--model", model / "model", "--prompt", "a cat", "--negative", "blurry", "--lora",
        f"{model / 'lora.safetensors'}:0.8", "--preset", "hyper-sd-2step", "--size", "16x24", "--seed", "1",
        "--device", "cpu", "--dense", "--out", out)  # quantized generation: test_quantize_then_generate
    assert Image.open(out).size == (16, 24)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "2 steps" in line and "s/step" in line and "peak VRAM n/a (CPU)" in line


def test_quantize_then_generate(model, tmp_path, capsys):
    folder = tmp_path / "quantized"
    run("quantize", "--model", model / "model", "--device", "cpu", "--out", folder)
    assert (folder / "tinykern_sd.json").exists() and (folder / "unet" / "tinykern.safetensors").exists()
    out = tmp_path / "image.png"
    run("generate", "--model", folder, "--prompt", "a cat", "--steps", "1", "--guidance", "1.0", "--scheduler", "euler",
        "--size", "16x16", "--device", "cpu", "--out", out)
    assert Image.open(out).size == (16, 16)


def test_long_prompt_is_truncated_with_a_warning(model, tmp_path, capsys):
    run("generate", "--model", model / "model", "--prompt", "a very long prompt " * 30, "--steps", "1",
        "--size", "16x16", "--device", "cpu", "--dense", "--out", tmp_path / "image.png")
    assert "truncated" in capsys.readouterr().err


def test_clear_errors(model, tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        run("generate", "--model", tmp_path / "missing", "--prompt", "x", "--out", tmp_path / "x.png")
    with pytest.raises(SystemExit, match="lora_unet_nowhere"):
        run("generate", "--model", model / "model", "--prompt", "x", "--lora", model / "odd.safetensors",
            "--device", "cpu", "--dense", "--out", tmp_path / "x.png")
    with pytest.raises(SystemExit):  # argparse: size must look like WxH
        run("generate", "--model", model / "model", "--prompt", "x", "--size", "big", "--out", tmp_path / "x.png")
