"""One layer, forward+backward and forward-only, every variant side by side (DESIGN.md section 7).

GPU: M = 8192 tokens, LLaMA-7B projections 4096->4096, 4096->11008, 11008->4096 at r = 16, and
4096->4096 at r = 64, bf16. CPU: small shapes in float32, the reference and PEFT only.
"""

import pytest
import torch
from bench_lib import IS_CUDA, layer_step, layer_variants, median_ms, peak_memory_bytes, peft, synchronize

if IS_CUDA:
    SHAPES = [(8192, 4096, 4096, 16), (8192, 4096, 11008, 16), (8192, 11008, 4096, 16), (8192, 4096, 4096, 64)]
    DTYPE = torch.bfloat16
else:
    SHAPES = [(512, 256, 256, 16), (512, 256, 688, 16)]
    DTYPE = torch.float32


def group_name(shape):
    M, K, N, r = shape
    return f"M={M} {K}->{N} r={r} {str(DTYPE).replace('torch.', '')}"


@pytest.mark.parametrize("phase", ["fwd+bwd", "fwd"])
@pytest.mark.parametrize("variant, mode", layer_variants(), ids=lambda v: v)
@pytest.mark.parametrize("shape", SHAPES, ids=group_name)
def test_layer(benchmark, results, shape, variant, mode, phase):
    if not IS_CUDA and variant == "fused":
        pytest.skip("GPU only: on CPU the fused kernels run in Triton's interpreter, which is no speed")
    if not IS_CUDA and variant == "compiled":
        pytest.skip("GPU only: torch.compile's compile time would dominate the CPU suite")
    if variant.startswith("peft") and peft is None:
        pytest.skip("peft is not installed")
    M, K, N, rank = shape
    step = layer_step(variant, mode, M, K, N, rank, DTYPE, backward=phase == "fwd+bwd").step
    step()  # compile / autotune outside the timed region
    synchronize()
    ms = median_ms(step)
    peak = peak_memory_bytes(step)
    group = group_name(shape)
    benchmark.group = f"layer {phase} {group}"
    benchmark.extra_info.update(device_median_ms=ms, peak_bytes=peak, variant=variant, mode=mode)
    benchmark.pedantic(lambda: (step(), synchronize()), rounds=5, warmup_rounds=1)
    results.add(
        "layer",
        group,
        variant,
        mode=mode,
        phase=phase,
        median_ms=ms,
        peak_mb=None if peak is None else peak / 2**20,
        M=M,
        K=K,
        N=N,
        rank=rank,
    )
