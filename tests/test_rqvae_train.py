"""2-step training smoke runs of every stage on a tiny captioned image folder, resume, the CLI
parser, and errors on bad data."""

import argparse
import json

import pytest
import torch
from safetensors import safe_open

from tinykern.pipelines.rqvae import cli
from tinykern.pipelines.rqvae.train import load_generator, load_refiner, load_tokenizer, train

PIL = pytest.importorskip("PIL.Image")
CAPTIONS = ["a red square", "a green circle on blue", "two yellow dots", "a black line"]


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    colours = [(200, 30, 30), (30, 200, 30), (230, 220, 40), (10, 10, 10)]
    rows = []
    for i, (colour, caption) in enumerate(zip(colours, CAPTIONS)):
        PIL.new("RGB", (48 + 8 * i, 40), colour).save(root / f"img{i}.png")
        rows.append(json.dumps({"file": f"img{i}.png", "caption": caption, "rating": 5 + i}))
    (root / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return root


def quiet(*_):
    pass


def test_two_steps_of_every_stage(folder, tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "run"
    common = dict(data=str(folder), out=out, steps=2, batch_size=2, checkpoint_every=1, eval_every=2, log=quiet)
    metrics = train("tokenizer", **common)
    assert {"psnr_l1", "psnr_l4", "usage_l1", "usage_l4"} <= set(metrics)
    metrics = train("refiner", **common)
    assert {"l1", "perceptual", "psnr_rqvae", "psnr_refined"} <= set(metrics)
    metrics = train("generator", **common)
    assert metrics["loss"] > 0
    for stage in ("tokenizer", "refiner", "generator"):
        assert (out / f"{stage}.safetensors").is_file() and (out / f"{stage}-last.safetensors").is_file()
        logged = [json.loads(line) for line in (out / f"{stage}-metrics.jsonl").read_text().splitlines()]
        assert logged[-1]["step"] == 2
    vq, refiner, (generator, words) = load_tokenizer(out / "tokenizer.safetensors"), \
        load_refiner(out / "refiner.safetensors"), load_generator(out / "generator.safetensors")
    assert vq.grid == 8 and "yellow" in words.words
    codes = generator.generate(words(["a red square"]), words([""]))
    assert refiner(vq.decode(codes)).shape == (1, 3, 64, 64)


def test_generator_over_clip_bpe(folder, tmp_path):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    out = tmp_path / "run"
    common = dict(data=str(folder), out=out, steps=2, batch_size=2, eval_every=2, log=quiet)
    train("tokenizer", **common)
    train("generator", text_tokenizer="clip", **common)
    generator, tokens = load_generator(out / "generator.safetensors")
    ids = tokens(["a red square"])
    assert ids.shape == (1, tokens.max_length) and int(ids[0, 0]) == 49406  # CLIP's start token
    assert generator.text.embed.num_embeddings == len(tokens) == 49408
    assert generator.generate(ids, tokens([""])).shape == (1, 8, 8, 4)


def test_generator_over_a_user_supplied_clip_text_model(folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    from tinykern.pipelines.rqvae.generate import Pipeline

    torch.manual_seed(0)
    clip = tmp_path / "text_encoder"
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=77)
    transformers.CLIPTextModel(config).save_pretrained(clip)
    out = tmp_path / "run"
    common = dict(data=str(folder), out=out, steps=2, batch_size=2, eval_every=2, log=quiet)
    train("tokenizer", **common)
    train("refiner", **common)
    train("generator", text_encoder=str(clip), **common)
    with safe_open(str(out / "generator.safetensors"), "pt") as f:
        assert not any(".clip." in k for k in f.keys())  # the user's CLIP weights are not copied
    moved = tmp_path / "moved"
    clip.rename(moved)
    with pytest.raises(ValueError, match="cannot load a CLIPTextModel from .*text_encoder"):
        load_generator(out / "generator.safetensors")
    pipe = Pipeline.load(out, text_encoder=moved)
    frozen = pipe.generator.text.clip.get_input_embeddings().weight
    assert torch.equal(frozen, transformers.CLIPTextModel.from_pretrained(moved).get_input_embeddings().weight)
    images, _ = pipe.generate(["a red square"])
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_resume_continues_from_the_last_checkpoint(folder, tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "run"
    train("tokenizer", data=str(folder), out=out, steps=2, batch_size=2, checkpoint_every=1, eval_every=1, log=quiet)
    with safe_open(str(out / "tokenizer-last.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "2" and any(k.startswith("optim.") for k in f.keys())
    lines = []
    train("tokenizer", data=str(folder), out=out, steps=3, batch_size=2, checkpoint_every=1, eval_every=1,
          resume=True, log=lines.append)
    assert any("resumed" in line and "step 2" in line for line in lines)
    steps = [json.loads(line)["step"] for line in (out / "tokenizer-metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_init_starts_from_trained_weights_and_refuses_another_config(folder, tmp_path):
    torch.manual_seed(0)
    first = tmp_path / "first"
    train("tokenizer", data=str(folder), out=first, steps=2, batch_size=2, log=quiet)
    lines = []
    train("tokenizer", data=str(folder), out=tmp_path / "second", steps=1, batch_size=2, lr=1e-12,
          init=first / "tokenizer.safetensors", log=lines.append)
    assert any("starting from the weights" in line for line in lines)
    before, after = load_tokenizer(first / "tokenizer.safetensors"), load_tokenizer(tmp_path / "second" / "tokenizer.safetensors")
    for (name, a), b in zip(before.state_dict().items(), after.state_dict().values()):
        if "quantizer" not in name:  # the codebooks' EMA moves without the optimizer
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=name)
    with pytest.raises(ValueError, match="cannot start from .*config"):
        train("tokenizer", data=str(folder), out=tmp_path / "third", steps=1, batch_size=2, resolution=32,
              init=first / "tokenizer.safetensors", log=quiet)


def test_training_on_an_unreadable_image_names_it(folder, tmp_path):
    (folder / "img1.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ValueError, match="cannot read image .*img1.png"):
        train("tokenizer", data=str(folder), out=tmp_path / "run", steps=2, batch_size=4, log=quiet)


def test_training_on_an_empty_folder_names_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images .*empty"):
        train("tokenizer", data=str(tmp_path / "empty"), out=tmp_path / "run", steps=2, log=quiet)


def test_cli_parser():
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["rqvae", "train", "generator", "--data", "synthetic", "--steps", "5", "--resume",
                              "--init", "g.safetensors"])
    assert (args.rqvae_command, args.stage, args.steps, args.resume, args.init) == \
        ("train", "generator", 5, True, "g.safetensors")
    args = parser.parse_args(["rqvae", "generate", "--prompt", "a red circle", "--n", "2", "--no-quant", "--out", "g.png"])
    assert args.no_quant and args.n == 2 and args.out == "g.png"


def test_folder_with_a_text_caption_per_image(tmp_path):
    root = tmp_path / "images"
    (root / "part").mkdir(parents=True)
    for i, (colour, caption) in enumerate(zip([(200, 30, 30), (30, 200, 30)], CAPTIONS)):
        folder = root / "part" if i else root
        PIL.new("RGB", (40, 48), colour).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    out = tmp_path / "run"
    train("tokenizer", data=str(root), out=out, steps=1, batch_size=2, eval_every=1, log=quiet)
    train("generator", data=str(root), out=out, steps=1, batch_size=2, eval_every=1, log=quiet)
    _, words = load_generator(out / "generator.safetensors")
    assert {"red", "square", "green", "circle"} <= set(words.words)


def test_evaluation_runs_every_eval_every_steps_only(folder, tmp_path):
    """The last step is evaluated only when --eval-every divides --steps; it logs its loss."""
    out = tmp_path / "run"
    train("tokenizer", data=str(folder), out=out, steps=3, batch_size=2, eval_every=2, log=quiet)
    logged = [json.loads(line) for line in (out / "tokenizer-metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [2, 3]
    assert "psnr_l4" in logged[0] and "psnr_l4" not in logged[1] and logged[1]["loss"] > 0


@pytest.mark.parametrize("stage", ["refiner", "generator"])
def test_standard_preset_without_its_tokenizer_is_refused(stage, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=f"the {stage} stage with --preset standard needs a standard tokenizer .*"
                                         f"{out / 'tokenizer.safetensors'}"):
        train(stage, out=out, preset="standard", steps=1, log=quiet)
    assert not out.exists()


@pytest.mark.parametrize("arguments, message", [
    ({"steps": 0}, "--steps 0: must be at least 1"), ({"eval_every": 0}, "--eval-every 0: must be at least 1"),
    ({"batch_size": 0}, "--batch-size 0"), ({"lr": 0.0}, "--lr 0.0: must be above 0"),
    ({"resolution": 60}, "--resolution 60: must be a positive multiple of"),
])
def test_bad_numbers_are_refused_before_anything_is_written(arguments, message, folder, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train("tokenizer", data=str(folder), out=out, **{"steps": 1, "batch_size": 2, **arguments}, log=quiet)
    assert not out.exists()


def test_shipped_preset_without_a_tokenizer_reads_the_shipped_one_and_says_so(tmp_path):
    lines = []
    train("refiner", out=tmp_path / "run", steps=1, batch_size=2, eval_every=1, log=lines.append)
    assert any("reading the shipped tokenizer" in line for line in lines), lines
