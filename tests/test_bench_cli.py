"""`python -m tinykern.bench` end to end on the tiny shape set (seconds), writing into tmp_path:
the JSON names device, versions, ceilings and every row's op, implementation, shape and cost;
the Markdown has the tables and says why rows did not run; the plot exists when matplotlib does."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tinykern.bench import cases, machine, report, shapes

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
    ran = {(r["op"], r["case"], r["impl"]) for r in results["rows"]}
    skipped = {(s["op"], s["case"], s["impl"]) for s in results["skipped"]}
    for op in cases.OPS:
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
    for op in cases.OPS:
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
