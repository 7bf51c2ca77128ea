"""The merge fold W += c * B A: every implementation against W + c * B.float() @ A.float()."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import HAS_CUDA, KERNEL_DEVICE, KERNEL_DTYPES, rel_err

from reslora_kernels import fold_lora_, fold_report, functional, reference

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(70, 72, 1), (17, 40, 16), (40, 24, 80), (24, 70, 130)]  # (N, K, R): odd sizes, multi-tile ranks


def expected(W, B, A, coef):
    return (W.float() + coef * (B.float() @ A.float())).double()


def check(out, W, B, A, coef):
    ref = expected(W, B, A, coef)
    # float32 accumulation, one rounding to W's dtype: within a rounding of W's dtype.
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[W.dtype]
    assert out.dtype == W.dtype
    assert rel_err(out, ref) < tol


def operands(N, K, R, dtype, device):
    W = torch.randn(N, K, dtype=dtype, device=device)
    B = torch.randn(N, R, dtype=dtype, device=device) * 0.3
    A = torch.randn(R, K, dtype=dtype, device=device) * 0.3
    return W, B, A


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_reference_fold(dtype, shape):
    W, B, A = operands(*shape, dtype, "cpu")
    out = reference.fold_lora_(W.clone(), B, A, 0.75)
    if dtype == torch.float64:
        assert rel_err(out, W + 0.75 * B @ A) < 1e-14
    else:
        check(out, W, B, A, 0.75)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_fold(dtype, shape, poison_empty):
    pytest.importorskip("triton")
    from reslora_kernels import ops

    W, B, A = operands(*shape, dtype, KERNEL_DEVICE)
    target = W.clone()
    out = ops.fold_lora_(target, B, A, -1.25)
    assert out is target  # in place
    check(out, W, B, A, -1.25)
    strided = torch.empty(W.shape[0], 2 * W.shape[1], dtype=dtype, device=KERNEL_DEVICE)
    strided[:, ::2] = W
    ops.fold_lora_(strided[:, ::2], B, A, -1.25)
    check(strided[:, ::2], W, B, A, -1.25)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_fold_llama_size(dtype):
    from reslora_kernels import ops

    W, B, A = operands(4096, 11008, 16, dtype, "cuda")
    check(ops.fold_lora_(W.clone(), B, A, 0.5), W, B, A, 0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("shape", SHAPES + [(4096, 11008, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_extension_fold(dtype, shape):
    extension, reason = functional._cuda_extension()
    if extension is None:
        pytest.skip(f"CUDA extension {reason}")
    W, B, A = operands(*shape, dtype, "cuda")
    out = extension.fold_lora_(W.clone(), B, A, 0.5)
    check(out, W, B, A, 0.5)


def test_dispatch_follows_the_backend_switch(monkeypatch):
    W, B, A = operands(8, 12, 4, torch.float32, "cpu")
    assert functional.fold_backend(W) == "torch"
    check(fold_lora_(W.clone(), B, A, 2.0), W, B, A, 2.0)
    monkeypatch.setenv("RESLORA_BACKEND", "triton")
    if KERNEL_DEVICE == "cpu":
        assert functional.fold_backend(W) == "triton"
        check(fold_lora_(W.clone(), B, A, 2.0), W, B, A, 2.0)
    assert "fold on CUDA tensors:" in fold_report()


def test_fold_errors():
    W, B, A = operands(8, 12, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="do not form weight"):
        fold_lora_(W, B, A[:, :5], 1.0)
    with pytest.raises(ValueError, match="device mismatch"):
        fold_lora_(W, B.to("meta"), A, 1.0)
    with pytest.raises(ValueError, match="2-D"):
        fold_lora_(W, B[0], A, 1.0)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_source_compiles(tmp_path):
    """No GPU needed: the kernel translation unit builds with nvcc for Ampere and Hopper."""
    result = subprocess.run(
        [
            "nvcc",
            "-std=c++17",
            "-O3",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
            "-c",
            str(ROOT / "csrc" / "fold_kernel.cu"),
            "-o",
            str(tmp_path / "fold_kernel.o"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
