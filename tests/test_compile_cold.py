"""torch.compile(fullgraph=True) of a quantized model before any eager call ("cold"), and
after switching to a backend not loaded yet: Dynamo cannot trace an import, so the backends'
implementations must be loaded outside the traced code (tinykern.backends.preload).

One fresh interpreter runs every case: an import done by an earlier test in this process
would hide the bug. It compiles with the "aot_eager" backend: the import problem is in
Dynamo's tracing (run in full, with the fake kernels under AOTAutograd), and Inductor's code
generation, slow on a small CPU, is covered by the ops' own compile tests.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tinykern import backends

SCRIPT = r"""
import contextlib, json, sys
import torch
from torch import nn
from tinykern import Q4Conv2d, Q4Linear, Q8Linear, backends

torch.manual_seed(0)
model = nn.Sequential(
    Q4Conv2d.from_conv(nn.Conv2d(32, 8, 3, padding=1)), nn.Flatten(),
    Q4Linear.from_linear(nn.Linear(128, 64)), nn.ReLU(), Q8Linear.from_linear(nn.Linear(64, 16)))
x = torch.randn(2, 32, 4, 4)
results = {}
for name in sys.argv[1:]:
    torch._dynamo.reset()
    loaded_before = sorted(backends._loaded)
    try:
        # "env": no backend() context, whatever TINYKERN_BACKEND says.
        with backends.backend(name) if name != "env" else contextlib.nullcontext():
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
            eager = model(x)
        results[name] = {"loaded_before": loaded_before, "max_diff": (compiled - eager).abs().max().item(),
                         "finite": bool(torch.isfinite(eager).all())}
    except Exception as e:
        results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
print(json.dumps(results))
"""


def runnable_backends():
    return ["auto"] + [b for b in backends.BACKENDS if backends.unavailable_reason(b, "cpu", "q4k_conv2d") is None]


def run_cold(tmp_path, names, **env):
    """Run SCRIPT on `names` in a fresh interpreter; its results by name. The child inherits
    TRITON_INTERPRET=1 from conftest where there is no GPU."""
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *names], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in names:
        r = results[name]
        assert "error" not in r, f"{name}: {r['error']}"
        assert r["finite"] and r["max_diff"] <= 1e-5, (name, r)
    return results


def test_compile_cold_on_every_cpu_backend(tmp_path, monkeypatch):
    monkeypatch.delenv("TINYKERN_BACKEND", raising=False)
    names = runnable_backends()
    results = run_cold(tmp_path, names)
    if "triton" in names:
        # The case the preload is for: a backend whose kernels nothing had imported yet.
        assert "tinykern.kernels.triton" not in results["triton"]["loaded_before"]


def test_compile_cold_with_triton_forced_by_the_environment(tmp_path):
    # (The other CPU backends are loaded by `import tinykern` whatever the environment says.)
    reason = backends.unavailable_reason("triton", "cpu", "q4k_conv2d")
    if reason is not None:
        pytest.skip(reason)
    run_cold(tmp_path, ["env"], TINYKERN_BACKEND="triton")
