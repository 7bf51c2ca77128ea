"""Helpers shared by the launchers: dot precision, rank tiles, alignment, input checks, and the
launch-plan cache.

A launcher's host work is per-shape, not per-call: the checks, the kernel and grid, the
constexpr and key arguments, the descriptors' shapes and strides. Each launcher keeps that work in
a :class:`PlanCache` keyed on everything it depends on (:func:`tensor_key` of every operand:
shape, strides, dtype, device and 16-byte alignment; the planned target; the TF32 and
determinism switches; the flags), so a call whose key was seen only rebuilds what is per call:
the output tensors, the pointers and fresh tensor descriptors on them.
"""

from __future__ import annotations

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from ..dtypes import KERNEL_DTYPES as SUPPORTED_DTYPES

# torch.backends.cuda.matmul.allow_tf32 is a module __getattr__ (about 1 us per read); this is
# the function it calls.
_get_allow_tf32 = getattr(torch._C, "_get_cublas_allow_tf32", None)


def allow_tf32() -> bool:
    """torch's switch for TF32 in float32 matmuls (``torch.backends.cuda.matmul.allow_tf32``)."""
    if _get_allow_tf32 is None:
        return torch.backends.cuda.matmul.allow_tf32
    return _get_allow_tf32()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host integers (``triton.cdiv`` is a constexpr function: microseconds
    per call on the host)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (>= 1), for host integers."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: float32 follows torch's TF32 switch (off by default, as for
    ``torch.matmul``); half types always run on tensor cores with float32 accumulation."""
    if dtype == torch.float32 and not allow_tf32():
        return "ieee"
    return "tf32"


def rank_block(rank: int) -> int:
    """Rank tile: a power of two >= 16 (tl.dot's minimum), at most 64; larger ranks loop."""
    return min(max(16, next_power_of_2(rank)), 64)


def rank_bucket(rank: int) -> int:
    """The autotuning key of a rank: its power-of-two ceiling, so that a block-shortcut chain whose
    concatenated rank grows block by block (r, 2r, 3r, ...) tunes once per power of two."""
    return next_power_of_2(rank)


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


# ---------------------------------------------------------------------------- launch plans
#: Plans kept per launcher. Keys differ by the row count M (sequence lengths vary), so the cache
#: is bounded; the oldest plan goes first.
PLAN_CACHE_SIZE = 512


class PlanCache(dict):
    """Launch plans by key, at most :data:`PLAN_CACHE_SIZE` of them (oldest evicted first)."""

    def put(self, key, plan):
        while len(self) >= PLAN_CACHE_SIZE:
            try:
                del self[next(iter(self))]
            except (KeyError, RuntimeError, StopIteration):  # another thread evicted or added one first
                break
        self[key] = plan
        return plan


def tensor_key(t: torch.Tensor) -> tuple:
    """What a launch plan depends on in an operand: shape, strides, dtype, device, and whether
    it starts 16-byte aligned (the same shape one element further along a buffer takes the
    unaligned kernels)."""
    return t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16


def descriptor_template(t: torch.Tensor) -> TensorDescriptor:
    """The static part of a tensor descriptor of ``t`` (shape, strides, padding), validated by
    ``TensorDescriptor.from_tensor``; without a base, so that a cached plan keeps no tensor alive.
    Block shapes are placeholders until the autotuner's config pre-hook sets them."""
    template = TensorDescriptor.from_tensor(t, [16, 16])
    template.base = None
    return template


def fresh_descriptor(template: TensorDescriptor, base: torch.Tensor) -> TensorDescriptor:
    """A new tensor descriptor on ``base`` with ``template``'s shape, strides and padding.

    The template was validated for a tensor of the same :func:`tensor_key` as ``base`` (shape,
    strides, dtype, alignment), so its checks hold for ``base`` too and are not repeated. Every
    call gets its own descriptor: the autotuner's pre-hook sets its block shape, and a
    descriptor names one base pointer."""
    desc = object.__new__(TensorDescriptor)
    desc.__dict__.update(template.__dict__)
    desc.base = base
    desc.block_shape = list(template.block_shape)
    return desc
