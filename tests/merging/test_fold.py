"""The merge fold W += c * B A: every implementation against W + c * B.float() @ A.float()."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import HAS_CUDA, KERNEL_DEVICE, KERNEL_DTYPES, rel_err

from reslora_kernels import fold, fold_lora_, fold_report, reference, set_backend

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
    problem = fold.cuda_library_problem()
    if problem is not None:
        pytest.skip(f"CUDA C++ kernel {problem}")
    W, B, A = operands(*shape, dtype, "cuda")
    target = W.clone()
    out = torch.ops.reslora_kernels.fold_lora_(target, B, A, 0.5)
    assert out is target  # in place
    check(out, W, B, A, 0.5)


def test_dispatch_follows_the_backend_switch(monkeypatch):
    W, B, A = operands(8, 12, 4, torch.float32, "cpu")
    assert fold.fold_backend(W) == "torch"
    check(fold_lora_(W.clone(), B, A, 2.0), W, B, A, 2.0)
    set_backend("fused")
    if KERNEL_DEVICE == "cpu":
        assert fold.fold_backend(W) == "triton"
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


def test_cuda_library_loading_records_why_it_does_not_run(tmp_path, monkeypatch):
    """The CUDA kernel is loaded into the dispatcher on first use; where it cannot be, the reason is
    kept and fold_report says it (a CPU machine: not built, or a library that does not load)."""
    assert fold._load_cuda_library(None) == "not built (see setup.py: RESLORA_BUILD_CUDA)"
    broken = tmp_path / "_C.so"
    broken.write_bytes(b"not a shared object")
    assert fold._load_cuda_library(str(broken)).startswith(f"failed to load {broken} (")
    monkeypatch.setattr(fold, "LIBRARY_MODULE", "reslora_kernels._no_such_library")
    fold.cuda_library_problem.cache_clear()
    try:
        assert fold_report().endswith("(CUDA C++ kernel not built (see setup.py: RESLORA_BUILD_CUDA))")
        W, B, A = operands(8, 12, 4, torch.float32, "cpu")
        assert fold.fold_backend(W) == "torch"
    finally:
        fold.cuda_library_problem.cache_clear()


def test_cuda_binding_schema_is_what_python_calls():
    """The schema csrc/fold_binding.cpp registers parses, in the namespace fold.py calls, with the
    argument names and order of the Python call and weight marked as written in place."""
    source = (ROOT / "csrc" / "fold_binding.cpp").read_text()
    assert re.search(r"TORCH_LIBRARY_FRAGMENT\(reslora_kernels, m\)", source)
    assert re.search(r'TORCH_LIBRARY_IMPL\(reslora_kernels, CUDA, m\) \{ m\.impl\("fold_lora_", &fold_lora_\); \}', source)
    (text,) = re.findall(r'm\.def\("([^"]+)"\)', source)
    schema = torch._C.parse_schema(f"reslora_kernels::{text}")
    assert schema.name == "reslora_kernels::fold_lora_"
    assert [(a.name, str(a.type)) for a in schema.arguments] == [
        ("weight", "Tensor"), ("lora_B", "Tensor"), ("lora_A", "Tensor"), ("coef", "float"),
    ]  # fmt: skip
    assert schema.arguments[0].alias_info.is_write and not schema.arguments[1].alias_info
    assert schema.returns[0].alias_info.is_write
    assert "torch.ops.reslora_kernels.fold_lora_(weight, lora_B, lora_A, float(coef))" in (
        ROOT / "reslora_kernels" / "fold.py"
    ).read_text()


def _cuda_include() -> Path | None:
    """The CUDA toolkit's headers: $CUDA_HOME, torch's guess, beside nvcc, /usr/local/cuda."""
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), CUDA_HOME, nvcc and Path(nvcc).resolve().parents[1], "/usr/local/cuda"]
    for home in homes:
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home) / "include"
    return None


@pytest.mark.skipif(shutil.which("c++") is None or _cuda_include() is None, reason="needs a C++ compiler and CUDA headers")
def test_cuda_binding_compiles(tmp_path):
    """No GPU needed: the binding compiles against this torch's headers (a CPU build ships the
    c10/cuda headers but not the one CMake generates for a CUDA build, written here as a CUDA
    build of torch has it): the dispatcher registration type-checks the kernel's C++ signature."""
    from torch.utils.cpp_extension import include_paths

    generated = tmp_path / "c10" / "cuda" / "impl"
    generated.mkdir(parents=True)
    (generated / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{tmp_path}", f"-I{_cuda_include()}"]
    result = subprocess.run(
        ["c++", "-std=c++20", "-fsyntax-only", *includes, str(ROOT / "csrc" / "fold_binding.cpp")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
