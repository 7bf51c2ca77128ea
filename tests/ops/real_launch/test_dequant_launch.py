"""The dequantization kernels launched for real on the fake GPU (sm_90a and sm_80): Triton's autotuner
with the package's pruning, the builds, and the launcher binding the arguments. The launch turns fp
fusion off (the nested scale is a multiply and an add, rounded apart, as bitsandbytes computes it):
the pruner must build with the same option, or every config is built twice and the pruning judges
binaries that never launch."""

from __future__ import annotations

import pytest
import torch
import triton

from reslora_kernels.ops import dequant_4bit, dequant_int8
from reslora_kernels.ops._target import A100, H100
from reslora_kernels.ops.dequant_4bit_kernel import _dequant_4bit_kernel as DEQUANT_4BIT
from reslora_kernels.ops.dequant_int8_kernel import _dequant_int8_kernel as DEQUANT_INT8
from tools.fake_gpu import fake_gpu
TARGETS = pytest.mark.parametrize("target", [H100, A100], ids=["sm_90a", "sm_80"])


def launched(gpu, kernel: str):
    (launch,) = [la for la in gpu.launches if la.kernel == kernel]
    return launch


def inputs_4bit(N, K, blocksize=64):
    blocks = -(-N * K // blocksize)
    packed = torch.randint(0, 256, ((N * K + 1) // 2,), dtype=torch.uint8)
    absmax, code = torch.randint(0, 256, (blocks,), dtype=torch.uint8), torch.randn(16)
    nested = dict(
        nested_absmax=torch.rand(-(-blocks // 256)), nested_code=torch.randn(256), nested_offset=torch.tensor(0.5)
    )
    return packed, absmax, code, nested


@TARGETS
@pytest.mark.parametrize("K", [256, 255], ids=["even-K", "odd-K"])
def test_dequant_4bit_launch(target, K):
    N = 96
    packed, absmax, code, nested = inputs_4bit(N, K)
    out = torch.empty(N, K, dtype=torch.bfloat16)
    with fake_gpu(target) as gpu:
        dequant_4bit(packed, absmax, code, out=out, blocksize=64, **nested)
    builds = [c for c in gpu.compiles if c.kernel == "_dequant_4bit_kernel"]
    assert len(builds) == len(DEQUANT_4BIT.configs), "every config built once, by the pruner"
    assert all(c.constants["EVEN_K"] == (K % 2 == 0) and c.constants["NESTED"] for c in builds)
    launch = launched(gpu, "_dequant_4bit_kernel")
    best = DEQUANT_4BIT.best_config.kwargs
    assert launch.grid == (triton.cdiv(N, best["BLOCK_N"]), triton.cdiv(K, best["BLOCK_K"]), 1)
    pointers = [packed, absmax, code, nested["nested_absmax"], nested["nested_code"], nested["nested_offset"], out]
    assert launch.params[:7] == [t.data_ptr() for t in pointers]


@TARGETS
def test_dequant_int8_launch(target):
    N, K = 96, 200
    weight_int8, row_absmax = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N)
    out = torch.empty(N, K, dtype=torch.float16)
    with fake_gpu(target) as gpu:
        dequant_int8(weight_int8, row_absmax, out=out)
    assert len([c for c in gpu.compiles if c.kernel == "_dequant_int8_kernel"]) == len(DEQUANT_INT8.configs)
    launch = launched(gpu, "_dequant_int8_kernel")
    best = DEQUANT_INT8.best_config.kwargs
    assert launch.grid == (triton.cdiv(N, best["BLOCK_N"]), triton.cdiv(K, best["BLOCK_K"]), 1)
    assert launch.params[:3] == [weight_int8.data_ptr(), row_absmax.data_ptr(), out.data_ptr()]


def test_pinned_dequant_builds_once(monkeypatch):
    """RESLORA_TUNE=pinned: the first config fits without spilling, one build serves the launch."""
    monkeypatch.setenv("RESLORA_TUNE", "pinned")
    packed, absmax, code, nested = inputs_4bit(96, 256)
    with fake_gpu(H100) as gpu:
        dequant_4bit(packed, absmax, code, out=torch.empty(96, 256, dtype=torch.bfloat16), blocksize=64, **nested)
    assert len([c for c in gpu.compiles if c.kernel == "_dequant_4bit_kernel"]) == 1 and gpu.benchmarks == []
    assert DEQUANT_4BIT.best_config is DEQUANT_4BIT.configs[0]
