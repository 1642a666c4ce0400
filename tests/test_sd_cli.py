"""`tinykern sd generate|quantize` end to end on a tiny model folder."""

import argparse
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

from PIL import Image  # noqa: E402
from conftest import refused  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import tinykern  # noqa: E402
from tinykern.pipelines.sd import cli, loaders  # noqa: E402
from tinykern.pipelines.sd.testing import tiny_components, write_diffusers_folder  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tinykern.__file__)))


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


def test_errors_after_loading_are_one_line(model, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run("generate", "--model", model / "model", "--prompt", "x", "--lora", model / "odd.safetensors",
            "--device", "cpu", "--dense", "--out", tmp_path / "x.png")
    assert info.value.code == 2 and "lora_unet_nowhere" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):  # argparse: size must look like WxH
        run("generate", "--model", model / "model", "--prompt", "x", "--size", "big", "--out", tmp_path / "x.png")


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model load starts."""
    def load_pipeline(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(loaders, "load_pipeline", load_pipeline)


BAD_GENERATE = {
    "missing output folder": (["--out", "{tmp}/no/such/folder/x.png"], "folder .*no/such/folder does not exist"),
    "unknown extension": (["--out", "{tmp}/x.xyz"], r"\.xyz is not an image format"),
    "output is a folder": (["--out", "{tmp}"], "is a folder"),
    "zero steps": (["--steps", "0"], "--steps 0: must be at least 1"),
    "negative guidance": (["--guidance", "-1"], "--guidance -1.0: must be at least 0"),
    "missing model": (["--model", "{tmp}/nothing"], "--model .*nothing: does not exist"),
    "missing lora": (["--lora", "{tmp}/missing.safetensors:0.5"], "--lora .*missing.safetensors: does not exist"),
    "missing unet": (["--unet", "{tmp}/unet.gguf"], "--unet .*unet.gguf: does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_GENERATE))
def test_generate_refuses_bad_arguments_before_loading(case, model, tmp_path, capsys, no_loading):
    extra, message = BAD_GENERATE[case]
    argv = {"--model": model / "model", "--prompt": "a cat", "--device": "cpu", "--out": tmp_path / "image.png"}
    for flag, value in zip(extra[::2], extra[1::2]):
        argv[flag] = value.format(tmp=tmp_path)
    err = refused(capsys, "sd", "generate", *[item for pair in argv.items() for item in pair])
    assert re.fullmatch(f"tinykern sd generate: error: .*{message}.*\n", err), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("command", ["generate", "quantize"])
def test_cuda_without_a_gpu_is_refused_before_loading(command, model, tmp_path, capsys, no_loading):
    extra = ["--prompt", "a cat", "--out", tmp_path / "x.png"] if command == "generate" else ["--out", tmp_path / "q"]
    err = refused(capsys, "sd", command, "--model", model / "model", "--device", "cuda", *extra)
    assert err == f"tinykern sd {command}: error: --device cuda: no CUDA device is available\n"
    assert list(tmp_path.iterdir()) == []


def test_quantize_refuses_a_folder_that_is_not_empty(model, tmp_path, capsys, no_loading):
    (tmp_path / "keep.txt").write_text("mine")
    err = refused(capsys, "sd", "quantize", "--model", model / "model", "--device", "cpu", "--out", tmp_path)
    assert "is not empty" in err and [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_paths_expand_the_home_folder(model, tmp_path, capsys, monkeypatch, no_loading):
    monkeypatch.setenv("HOME", str(tmp_path))
    err = refused(capsys, "sd", "generate", "--model", "~/absent", "--prompt", "x", "--out", "~/x.png")
    assert f"--model {tmp_path / 'absent'}: does not exist" in err


def test_importing_the_pipeline_prints_no_torchvision_notice(tmp_path):
    """transformers warns on diffusers' import that torchvision is missing; those lines are
    dropped (and only those: the test also checks a warning of the same logger still shows)."""
    probe = ("import logging, tinykern.pipelines.sd.loaders; "
             "logging.getLogger('transformers.utils.import_utils').warning('still shown')")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr
    assert "torchvision" not in result.stderr and "still shown" in result.stderr, result.stderr


def test_a_failed_save_leaves_no_folder(tmp_path, monkeypatch):
    """save_pipeline (what `sd quantize` ends with) writes under a temporary name: a save that
    fails after its first files leaves nothing behind."""
    class Component:
        def save_config(self, folder):
            (folder / "config.json").write_text("{}")

    def save_quantized(module, path):
        path.write_bytes(b"partial")
        raise RuntimeError("the disk filled up")

    monkeypatch.setattr(loaders, "save_quantized", save_quantized)
    with pytest.raises(RuntimeError, match="disk filled up"):
        loaders.save_pipeline(argparse.Namespace(unet=Component()), tmp_path / "quantized")
    assert list(tmp_path.iterdir()) == []
