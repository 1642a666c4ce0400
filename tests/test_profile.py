"""tinykern.profile: quantized modules' forwards show up as ranges named after their module path
(seen through torch.profiler on CPU), pipeline stages too, and nothing does when it is off."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import tinykern
from tinykern import profile as tkprofile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(256, 256)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)

    def forward(self, x, image):
        return self.proj(x), self.conv(image)


class Model(nn.Module):
    """Q4Linear, Q4Conv2d and Q8Linear at nested paths, plus a ResidualVQ when present."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block()])
        self.text = nn.ModuleDict({"q_proj": nn.Linear(256, 128)})
        try:
            from tinykern.nn.residual_vq import ResidualVQ
        except ImportError:
            self.rvq = None
        else:
            self.rvq = ResidualVQ(dim=16, codebook_size=8, num_levels=2, kmeans_init=False).eval()

    def forward(self, x, image):
        y, z = self.blocks[0](x, image)
        out = [y, z, self.text["q_proj"](x)]
        if self.rvq is not None:
            out.append(self.rvq(x[:, :16])[0])
        return out


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = Model()
    tinykern.quantize_(m, tinykern.QuantConfig(overrides={"text.*": "q8_0"}))
    return m


def expected_paths(model):
    paths = {"blocks.0.proj", "blocks.0.conv", "text.q_proj"}
    return paths | ({"rvq"} if model.rvq is not None else set())


def inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 256, generator=gen), torch.randn(1, 32, 8, 8, generator=gen)


def event_names(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.fixture(autouse=True)
def switch_restored():
    before = tkprofile.enabled()
    yield
    assert tkprofile.enabled() == before, "a test left the profiling switch changed"
    assert not tkprofile._thread_list("ranges"), "a range was left open"


def test_module_types_are_quantized(model):
    assert isinstance(model.blocks[0].proj, tinykern.Q4Linear)
    assert isinstance(model.blocks[0].conv, tinykern.Q4Conv2d)
    assert isinstance(model.text["q_proj"], tinykern.Q8Linear)


def test_enabled_names_every_quantized_module(model):
    x, image = inputs()
    with tkprofile.nvtx(model):
        names = event_names(lambda: model(x, image))
    assert expected_paths(model) <= names


def test_ranges_wrap_the_module_work(model):
    x, image = inputs()
    with tkprofile.nvtx(model):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x, image)
    conv = [e for e in prof.events() if e.name == "blocks.0.conv"]
    assert len(conv) == 1
    assert conv[0].cpu_children, "the ops the module ran should nest inside its range"


def test_disabled_adds_no_ranges(model):
    x, image = inputs()
    assert not expected_paths(model) & event_names(lambda: model(x, image))
    with tkprofile.nvtx(model, enabled=False):
        assert not expected_paths(model) & event_names(lambda: model(x, image))


def test_exit_removes_hooks(model):
    x, image = inputs()
    with tkprofile.nvtx(model):
        assert model.blocks[0].proj._forward_pre_hooks
    assert not model.blocks[0].proj._forward_pre_hooks and not model.blocks[0].proj._forward_hooks
    assert not expected_paths(model) & event_names(lambda: model(x, image))


def test_global_switch_names_paths_without_a_model(model):
    x, image = inputs()
    session = tkprofile.nvtx()  # a plain call: the global switch, until close()
    try:
        assert tkprofile.enabled()
        names = event_names(lambda: model(x, image))
    finally:
        session.close()
    assert expected_paths(model) <= names
    assert not tkprofile.enabled()


def test_stage_ranges(model):
    x, image = inputs()
    assert "vae decode" not in event_names(lambda: _staged(model, x, image))
    with tkprofile.nvtx(model):
        names = event_names(lambda: _staged(model, x, image))
    assert {"denoise step 0", "vae decode"} <= names
    assert expected_paths(model) <= names


def _staged(model, x, image):
    with tkprofile.stage("denoise step 0"):
        model(x, image)
    with tkprofile.stage("vae decode"):
        model.blocks[0].conv(image)


def test_ranges_close_when_forward_raises(model):
    with tkprofile.nvtx(model), pytest.raises(ValueError):
        model.blocks[0].proj(torch.randn(2, 300))  # more features than its rows hold: the op refuses it
    # switch_restored checks that no range was left open


def test_env_var_turns_it_on_at_import():
    script = textwrap.dedent("""
        import torch
        from torch import nn
        from torch.profiler import profile, ProfilerActivity
        import tinykern
        from tinykern import profile as tkprofile
        assert tkprofile.enabled()
        model = nn.Sequential(nn.Sequential(nn.Linear(256, 64)))
        tinykern.quantize_(model)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(torch.randn(3, 256))
        assert "0.0" in {e.name for e in prof.events()}, sorted({e.name for e in prof.events()})
        print("ok")
    """)
    env = {**os.environ, "TINYKERN_NVTX": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
