"""Backend selection: forcing, the TINYKERN_BACKEND variable, the context manager, and what
`auto` picks on CPU."""

import importlib.util

import pytest
import torch

import tinykern
from tinykern import _ext, backends, ops
from tinykern.formats import q4k
from test_cpu_int8 import ggml_error

OPS = ("q4k_matmul", "q4k_conv2d", "q8_0_matmul", "q4k_dequantize", "q8_0_dequantize")


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("TINYKERN_BACKEND", raising=False)


@pytest.fixture
def q4_args(gen):
    w = q4k.quantize(torch.randn(8, 256, generator=gen))
    return torch.randn(3, 256, generator=gen), w


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match=r"'fastest'.*triton.*cuda.*cpu.*torch"):
        with tinykern.backend("fastest"):
            pass
    assert backends.current() == "auto"
    with pytest.raises(ValueError, match="unknown backend"):
        backends.register("q4k_matmul", "metal")


def test_unknown_backend_in_env_is_a_value_error(monkeypatch, q4_args):
    monkeypatch.setenv("TINYKERN_BACKEND", "fastest")
    with pytest.raises(ValueError, match="fastest"):
        ops.q4k_matmul(*q4_args)


def test_forcing_cuda_on_cpu_tensors_says_why(q4_args):
    with tinykern.backend("cuda"):
        with pytest.raises(RuntimeError) as info:
            ops.q4k_matmul(*q4_args)
    message = str(info.value)
    assert "'cuda'" in message and "q4k_matmul" in message
    assert "runs on cuda tensors, not cpu" in message


def test_forcing_cpu_without_the_extension_says_why(q4_args):
    if _ext.available():
        pytest.skip("tinykern._C is built: the cpu backend is available")
    with tinykern.backend("cpu"):
        with pytest.raises(RuntimeError, match=r"tinykern\._C is not built"):
            ops.q4k_matmul(*q4_args)


def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch, q4_args):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = backends.unavailable_reason("triton", "cpu")
    assert reason is not None and ("TRITON_INTERPRET" in reason or "not installed" in reason)
    with tinykern.backend("triton"):
        with pytest.raises(RuntimeError, match="'triton'"):
            ops.q4k_matmul(*q4_args)


def test_forced_backend_never_falls_back(q4_args):
    """A forced backend without the op raises rather than running another backend."""
    reason = backends.unavailable_reason("torch", "cpu", "no_such_op")
    assert reason == "the torch backend has no no_such_op kernel"
    with tinykern.backend("torch"), pytest.raises(RuntimeError, match="no_such_op"):
        backends.resolve("no_such_op", torch.device("cpu"))


def test_env_var_is_honoured(monkeypatch, q4_args):
    monkeypatch.setenv("TINYKERN_BACKEND", "torch")
    assert backends.current() == "torch"
    for op in OPS:
        assert backends.resolve(op, torch.device("cpu"))[0] == "torch"
    # Read at call time: switching it changes the next call.
    monkeypatch.setenv("TINYKERN_BACKEND", "cuda")
    assert backends.current() == "cuda"
    with pytest.raises(RuntimeError, match="cuda"):
        ops.q4k_matmul(*q4_args)
    # The context manager wins over the variable.
    with tinykern.backend("torch"):
        assert backends.current() == "torch"
        x, w = q4_args
        assert ops.q4k_matmul(x, w).shape == (3, 8)


def test_context_manager_restores_previous_setting():
    assert backends.current() == "auto"
    with tinykern.backend("torch"):
        assert backends.current() == "torch"
        with tinykern.backend("triton"):
            assert backends.current() == "triton"
            with tinykern.backend("auto"):
                assert backends.current() == "auto"
            assert backends.current() == "triton"
        assert backends.current() == "torch"
    assert backends.current() == "auto"
    # Also when the body raises.
    with pytest.raises(KeyError):
        with tinykern.backend("torch"):
            raise KeyError("boom")
    assert backends.current() == "auto"


def test_context_manager_forces_the_op(monkeypatch, q4_args):
    calls = []
    original = backends._IMPLS[("q4k_matmul", "torch")]

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setitem(backends._IMPLS, ("q4k_matmul", "torch"), spy)
    with tinykern.backend("torch"):
        ops.q4k_matmul(*q4_args)
    assert len(calls) == 1


def test_auto_on_cpu_picks_cpu_when_built_else_torch():
    expected = "cpu" if _ext.available() else "torch"
    for op in ("q4k_matmul", "q4k_conv2d", "q8_0_matmul"):
        name, impl = backends.resolve(op, torch.device("cpu"))
        assert name == expected, f"{op}: auto picked {name}"
        assert callable(impl)
    # The Triton interpreter is a correctness tool: auto never picks it, even when enabled.
    assert "triton" not in backends.AUTO_ORDER["cpu"]


def test_auto_result_matches_the_reference(gen, q4_args):
    x, w = q4_args
    auto = ops.q4k_matmul(x, w)
    with tinykern.backend("torch"):
        ref = ops.q4k_matmul(x, w)
    # auto is the cpu backend when built, whose default rounds x to int8 as ggml does.
    bound = 1e-5
    if backends.resolve("q4k_matmul", torch.device("cpu"))[0] == "cpu":
        bound += 1.05 * ggml_error("q4k", x, q4k.dequantize(w, torch.float64))
    assert ((auto - ref).norm() / ref.norm()).item() < bound


@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_every_provider_module_exists(backend):
    """`auto` and forcing import these on first use: a missing one breaks every op as soon as
    the backend it provides reports itself available (e.g. once tinykern._C is built)."""
    for module in backends._PROVIDERS[backend]:
        assert importlib.util.find_spec(module) is not None, f"backend {backend!r}: no module {module}"


def test_unavailable_reason_is_none_or_a_sentence():
    for name in backends.BACKENDS:
        for device in ("cpu", "cuda"):
            reason = backends.unavailable_reason(name, device)
            assert reason is None or (isinstance(reason, str) and len(reason) > 10)
    assert backends.unavailable_reason("torch", "cpu", "q4k_matmul") is None
    assert "unknown backend" in backends.unavailable_reason("npu", "cpu")
