"""Helpers shared by the launchers: interpreter detection, dot precision, input checks."""

from __future__ import annotations

import functools
import os

import torch
import triton

from ..dtypes import KERNEL_DTYPES as SUPPORTED_DTYPES

#: Whether the kernels were built for Triton's CPU interpreter. Triton reads TRITON_INTERPRET
#: when a kernel is decorated, so this is fixed at import time.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: float32 follows torch's TF32 switch (off by default, as for
    ``torch.matmul``); half types always run on tensor cores with float32 accumulation."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def rank_block(rank: int) -> int:
    """Rank tile: a power of two >= 16 (tl.dot's minimum), at most 64; larger ranks loop."""
    return min(max(16, triton.next_power_of_2(rank)), 64)


def pick(configs: list, interpreted: list) -> list:
    """The interpreter gets one fixed config: autotuning there would only cost minutes."""
    return interpreted if INTERPRETED else configs


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


def deterministic() -> bool:
    """Reductions across programs use float32 atomics (L2-resident, no extra DRAM traffic) unless
    ``torch.use_deterministic_algorithms(True)`` asks for run-to-run identical results; then they
    write per-program partials and sum them in a fixed order."""
    return torch.are_deterministic_algorithms_enabled()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query is not free)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
