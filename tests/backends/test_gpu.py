"""The fused path on a CUDA device at realistic sizes, in bfloat16, float16 and float32.

Marked ``gpu`` and skipped without CUDA; tests/backends/test_fused.py checks the same behaviour on the
Triton interpreter. A run on a GPU writes a log (GPU, versions, commit, outcomes) to
``$RESLORA_GPU_LOG_DIR`` (default tests/gpu_logs/), see conftest.py.
"""

import pytest
import torch
from helpers import ToyStack, assert_lowp_close, oracle_params
from oracle import toy_stack

from reslora_kernels import set_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

M, FEATURES, RANK = 4096, 4096, 16


@pytest.fixture
def triton_backend(monkeypatch):
    set_backend("fused")


def run_oracle(params, x0, scaling, mode, pre_num, probes, dtype):
    cast = [
        tuple(None if t is None else t.detach().to(dtype).requires_grad_(i >= 2) for i, t in enumerate(ps))
        for ps in params
    ]
    x = x0.detach().to(dtype).requires_grad_()
    ys = toy_stack(x, cast, scaling, mode, pre_num)
    sum((y * w.to(dtype)).sum() for y, w in zip(ys, probes)).backward()
    return ys, cast, x.grad


@pytest.mark.parametrize("features", [FEATURES, 1000], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("mode", ["none", "is", "bs", "ms"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_realistic_size_against_float64(triton_backend, dtype, mode, features):
    """4096 tokens; a hidden size of 4096 (on Hopper: the TMA kernels) and of 1000 (not a multiple
    of 16: the unaligned config tables, no TMA)."""
    model = ToyStack(2, features, mode, pre_num=1, rank=RANK, alpha=32, dtype=dtype, device="cuda")
    with torch.no_grad():
        for block in model.blocks:  # keep activations O(1) through the stack
            block.weight.normal_(0.0, features**-0.5)
            block.lora_B.normal_(0.0, 0.02)
    params = oracle_params(model)
    x0 = torch.randn(M, features, device="cuda", dtype=dtype, requires_grad=True)
    ys = model(x0)
    probes = [torch.randn_like(y) for y in ys]
    sum((y * w).sum() for y, w in zip(ys, probes)).backward()
    scaling = model.blocks[0].scaling
    ys64, p64, gx64 = run_oracle(params, x0, scaling, mode, 1, probes, torch.float64)
    ysl, pl, gxl = run_oracle(params, x0, scaling, mode, 1, probes, dtype)
    for n, block in enumerate(model.blocks):
        assert_lowp_close(ys[n], ys64[n], ysl[n], f"y_{n}")
        assert_lowp_close(block.lora_A.grad, p64[n][2].grad, pl[n][2].grad, f"dA_{n}")
        assert_lowp_close(block.lora_B.grad, p64[n][3].grad, pl[n][3].grad, f"dB_{n}")
    assert_lowp_close(x0.grad, gx64, gxl, "dx")


@pytest.mark.parametrize("mode", ["is", "ms"])
def test_training_step_never_syncs(triton_backend, mode):
    """Forward (with dropout and the norm statistics) and backward launch without the host ever
    waiting for the GPU."""
    model = ToyStack(3, 1024, mode, rank=RANK, dropout=0.1, dtype=torch.bfloat16, device="cuda").train()
    x = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    model(x)[-1].sum().backward()  # compile and autotune outside the guarded region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(x)[-1].sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(model.blocks[0].statistics.norm_count) == 2


def test_launch_plan_matches_the_device():
    """On the real device the launchers take the path the compile matrix proved for its
    architecture: the persistent TMA GEMMs on sm_90, the pointer kernels elsewhere."""
    from reslora_kernels import ops
    from reslora_kernels.ops import _target
    from reslora_kernels.ops import linear_lora_fwd_kernel as fwd
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(384, 512, device="cuda", dtype=torch.bfloat16)
    u, B = (
        torch.randn(256, 16, device="cuda", dtype=torch.bfloat16),
        torch.zeros(384, 16, device="cuda", dtype=torch.bfloat16),
    )
    with _target.capture() as plan:
        ops.linear_lora_fwd(x, W, None, u, B, 1.0)
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert plan[0].kernel is (fwd._linear_lora_fwd_tma_kernel if hopper else fwd._linear_lora_fwd_kernel)
    y = ops.linear_lora_fwd(x, W, None, u, B, 1.0)
    ref = x.double() @ W.double().T
    assert float((y.double() - ref).norm() / ref.norm()) < 2e-2
