"""The merge fold W += c B A against torch's addmm_ and a plain device copy of W (bandwidth),
interleaved round by round."""

import pytest
import torch
from bench_lib import DEVICE, FULL, IS_CUDA, Interleaved, run_rounds

from reslora_kernels import fold, reference

if IS_CUDA:
    N, K, RANK, ROUNDS = 4096, 11008, 16, 15
elif FULL:
    N, K, RANK, ROUNDS = 1024, 2752, 16, 15
else:  # the reduced CPU sweep (RESLORA_BENCH_FULL unset): a quarter of the weight, fewer rounds
    N, K, RANK, ROUNDS = 512, 1376, 16, 7
DTYPE = torch.bfloat16 if IS_CUDA else torch.float32
GROUP = f"{N}x{K} r={RANK} {str(DTYPE).replace('torch.', '')}"


def fold_fn(variant, W, B, A):
    """The call of ``variant``, or the reason it cannot run here."""
    if variant == "triton":
        if not IS_CUDA:
            return "GPU only: CUDA tensors"
        from reslora_kernels import ops

        return lambda: ops.fold_lora_(W, B, A, 1e-6)
    if variant == "cuda extension":
        problem = fold.cuda_library_problem()
        if not IS_CUDA or problem is not None:
            return f"CUDA C++ kernel {problem}" if IS_CUDA else "GPU only: CUDA tensors"
        return lambda: torch.ops.reslora_kernels.fold_lora_(W, B, A, 1e-6)
    if variant == "reference (fp32 accumulate)":
        return lambda: reference.fold_lora_(W, B, A, 1e-6)
    if variant == "torch addmm_":
        return lambda: W.addmm_(B, A, alpha=1e-6)
    if variant == "device copy":
        source = torch.randn_like(W)  # random, never uninitialised memory that may be zeros
        return lambda: W.copy_(source)
    raise ValueError(variant)


class Fold:
    def __init__(self, fn):
        self.step = fn

    def prepare(self):
        pass


def test_fold(benchmark, results):
    cases, skipped = {}, {}
    for variant in ["device copy", "torch addmm_", "reference (fp32 accumulate)", "triton", "cuda extension"]:
        W = torch.randn(N, K, device=DEVICE, dtype=DTYPE)
        B = torch.randn(N, RANK, device=DEVICE, dtype=DTYPE)
        A = torch.randn(RANK, K, device=DEVICE, dtype=DTYPE)
        fn = fold_fn(variant, W, B, A)
        if isinstance(fn, str):
            skipped[variant] = fn
        else:
            cases[variant] = Fold(fn)
    runner = Interleaved(cases)
    runner.warm_up(2)
    benchmark.group = f"merge fold {GROUP} (one round = every implementation once)"
    run_rounds(benchmark, runner, ROUNDS)
    nbytes = 2 * N * K * torch.finfo(DTYPE).bits // 8  # W read once, written once
    for variant, stats in runner.stats().items():
        results.add("merge", GROUP, variant, gbps=nbytes / (stats["median_ms"] * 1e-3) / 1e9, **stats)
    benchmark.extra_info["skipped"] = skipped
    if not cases:
        pytest.skip("nothing to time")
