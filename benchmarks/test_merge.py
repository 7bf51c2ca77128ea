"""The merge fold W += c B A against torch's addmm_ and a plain device copy of W (bandwidth)."""

import pytest
import torch
from bench_lib import DEVICE, IS_CUDA, median_ms, synchronize

from reslora_kernels import functional, reference

N, K, RANK = (4096, 11008, 16) if IS_CUDA else (1024, 2752, 16)
DTYPE = torch.bfloat16 if IS_CUDA else torch.float32
GROUP = f"{N}x{K} r={RANK} {str(DTYPE).replace('torch.', '')}"


def fold_fn(variant, W, B, A):
    if variant == "triton":
        from reslora_kernels import ops

        return lambda: ops.fold_lora_(W, B, A, 1e-6)
    if variant == "cuda extension":
        extension, reason = functional._cuda_extension()
        if extension is None:
            pytest.skip(f"CUDA extension {reason}")
        return lambda: extension.fold_lora_(W, B, A, 1e-6)
    if variant == "reference (fp32 accumulate)":
        return lambda: reference.fold_lora_(W, B, A, 1e-6)
    if variant == "torch addmm_":
        return lambda: W.addmm_(B, A, alpha=1e-6)
    if variant == "device copy":
        source = torch.empty_like(W)
        return lambda: W.copy_(source)
    raise ValueError(variant)


@pytest.mark.parametrize(
    "variant", ["device copy", "torch addmm_", "reference (fp32 accumulate)", "triton", "cuda extension"]
)
def test_fold(benchmark, results, variant):
    if not IS_CUDA and variant in ("triton", "cuda extension"):
        pytest.skip("GPU only: CUDA tensors")
    W = torch.randn(N, K, device=DEVICE, dtype=DTYPE)
    B = torch.randn(N, RANK, device=DEVICE, dtype=DTYPE)
    A = torch.randn(RANK, K, device=DEVICE, dtype=DTYPE)
    fn = fold_fn(variant, W, B, A)
    fn()
    synchronize()
    ms = median_ms(fn)
    gbps = 2 * W.numel() * W.element_size() / (ms * 1e-3) / 1e9  # W read once, written once
    benchmark.group = f"merge fold {GROUP}"
    benchmark.extra_info.update(device_median_ms=ms, gbps=gbps)
    benchmark.pedantic(lambda: (fn(), synchronize()), rounds=5, warmup_rounds=1)
    results.add("merge", GROUP, variant, median_ms=ms, gbps=gbps)
