"""The command line, run as a user runs it: `python -m tinykern info|demo` in a subprocess, from a
scratch directory, with tinykern found the way this test process found it."""

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import refused

import tinykern
from tinykern import _ext, backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tinykern.__file__)))


def run(args, cwd, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.pop("TINYKERN_BACKEND", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_info(tmp_path):
    result = run(["-m", "tinykern", "info"], tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"tinykern {tinykern.__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert "extension tinykern._C:" in out
    assert "backends on cpu:" in out
    for name in backends.BACKENDS:
        assert re.search(rf"^  {name}\s+(usable for|unavailable: )", out, re.M), f"no line for backend {name}:\n{out}"
    assert re.search(r"^  torch\s+usable for matmul of every format; conv2d of every format", out, re.M)
    assert re.search(r"^  auto picks (cpu|torch) for q4k_matmul", out, re.M)
    if _ext.available():  # built and loadable here: `python -m tinykern info` must see it too
        assert "extension tinykern._C: built" in out, out
        assert re.search(r"^  auto picks cpu for q4k_matmul", out, re.M), out
    assert list(tmp_path.iterdir()) == []  # wrote nothing where it ran


def test_extension_loads_whatever_the_import_order(tmp_path):
    """`import tinykern` as a script's first import must find _C as well as after `import torch`
    (_C links against torch's shared libraries, which only `import torch` loads)."""
    probe = "from tinykern import _ext; print(_ext.available(), _ext.ERROR)"
    first = run(["-W", "ignore", "-c", "import tinykern; " + probe], tmp_path)
    after = run(["-W", "ignore", "-c", "import torch, tinykern; " + probe], tmp_path)
    assert first.returncode == 0 and after.returncode == 0, first.stderr + after.stderr
    assert first.stdout == after.stdout, f"import tinykern first: {first.stdout!r}; after torch: {after.stdout!r}"


def test_no_command_is_a_usage_error(tmp_path):
    result = run(["-m", "tinykern"], tmp_path)
    assert result.returncode == 2
    assert "usage: tinykern" in result.stderr


# The full demo quantizes ~107 M weights: about 15 s on an idle machine, minutes on a busy 2-core
# one. By default the subprocess runs demo.run() on the first UNet level only (its real SD1.5
# shapes, 16 layers); TINYKERN_FULL_DEMO=1 runs the whole stack.
FULL_DEMO = os.environ.get("TINYKERN_FULL_DEMO") == "1"
FIRST_LEVEL_ONLY = """
import torch
import tinykern.demo as demo

full = demo.sd15_block_stack


def first_level():
    with torch.device("meta"):
        stack = full()
    small = type(stack)({k: v for k, v in stack.items() if k.startswith("level320")}).to_empty(device="cpu")
    for layer in small.values():
        layer.reset_parameters()
    return small


demo.sd15_block_stack = first_level
demo.run()
"""


@pytest.mark.slow
def test_demo(tmp_path):
    """tinykern.demo.run() in a subprocess: the table header, its rows and the 'total' row."""
    args = ["-m", "tinykern", "demo"] if FULL_DEMO else ["-c", FIRST_LEVEL_ONLY]
    result = run(args, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.match(r"SD1.5-shaped block stack, random weights, quantized to Q4_K in [0-9.]+ s on cpu", lines[0])
    header = next(i for i, line in enumerate(lines) if line.startswith("layers"))
    assert lines[header].split() == ["layers", "count", "fp16", "bytes", "Q4_K", "bytes", "ratio", "output", "rel", "err"]
    rows = {}
    for line in lines[header + 1:]:
        if line.startswith("backend:"):
            break
        kind, count, *rest = line.split()
        rows[kind] = (int(count), *(float(v.replace(",", "")) for v in rest))
    assert set(rows) == {"conv3x3", "linear", "conv1x1", "total"}
    total = rows.pop("total")
    assert len(total) == 4  # count, fp16 bytes, Q4_K bytes, ratio: no error column
    # 16 layers per level: 3 conv3x3, 2 conv1x1, 11 linear; the total adds up the rows.
    levels = 3 if FULL_DEMO else 1
    assert (rows["conv3x3"][0], rows["conv1x1"][0], rows["linear"][0]) == (3 * levels, 2 * levels, 11 * levels)
    assert total[0] == 16 * levels == sum(r[0] for r in rows.values())
    assert total[1] == sum(r[1] for r in rows.values()) and total[2] == sum(r[2] for r in rows.values())
    assert total[3] == pytest.approx(total[1] / total[2], abs=0.006)
    # fp16 -> Q4_K: 2 bytes vs 4.5 bits per weight (3.56x), less where rows of 320 pad to 512.
    assert (3.3 if FULL_DEMO else 2.8) < total[3] <= 3.56
    for kind, (_, fp16, q4, ratio, err) in rows.items():
        assert ratio == pytest.approx(fp16 / q4, abs=0.006)
        assert 0 < err < 0.1, f"{kind}: output relative error {err}"
    assert re.search(rf"backend: (cpu|torch) \(linear\), (cpu|torch) \(conv\); {16 * levels} of {16 * levels} layers quantized",
                     result.stdout)
    assert list(tmp_path.iterdir()) == []


def test_every_command_with_a_device_refuses_cuda_without_a_gpu(tmp_path, capsys, monkeypatch):
    """Every subcommand of `tinykern --help` that takes --device, before it loads anything."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from tinykern.pipelines.rqvae import generate

    def fail(*args, **kwargs):
        raise AssertionError("loaded a model before checking the arguments")

    monkeypatch.setattr(generate.Pipeline, "load", fail)
    commands = {"demo": [], "sd generate": ["--model", tmp_path, "--prompt", "x", "--out", tmp_path / "x.png"],
                "sd quantize": ["--model", tmp_path, "--out", tmp_path / "q"],
                "rqvae generate": ["--prompt", "x", "--out", tmp_path / "x.png"],
                "rqvae demo": ["--out", tmp_path / "x.png"]}
    for name, argv in commands.items():
        err = refused(capsys, *name.split(), *argv, "--device", "cuda")
        assert err == f"tinykern {name}: error: --device cuda: no CUDA device is available\n", err
    assert list(tmp_path.iterdir()) == []


def test_rqvae_commands_refuse_bad_arguments_in_one_line(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    PIL = pytest.importorskip("PIL.Image")
    PIL.new("RGB", (8, 8)).save(images / "lonely.png")
    cases = [
        (["rqvae", "generate", "--prompt", "x", "--n", "0", "--out", tmp_path / "g.png"], "--n 0: must be at least 1"),
        (["rqvae", "generate", "--prompt", "x", "--out", tmp_path / "g.xyz"], "is not an image format"),
        (["rqvae", "demo", "--out", tmp_path / "missing" / "d.png"], "does not exist"),
        (["rqvae", "train", "tokenizer", "--data", tmp_path / "nothing", "--out", tmp_path / "run"],
         "--data .*nothing: does not exist"),
        (["rqvae", "train", "tokenizer", "--data", images, "--out", tmp_path / "run"], "lonely.png has no caption"),
        (["rqvae", "train", "generator", "--preset", "standard", "--out", tmp_path / "run"],
         "needs a standard tokenizer .*tokenizer.safetensors"),
        (["rqvae", "train", "tokenizer", "--steps", "0", "--out", tmp_path / "run"], "--steps 0: must be at least 1"),
    ]
    for argv, message in cases:
        err = refused(capsys, *argv)
        assert re.match(f"tinykern rqvae {argv[1]}: error: .*{message}", err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_images_are_saved_whole_or_not_at_all(tmp_path):
    """An image save that fails half-way leaves neither a truncated file nor a temporary one;
    one that succeeds replaces the old image."""
    from PIL import Image

    from tinykern.pipelines.cli_checks import save_image

    class Failing:
        def save(self, f, format):
            f.write(b"\x89PNG half")
            raise OSError("disk full")

    path = tmp_path / "x.png"
    with pytest.raises(OSError, match="disk full"):
        save_image(Failing(), path)
    assert list(tmp_path.iterdir()) == []
    image = Image.new("RGB", (3, 2), (200, 10, 10))
    save_image(image, path)
    assert list(tmp_path.iterdir()) == [path] and Image.open(path).getpixel((2, 1)) == (200, 10, 10)
