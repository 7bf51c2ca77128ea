"""Helpers shared by the launchers: dot precision, rank tiles, alignment, input checks."""

from __future__ import annotations

import torch
import triton

from ..dtypes import KERNEL_DTYPES as SUPPORTED_DTYPES


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: float32 follows torch's TF32 switch (off by default, as for
    ``torch.matmul``); half types always run on tensor cores with float32 accumulation."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def rank_block(rank: int) -> int:
    """Rank tile: a power of two >= 16 (tl.dot's minimum), at most 64; larger ranks loop."""
    return min(max(16, triton.next_power_of_2(rank)), 64)


def rank_bucket(rank: int) -> int:
    """The autotuning key of a rank: its power-of-two ceiling, so that a block-shortcut chain whose
    concatenated rank grows block by block (r, 2r, 3r, ...) tunes once per power of two."""
    return triton.next_power_of_2(max(rank, 1))


def aligned(*tensors: torch.Tensor | None) -> bool:
    """Whether every tensor starts 16-byte aligned and has leading strides and a contiguous
    extent that are multiples of 16 elements: what Triton specialises on to vectorise loads and
    what tensor descriptors (TMA) need. Other shapes take the unaligned config tables."""
    for t in tensors:
        if t is None:
            continue
        if t.data_ptr() % 16:
            return False
        if any(s % 16 for s in t.stride()[:-1]) or t.stride()[-1] != 1 or t.shape[-1] % 16:
            return False
    return True


def check_2d(name: str, t: torch.Tensor, rows: int, cols: int) -> None:
    if t.dim() != 2 or t.shape != (rows, cols):
        raise ValueError(f"{name} must be [{rows}, {cols}], got {tuple(t.shape)}")


def check_same(x: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor on x's device; every float tensor but float32 workspaces in x's dtype."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton kernels support float16, bfloat16 and float32, got {x.dtype}")
    for name, t in others.items():
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"device mismatch: {name} is on {t.device}, expected {x.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"dtype mismatch: {name} is {t.dtype}, expected {x.dtype}")


def check_rank_space(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    """The float32 rank-space gradient ``g`` beside the ``like`` operand."""
    if t.dtype != torch.float32 or t.device != like.device:
        raise TypeError(f"{name} must be float32 on {like.device}, got {t.dtype} on {t.device}")


def deterministic() -> bool:
    """Reductions across programs use float32 atomics (L2-resident, no extra DRAM traffic) unless
    ``torch.use_deterministic_algorithms(True)`` asks for run-to-run identical results; then they
    write per-program partials and sum them in a fixed order."""
    return torch.are_deterministic_algorithms_enabled()
