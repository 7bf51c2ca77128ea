"""The merge fold ``W += c B A``, in place, on the fastest implementation for ``W``'s device: the
CUDA C++ kernel (``csrc/``, registered with PyTorch's dispatcher as
``torch.ops.reslora_kernels.fold_lora_`` and loaded on first use), the Triton kernel
(``ops/fold_kernel.py``), or torch's addmm (:func:`reslora_kernels.reference.fold_lora_`). The
merging modules fold through here.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from . import backend, reference

__all__ = ["fold_backend", "fold_report", "fold_lora_"]

#: The optional CUDA library ``setup.py`` builds (``RESLORA_BUILD_CUDA``): ``reslora_kernels/_C*.so``.
LIBRARY_MODULE = f"{__package__}._C"


def _load_cuda_library(path: str | None) -> str | None:
    """Load the CUDA library at ``path`` into the dispatcher: ``None`` when
    ``reslora_kernels::fold_lora_`` then has a CUDA kernel, else why not."""
    if path is None:
        return "not built (see setup.py: RESLORA_BUILD_CUDA)"
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as err:  # built, but e.g. against another torch or CUDA
        return f"failed to load {path} ({err})"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("reslora_kernels::fold_lora_", "CUDA"):
        return f"{path} registers no CUDA kernel for reslora_kernels::fold_lora_"
    return None


@functools.lru_cache(maxsize=None)
def cuda_library_problem() -> str | None:
    """Why the CUDA fold cannot run (``None`` when it can): looked up and loaded once, on first use."""
    spec = importlib.util.find_spec(LIBRARY_MODULE)
    return _load_cuda_library(None if spec is None else spec.origin)


def fold_backend(weight: torch.Tensor) -> str:
    """``"cuda"`` (the CUDA C++ kernel), ``"triton"`` or ``"torch"``: which fold runs for
    ``weight``. ``auto`` prefers the CUDA kernel on CUDA tensors when it was built; the reference
    and the composed path fold with torch's addmm."""
    block_backend = backend.resolve_backend(weight)
    if block_backend in ("reference", "composed"):
        return "torch"
    if block_backend == "auto" and weight.is_cuda and cuda_library_problem() is None:
        return "cuda"
    return "triton"


def fold_report() -> str:
    """One line naming the fold implementation CUDA tensors get under the current settings, and
    why the CUDA kernel does not run where it does not."""
    problem = cuda_library_problem()
    if problem is None:
        return "fold on CUDA tensors: CUDA C++ kernel (torch.ops.reslora_kernels.fold_lora_)"
    if backend.fused_import_error() is None:
        return f"fold on CUDA tensors: Triton (CUDA C++ kernel {problem})"
    return f"fold on CUDA tensors: PyTorch reference (no Triton, CUDA C++ kernel {problem})"


@torch.no_grad()
def fold_lora_(weight: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor, coef: float) -> torch.Tensor:
    """In place ``weight += coef * lora_B @ lora_A`` with float32 accumulation, on the fastest
    implementation available for ``weight``'s device (see :func:`fold_backend`)."""
    if weight.dim() != 2 or lora_B.dim() != 2 or lora_A.dim() != 2:
        raise ValueError("fold_lora_ needs 2-D weight [N, K], lora_B [N, R] and lora_A [R, K]")
    N, K = weight.shape
    R = lora_A.shape[0]
    if lora_B.shape != (N, R) or lora_A.shape != (R, K):
        raise ValueError(
            f"weight {tuple(weight.shape)}, lora_B {tuple(lora_B.shape)} and lora_A {tuple(lora_A.shape)} "
            "do not form weight + lora_B @ lora_A"
        )
    for name, t in (("lora_B", lora_B), ("lora_A", lora_A)):
        if t.device != weight.device:
            raise ValueError(f"device mismatch: weight is on {weight.device} but {name} is on {t.device}")
    where = fold_backend(weight)
    if where == "torch":
        return reference.fold_lora_(weight, lora_B, lora_A, coef)
    # The kernels take one dtype; the adapter factors are small, so casting them is cheap.
    lora_B, lora_A = lora_B.to(weight.dtype), lora_A.to(weight.dtype)
    if where == "cuda":
        return torch.ops.reslora_kernels.fold_lora_(weight, lora_B, lora_A, float(coef))
    from .ops import fold_lora_ as triton_fold

    return triton_fold(weight, lora_B, lora_A, coef)
