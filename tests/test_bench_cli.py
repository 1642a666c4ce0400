"""`python -m tinykern.bench` end to end on the tiny shape set (seconds), writing into tmp_path:
the JSON names device, versions, ceilings and every row's op, implementation, shape and cost;
the Markdown has the tables and says why rows did not run; the plot exists when matplotlib does.
Then the format selection, and every format's rows built and checked with the torch backend."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tinykern.bench import __main__ as cli
from tinykern.bench import cases, machine, report, shapes
from tinykern.formats import FORMATS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "tinykern.bench", "--device", "cpu", "--quick", "--shapes", "tiny",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    slug = machine.slug(machine.device_name("cpu"))
    return done, out, slug


def test_exits_cleanly(run):
    done, _, _ = run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_json_describes_every_row(run):
    _, out, slug = run
    with open(out / f"{slug}.json") as f:
        results = json.load(f)
    assert results["device"]["type"] == "cpu" and results["device"]["slug"] == slug
    assert {"torch", "triton", "tinykern"} <= set(results["versions"])
    assert results["ceilings"]["bandwidth_GBps"] > 0 and results["ceilings"]["flops_TFLOPs"] > 0
    assert "other_processes_cpu_share" in results["machine_load"]
    assert results["formats"] == sorted(cases.DEFAULT_FORMATS, key=list(FORMATS).index)
    ran = {(r["op"], r["case"], r["impl"]) for r in results["rows"]}
    skipped = {(s["op"], s["case"], s["impl"]) for s in results["skipped"]}
    assert {op for op, _, _ in ran | skipped} == set(cases.ops_for(cases.DEFAULT_FORMATS))
    for op in cases.ops_for(cases.DEFAULT_FORMATS):
        for case in cases.CASES[op]("tiny"):
            for impl in cases.impls(op):
                assert (op, case.id, impl) in ran | skipped, f"{op} {case.id} {impl} neither ran nor was skipped"
    for r in results["rows"]:
        assert "error" not in r, r
        assert r["seconds"] > 0 and r["bytes"] > 0 and r["GBps"] > 0 and r["shape"] and r["dtype"] and r["detail"]
        assert r["percent_of_ceiling"] > 0 and r["bound"] in ("memory", "compute")
    dense = [r for r in results["rows"] if r["impl"] == "dense"]
    assert dense and all("dequant_then_matmul" in r["speedup"] for r in dense)
    # Triton on CPU is the interpreter: listed as not run, with the reason.
    assert any(s["impl"] == "triton" and "interpreter" in s["reason"] for s in results["skipped"])
    assert results["quantize_sd15"]["parameters"] == 859_520_964


def test_markdown_and_plot(run):
    _, out, slug = run
    text = (out / f"{slug}.md").read_text()
    for op in cases.ops_for(cases.DEFAULT_FORMATS):
        assert f"## {op}" in text
    assert "| case | implementation | time | GB/s |" in text
    assert "## Not run" in text and "## Ceilings measured in this run" in text
    if importlib.util.find_spec("matplotlib"):
        assert (out / f"{slug}.png").stat().st_size > 0
        assert f"![roofline]({slug}.png)" in text
    else:
        assert report.MATPLOTLIB_MISSING in text


def test_plot_without_matplotlib_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` fail
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    results = {"ceilings": {"bandwidth_GBps": 1.0, "flops_TFLOPs": 1.0, "dtype": "float32"}, "rows": [],
               "device": {"name": "x"}}
    assert report.plot_roofline(results, str(tmp_path / "x.png")) is None
    assert not (tmp_path / "x.png").exists()


def test_case_ids_are_unique_per_set():
    for which in shapes.SETS:
        for op in cases.OPS:
            ids = [c.id for c in cases.CASES[op](which)]
            assert len(ids) == len(set(ids)), (op, which)


def test_op_ids_come_from_the_format_records():
    # The default formats' ids are those saved results and --benchmark-compare match on.
    assert set(cases.ops_for(cases.DEFAULT_FORMATS)) == {
        "q4k_matmul", "q8_0_matmul", "q4k_conv2d", "q8_0_conv2d", "rvq_encode", "q4k_quantize", "q8_0_quantize"}
    for fmt in FORMATS.values():
        assert cases.format_of(fmt.op("matmul")) is fmt and cases.kind(fmt.op("conv2d")) == "conv2d"
        assert (fmt.op("quantize") in cases.OPS) == (fmt.quantize is not None)
    assert cases.parse_formats("all") == tuple(FORMATS)
    assert cases.parse_formats(" Q5_K,q4_k,q5_k") == ("q5_k", "q4_k")


def test_selection_of_formats_and_ops():
    assert cli._select(None, None) == cases.ops_for(cases.DEFAULT_FORMATS)
    assert cli._select(None, "q5_k_matmul") == ("q5_k_matmul",)  # --ops alone picks its formats
    assert cli._select("q6_k", None) == ("q6_k_matmul", "q6_k_conv2d", "rvq_encode", "q6_k_quantize")
    assert cli._select("all", "q2_k_conv2d,rvq_encode") == ("q2_k_conv2d", "rvq_encode")
    for formats, op_list in (("q4_k,q9_k", None), ("", None), (None, "q9_k_matmul"), ("q4_k", "q5_k_matmul")):
        with pytest.raises(ValueError):
            cli._select(formats, op_list)


def test_unknown_format_is_refused_in_one_line_before_any_work(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "tinykern.bench", "--formats", "q4_k,q9_z", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "q9_z" in done.stderr, done.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_builds_valid_rows(name):
    """Each format's tiny rows run on the torch backend within the bounds: the drawn blocks are
    valid weights, and MAX_QUANT_ERROR holds the quantizer (and rejects a broken one)."""
    fmt = FORMATS[name]
    workspace = cases.Workspace()
    for op in cases.ops_for((name,), kinds=("matmul", "conv2d", "quantize")):
        impl = "tinykern" if cases.kind(op) == "quantize" else "torch"
        for case in cases.CASES[op]("tiny"):
            row = cases.prepare(op, case, impl, "cpu", workspace)
            figures = row.check(row.fn())
            assert figures["rel_error"] >= 0
            if cases.kind(op) == "quantize":
                assert figures["rel_error"] > cases.MAX_QUANT_ERROR[name] / 4  # the bound is not loose by far
                with pytest.raises(AssertionError):
                    row.check(fmt.quantize(torch.zeros_like(workspace.get(op, case, "cpu")["w"])))
