"""The backend selection (the environment's default read once, set_backend, use_backend and their
thread semantics), auto's per-shape choice (timed with injected fake timers, on CPU through Triton's
interpreter standing in for CUDA), its fallbacks, cache and report."""

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from helpers import ToyStack

from reslora_kernels import (
    FusedBackendFailure,
    FusedResLoRALinear,
    backend,
    backend_report,
    fold,
    functional,
    resolve_backend,
    set_backend,
    use_backend,
)

ROOT = Path(__file__).resolve().parents[2]
GRAD_FNS = {
    "reference": "AddBackward0",
    "composed": "ComposedResLoRAFunctionBackward",
    "fused": "FusedResLoRAFunctionBackward",
}


def grad_fn_of(layer, x):
    return layer(x).grad_fn.name()


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, "composed"),
        (" AUTO ", "composed"),
        ("reference", "reference"),
        ("Composed", "composed"),
        ("fused", "fused"),
    ],
)
def test_values_on_cpu(value, expected):
    """auto runs composed on CPU. (fused on CPU tensors runs in Triton's interpreter, which the
    test suite enables.)"""
    if value is not None:
        set_backend(value)
    x = torch.randn(2, 24)
    assert resolve_backend(x) == expected
    layer = ToyStack(1, 24, "none", dtype=torch.float32).blocks[0]
    assert grad_fn_of(layer, x.requires_grad_()) == GRAD_FNS[expected]


@pytest.mark.parametrize("old, new", [("torch", "reference"), ("triton", "fused")])
def test_old_names_are_errors_naming_the_new_ones(old, new):
    message = f"set_backend='{old}' is not one of auto, reference, composed, fused ('{old}' is called '{new}' now)"
    with pytest.raises(ValueError, match=re.escape(message)):
        set_backend(old)
    with pytest.raises(ValueError, match=re.escape(f"'{old}' is called '{new}' now")), use_backend(old):
        pass
    assert backend.requested_backend() == "auto"


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="set_backend='cuda' is not one of auto, reference, composed, fused$"):
        set_backend("cuda")
    with pytest.raises(TypeError, match="use_backend needs a backend name"), use_backend(None):
        pass
    assert backend.requested_backend() == "auto"  # nothing changed


def _in_a_fresh_process(code: str, env_value: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RESLORA_BACKEND"}
    env["RESLORA_BACKEND"] = env_value
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_environment_is_read_once_at_import():
    """RESLORA_BACKEND is the default from import on; changing the environment afterwards changes
    nothing; set_backend(None) comes back to it. A value naming no backend fails every block call
    (and the report) with the variable's name until set_backend replaces it."""
    code = """
import os, torch
from reslora_kernels import FusedResLoRALinear, backend, backend_report, set_backend
print(backend.requested_backend())
os.environ["RESLORA_BACKEND"] = "composed"
print(backend.requested_backend())
set_backend("composed"); set_backend(None)
print(backend.requested_backend())
print(backend_report().splitlines()[0])
"""
    assert _in_a_fresh_process(code, "Reference").split("\n")[:4] == [
        "reference",
        "reference",
        "reference",
        "backend: reference (from RESLORA_BACKEND='Reference' when reslora_kernels was imported)",
    ]
    code = """
import torch
from reslora_kernels import FusedResLoRALinear, backend_report, set_backend
layer = FusedResLoRALinear(4, 4)
for call in (lambda: layer(torch.randn(2, 4)), backend_report):
    try:
        call()
    except ValueError as err:
        print(err)
set_backend("composed")
print(layer(torch.randn(2, 4)).grad_fn.name())
"""
    lines = _in_a_fresh_process(code, "triton").splitlines()
    message = "RESLORA_BACKEND='triton' is not one of auto, reference, composed, fused ('triton' is called 'fused' now)"
    assert lines == [message, message, "ComposedResLoRAFunctionBackward"]


def test_set_backend_is_process_wide():
    set_backend("reference")
    seen = []
    thread = threading.Thread(target=lambda: seen.append(backend.requested_backend()))
    thread.start()
    thread.join()
    assert seen == ["reference"] and backend.requested_backend() == "reference"
    assert backend_report().startswith("backend: reference (from set_backend('reference'))")


def test_use_backend_is_context_local_and_nests():
    layer = ToyStack(1, 24, "none", dtype=torch.float32).blocks[0]
    x = torch.randn(2, 24, requires_grad=True)
    other_thread = []
    with use_backend("reference") as name:
        assert name == "reference" and grad_fn_of(layer, x) == GRAD_FNS["reference"]
        assert backend_report().startswith("backend: reference (from use_backend('reference') in this context)")
        # Another thread (started here or elsewhere) keeps the process-wide default.
        thread = threading.Thread(target=lambda: other_thread.append(backend.requested_backend()))
        thread.start()
        thread.join()
        with use_backend("fused"):
            assert grad_fn_of(layer, x) == GRAD_FNS["fused"]
            set_backend("reference")  # the default changes; this context's override still wins
            assert backend.requested_backend() == "fused"
        assert backend.requested_backend() == "reference"
        set_backend("auto")
    assert other_thread == ["auto"]
    assert grad_fn_of(layer, x) == GRAD_FNS["composed"]
    with pytest.raises(RuntimeError, match="boom"), use_backend("reference"):
        raise RuntimeError("boom")
    assert backend.requested_backend() == "auto" and not backend._OVERRIDDEN


def test_use_backend_in_concurrent_threads_and_tasks():
    """Two threads, each in its own use_backend block, at the same time: each sees its own."""
    barrier = threading.Barrier(2)
    seen = {}

    def run(name):
        with use_backend(name):
            barrier.wait()
            seen[name] = backend.requested_backend()
            barrier.wait()

    threads = [threading.Thread(target=run, args=(name,)) for name in ("reference", "composed")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"reference": "reference", "composed": "composed"}

    async def task(name, started, release):
        with use_backend(name):
            started.set()
            await release.wait()
            return backend.requested_backend()

    async def main():
        first, second, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
        a = asyncio.create_task(task("reference", first, release))
        b = asyncio.create_task(task("composed", second, release))
        await first.wait()
        await second.wait()
        release.set()
        return await a, await b

    assert asyncio.run(main()) == ("reference", "composed")
    assert backend.requested_backend() == "auto" and not backend._OVERRIDDEN


def test_explicit_fused_never_falls_back(monkeypatch):
    set_backend("fused")
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="the fused backend supports float16, bfloat16 and float32 inputs"):
        resolve_backend(x.double())
    monkeypatch.setattr(backend, "fused_import_error", lambda: ImportError("no module named triton"))
    with pytest.raises(RuntimeError, match=r"the fused backend cannot run: .*no module named triton"):
        FusedResLoRALinear(4, 4)(x)
    monkeypatch.undo()
    from reslora_kernels.ops import _target

    monkeypatch.setattr(_target, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before importing reslora_kernels"):
        resolve_backend(x)
    with pytest.raises(RuntimeError, match="cannot run on meta tensors"):
        monkeypatch.setattr(_target, "INTERPRETED", True)
        resolve_backend(x.to("meta"))


def test_fold_follows_the_switch():
    W = torch.randn(4, 4)
    assert fold.fold_backend(W) == "torch"
    for value in ("composed", "reference"):
        set_backend(value)
        assert fold.fold_backend(W) == "torch"
    set_backend("fused")
    assert fold.fold_backend(W) == "triton"
    with use_backend("composed"):
        assert fold.fold_backend(W) == "torch"


# ---------------------------------------------------------------------------- auto, timed
class FakeTimer:
    """Returns fixed times per candidate and counts the timings."""

    def __init__(self, **ms):
        self.ms = ms
        self.calls = []

    def __call__(self, name, fn):
        self.calls.append(name)
        return self.ms[name]


@pytest.fixture
def timed_cpu(monkeypatch):
    """CPU tensors take the CUDA path of auto (the fused candidate runs in the interpreter), with a
    fresh tuner; returns a function installing a fake timer."""
    monkeypatch.setattr(backend, "TIMED_DEVICE_TYPES", ("cuda", "cpu"))

    def install(**ms):
        timer = FakeTimer(**ms)
        monkeypatch.setattr(backend, "TUNER", backend.AutoTuner(timer=timer))
        return timer

    return install


def block(mode="none", dropout=0.0):
    return ToyStack(1, 24, mode, dropout=dropout, dtype=torch.float32).blocks[0]


@pytest.mark.parametrize("fused_ms, composed_ms, winner", [(1.0, 2.0, "fused"), (2.0, 1.0, "composed")])
def test_auto_picks_the_faster(timed_cpu, fused_ms, composed_ms, winner):
    timer = timed_cpu(fused=fused_ms, composed=composed_ms)
    layer = block()
    x = torch.randn(5, 24, requires_grad=True)
    assert resolve_backend(x) == "auto"
    assert grad_fn_of(layer, x) == GRAD_FNS[winner]
    assert timer.calls == ["fused", "composed"]
    # Cached: the same key is not timed again, nor is another M of the same bucket (5 -> 8).
    assert grad_fn_of(layer, torch.randn(7, 24, requires_grad=True)) == GRAD_FNS[winner]
    assert len(timer.calls) == 2
    [choice] = backend.backend_choices()
    assert choice["backend"] == winner and choice["m_bucket"] == 8 and (choice["K"], choice["N"]) == (24, 24)
    assert choice["timings_ms"] == {"fused": fused_ms, "composed": composed_ms}
    assert f"fused {fused_ms:.3f} ms, composed {composed_ms:.3f} ms -> {winner}" in backend_report()


def test_auto_keys(timed_cpu):
    """A new M bucket, dropout, no_grad, a shortcut: each is its own key, timed once."""
    timer = timed_cpu(fused=1.0, composed=2.0)
    layer = block()
    layer(torch.randn(5, 24, requires_grad=True))
    layer(torch.randn(9, 24, requires_grad=True))  # bucket 16
    with torch.no_grad():
        layer(torch.randn(5, 24))
    layer.dropout = 0.1
    layer(torch.randn(5, 24, requires_grad=True))
    x = torch.randn(5, 24)
    functional.reslora_linear(x, layer.weight, None, layer.lora_A, layer.lora_B, 1.0, x_prev=x)
    keys = [(c["m_bucket"], tuple(c["flags"])) for c in backend.backend_choices()]
    assert keys == [
        (8, ("bias", "fwd+bwd")),
        (16, ("bias", "fwd+bwd")),
        (8, ("bias", "fwd")),
        (8, ("bias", "dropout", "fwd+bwd")),
        (8, ("x_prev=self", "fwd+bwd")),
    ]
    assert len(timer.calls) == 2 * len(keys)


def test_ties_go_to_the_first_candidate(timed_cpu):
    timed_cpu(fused=1.0, composed=1.0)
    assert grad_fn_of(block(), torch.randn(5, 24, requires_grad=True)) == GRAD_FNS["fused"]


def test_timing_leaves_the_callers_state_alone(timed_cpu):
    """Timing runs on detached copies with a private generator: no .grad, no graph, no change to
    the user's random stream; the real call's result equals the chosen backend's."""
    timed_cpu(fused=2.0, composed=1.0)
    layer = block("is", dropout=0.2)
    x = torch.randn(6, 24, requires_grad=True)
    state = torch.get_rng_state()
    backend.select(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, x_prev=x, dropout_p=0.2)
    assert torch.equal(torch.get_rng_state(), state)
    assert x.grad is None and layer.lora_A.grad is None and layer.lora_B.grad is None


def test_auto_falls_back_where_fused_cannot_run(timed_cpu, monkeypatch):
    timer = timed_cpu(fused=1.0, composed=2.0)
    # float64: the kernels have no float64 path, no timing needed.
    layer64 = ToyStack(1, 24, "none", dtype=torch.float64).blocks[0]
    assert grad_fn_of(layer64, torch.randn(5, 24, dtype=torch.float64, requires_grad=True)) == GRAD_FNS["composed"]
    assert timer.calls == []
    # A launch that fails (e.g. no kernel config fits): composed, a FusedBackendFailure warning naming
    # the shape and the exception (pyproject makes it an error everywhere else), and the report says why.
    monkeypatch.setattr(backend, "_fused_impl", lambda: _failing_launch)
    with pytest.warns(FusedBackendFailure, match=r"M<=8 K=24 N=24 r=4 float32 .*RuntimeError: no kernel config fits"):
        assert grad_fn_of(block(), torch.randn(5, 24, requires_grad=True)) == GRAD_FNS["composed"]
    assert timer.calls == ["composed"]
    [choice] = backend.backend_choices()
    assert choice["timings_ms"] == {"fused": None, "composed": 2.0}
    assert "no kernel config fits" in choice["failures"]["fused"]
    assert "fused could not run: RuntimeError: no kernel config fits" in backend_report()
    assert "FusedBackendFailure: the fused kernels failed for 1 key(s)" in backend_report()
    # Once per key: the same key again is the cached choice, silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusedBackendFailure)
        assert grad_fn_of(block(), torch.randn(6, 24, requires_grad=True)) == GRAD_FNS["composed"]
    # Triton not importable: composed without timing.
    monkeypatch.setattr(backend, "fused_import_error", lambda: ImportError("no triton"))
    assert resolve_backend(torch.randn(5, 24)) == "composed"


def _failing_launch(*args, **kwargs):
    raise RuntimeError("no kernel config fits")


def test_empty_batch_is_not_timed(timed_cpu):
    timer = timed_cpu(fused=1.0, composed=2.0)
    y = block()(torch.randn(0, 24, requires_grad=True))
    assert y.shape == (0, 24) and y.grad_fn.name() == GRAD_FNS["composed"]
    assert timer.calls == [] and backend.backend_choices() == []


def test_disk_cache(timed_cpu, monkeypatch, tmp_path):
    path = tmp_path / "cache" / "autotune.json"
    monkeypatch.setenv("RESLORA_AUTOTUNE_CACHE", str(path))
    timed_cpu(fused=1.0, composed=2.0)
    block()(torch.randn(5, 24, requires_grad=True))
    saved = json.loads(path.read_text())
    [(context, entries)] = saved.items()
    assert "torch" in context and entries[0]["backend"] == "fused"
    # Another process: loaded from disk, not timed again.
    timer = timed_cpu(fused=5.0, composed=1.0)
    assert grad_fn_of(block(), torch.randn(6, 24, requires_grad=True)) == GRAD_FNS["fused"]
    assert timer.calls == []
    assert "(disk cache)" in backend_report() and str(path) in backend_report()


def test_a_fused_failure_from_the_disk_cache_warns(timed_cpu, monkeypatch, tmp_path):
    """A choice another process made because fused failed is no quieter when it is loaded."""
    path = tmp_path / "autotune.json"
    monkeypatch.setenv("RESLORA_AUTOTUNE_CACHE", str(path))
    timed_cpu(fused=1.0, composed=2.0)
    monkeypatch.setattr(backend, "_fused_impl", lambda: _failing_launch)
    with pytest.warns(FusedBackendFailure):
        block()(torch.randn(5, 24, requires_grad=True))
    monkeypatch.undo()
    monkeypatch.setenv("RESLORA_AUTOTUNE_CACHE", str(path))
    monkeypatch.setattr(backend, "TIMED_DEVICE_TYPES", ("cuda", "cpu"))
    timer = timed_cpu(fused=1.0, composed=2.0)
    with pytest.warns(FusedBackendFailure, match="no kernel config fits"):
        assert grad_fn_of(block(), torch.randn(6, 24, requires_grad=True)) == GRAD_FNS["composed"]
    assert timer.calls == []


def test_report_on_cpu():
    text = backend_report()
    assert text.startswith("backend: auto (from ")
    assert "CPU tensors: composed" in text
