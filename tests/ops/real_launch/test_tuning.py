"""How a launch picks its config on the fake GPU (``RESLORA_TUNE``), and ``auto``'s timing of the fused
kernels against composed when the device is (faked) CUDA."""

from __future__ import annotations

import dataclasses
import inspect
import itertools

import pytest
import torch
from models import Stack

from reslora_kernels import FusedBackendFailure, ResLoRAConfig, apply_reslora, backend, backend_report, set_backend
from reslora_kernels.ops import _target, linear_lora_fwd, lora_down
from reslora_kernels.ops._target import H100
from reslora_kernels.ops.linear_lora_fwd_kernel import _linear_lora_fwd_tma_kernel as FWD_TMA
from reslora_kernels.ops.lora_down_kernel import _lora_down_kernel as DOWN
from tools.fake_gpu import cpu_tensors_as_cuda, fake_gpu
M, K, R = 64, 128, 16


def down_inputs():
    return torch.randn(M, K, dtype=torch.bfloat16), torch.randn(R, K, dtype=torch.bfloat16)


def compiled(gpu, kernel: str) -> list:
    return [c for c in gpu.compiles if c.kernel == kernel]


# -------------------------------------------------------------------------------------- pinned
def test_pinned_builds_one_config_and_times_nothing(monkeypatch):
    """RESLORA_TUNE=pinned: the first config of the table fits a bfloat16 GEMM on an H100 without
    spilling, so one build, no benchmark, and that config launches; the key's next launch builds
    nothing more."""
    monkeypatch.setenv("RESLORA_TUNE", "pinned")
    x, w = torch.randn(M, K, dtype=torch.bfloat16), torch.randn(K, K, dtype=torch.bfloat16)
    u, lora_B, bias = torch.randn(M, R, dtype=torch.bfloat16), torch.randn(K, R, dtype=torch.bfloat16), torch.randn(K)
    with fake_gpu(H100) as gpu:
        linear_lora_fwd(x, w, bias.bfloat16(), u, lora_B, 2.0)
        linear_lora_fwd(x, w, bias.bfloat16(), u, lora_B, 2.0)
    assert len(compiled(gpu, "_linear_lora_fwd_tma_kernel")) == 1
    assert gpu.benchmarks == []
    assert FWD_TMA.best_config is FWD_TMA.configs[0]
    assert [la.num_warps for la in gpu.launches] == [FWD_TMA.configs[0].num_warps] * 2


def test_pinned_takes_the_first_config_that_does_not_spill(monkeypatch):
    """The spills the driver reports for a loaded build decide (no tool runs): the first two builds
    'spill', so the third config is pinned after three builds; when every build spills, the least
    spilling one is pinned after building them all."""
    monkeypatch.setenv("RESLORA_TUNE", "pinned")
    loads = []

    def third_is_clean(loaded):
        loads.append(loaded.name)
        return 0 if len(loads) == 3 else 8

    with fake_gpu(H100, spills=third_is_clean) as gpu:
        lora_down(*down_inputs())
    assert len(compiled(gpu, "_lora_down_kernel")) == 3 and gpu.benchmarks == []
    assert DOWN.best_config is DOWN.configs[2]

    loads.clear()

    def fewer_each_time(loaded):
        loads.append(loaded.name)
        return 100 - len(loads)

    with fake_gpu(H100, spills=fewer_each_time) as gpu:
        lora_down(*down_inputs())
    assert len(compiled(gpu, "_lora_down_kernel")) == len(DOWN.configs)
    assert DOWN.best_config is DOWN.configs[-1]


def test_unknown_tune_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("RESLORA_TUNE", "fastest")
    with fake_gpu(H100), pytest.raises(ValueError, match="RESLORA_TUNE='fastest' is not one of autotune, pinned"):
        lora_down(*down_inputs())


# ------------------------------------------------------------------------------------- autotune
def test_autotune_builds_every_config_and_keeps_the_fastest(monkeypatch):
    """Triton's Autotuner.run with the pruner: every config of the table built once for the key,
    each offered config benchmarked (each benchmark a checked launch), the fastest launched."""
    monkeypatch.delenv("RESLORA_TUNE", raising=False)

    calls = itertools.count(1)

    def third_is_fastest(launches):
        return 1.0 if next(calls) == 3 else 2.0

    with fake_gpu(H100, timing=third_is_fastest, spills=lambda loaded: 0) as gpu:
        lora_down(*down_inputs())
    assert len(compiled(gpu, "_lora_down_kernel")) == len(DOWN.configs)
    assert len(gpu.benchmarks) == len(DOWN.configs)
    assert all(len(bench.launches) == 1 for bench in gpu.benchmarks)
    assert DOWN.best_config is DOWN.configs[2]
    (launch,) = gpu.launches
    assert launch.num_warps == DOWN.configs[2].num_warps


def test_autotune_offers_only_builds_that_do_not_spill(monkeypatch):
    monkeypatch.delenv("RESLORA_TUNE", raising=False)
    loads = []

    def fifth_is_clean(loaded):
        loads.append(loaded.name)
        return 0 if len(loads) == 5 else 8

    with fake_gpu(H100, spills=fifth_is_clean) as gpu:
        lora_down(*down_inputs())
    assert DOWN.best_config is DOWN.configs[4]
    assert len(gpu.benchmarks) <= 1  # Triton 3.9 skips timing a single config; 3.6 times it once


def test_the_pruner_runs_no_tool():
    """Spills come from the loaded build (``CompiledKernel.n_spills``), not from a cuobjdump per
    config: the launch path does not shell out."""
    source = inspect.getsource(_target)
    assert "cuobjdump" not in source and "subprocess" not in source


# ------------------------------------------------------------------------------ auto on "CUDA"
class FakeTimer:
    def __init__(self, **ms):
        self.ms, self.calls = ms, []

    def __call__(self, name, fn):
        self.calls.append(name)
        fn()  # one more launch of the candidate, checked like every other
        return self.ms[name]


def auto_model():
    model = Stack(2, 128, True, torch.bfloat16)
    apply_reslora(model, ResLoRAConfig(mode="none", rank=R, alpha=32.0, dropout=0.1, target_modules=["proj"]))
    return model


def test_auto_times_the_fused_kernels_on_the_gpu(monkeypatch):
    """auto on a (faked) CUDA device runs the fused candidate through the real launch path while
    timing it; when it is faster, fused runs, and no failure is recorded."""
    timer = FakeTimer(fused=1.0, composed=2.0)
    monkeypatch.setattr(backend, "TUNER", backend.AutoTuner(timer=timer))
    monkeypatch.delenv("RESLORA_TUNE", raising=False)
    with fake_gpu(H100) as gpu, cpu_tensors_as_cuda():
        model = auto_model()
        x = torch.randn(2, 32, 128, dtype=torch.bfloat16)
        out = model(x)
        out.float().sum().backward()
    choices = backend.backend_choices()
    assert choices and all(c["failures"] == {} and c["backend"] == "fused" for c in choices), choices
    assert out.grad_fn is not None and timer.calls.count("fused") == len(choices)
    launched = {la.kernel for la in gpu.launches}
    assert {"_lora_down_kernel", "_linear_lora_fwd_tma_kernel", "_linear_lora_dx_tma_kernel"} <= launched


def test_a_fused_failure_under_auto_warns_and_composed_runs(monkeypatch):
    """A GPU too small for every config: the fused candidate raises while timed, auto runs composed,
    warns FusedBackendFailure once per key with the shape and the exception, and the report lists
    it; the fused backend raises the same error instead."""
    tiny = dataclasses.replace(H100, name="H100 with 1 KiB of shared memory", max_shared=1024)
    monkeypatch.setattr(backend, "TUNER", backend.AutoTuner(timer=FakeTimer(fused=1.0, composed=2.0)))
    monkeypatch.setenv("RESLORA_TUNE", "pinned")
    with fake_gpu(tiny), cpu_tensors_as_cuda():
        model = auto_model()
        x = torch.randn(2, 32, 128, dtype=torch.bfloat16)
        with pytest.warns(
            FusedBackendFailure, match=r"M<=64 K=128 N=128 r=16 bfloat16 .*no config of _lora_down_kernel"
        ):
            y = model(x)
        assert y.grad_fn is not None
        assert "FusedBackendFailure: the fused kernels failed for 1 key(s)" in backend_report()
        set_backend("fused")
        with pytest.raises(RuntimeError, match="no config of _lora_down_kernel fits the 1024 B"):
            model(x)
