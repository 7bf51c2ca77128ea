"""Dropout masks from a Philox seed, regenerated wherever they are needed and never stored.

Element ``(m, k)`` of the ``[M, K]`` LoRA input is kept when the first output of Philox-4x32-7 at
counter ``(k, m, 0, 0)`` under ``seed``, shifted to 31 bits, is at least ``threshold = p * 2^31``.
Every kernel that touches the LoRA input (down-projection, input gradient, ``dA``) evaluates the
same ``keep_mask`` on its tile, so forward and backward agree without a stored mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dropout_args

# Philox-4x32 with 7 rounds passes BigCrush (Salmon et al., SC'11); 3 fewer rounds than Triton's
# default is a measurable saving where the mask is recomputed in three kernels.
PHILOX_ROUNDS = tl.constexpr(7)


@triton.jit
def keep_mask(seed, offs_m, offs_k, threshold):
    """Boolean ``[BLOCK_M, BLOCK_K]`` keep-mask of the tile at rows ``offs_m``, columns ``offs_k``."""
    cols = (offs_m[:, None] * 0 + offs_k[None, :]).to(tl.uint32)
    rows = (offs_m[:, None] + offs_k[None, :] * 0).to(tl.uint32)
    zero = cols * 0
    draw, _, _, _ = tl.philox(seed, cols, rows, zero, zero, PHILOX_ROUNDS)
    return (draw >> 1).to(tl.int32) >= threshold


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(out_ptr, M, K, stride_om, seed, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask(seed, offs_m, offs_k, threshold)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_k[None, :], keep.to(tl.int8), mask=mask)


def dropout_keep_mask(
    shape: torch.Size | tuple[int, ...], p: float, seed: int, device: torch.device | str
) -> torch.Tensor:
    """The keep-mask the fused kernels apply to a LoRA input of ``shape`` (leading dims
    flattened): same signature as :func:`reslora_kernels.reference.dropout_keep_mask`. For tests
    and debugging; the kernels themselves never materialise it."""
    shape = tuple(shape)
    K = shape[-1] if shape else 1
    M = 1
    for d in shape[:-1]:
        M *= d
    out = torch.empty((M, K), dtype=torch.int8, device=device)
    if out.numel():
        threshold, _ = dropout_args(p)
        grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
        _dropout_mask_kernel[grid](out, M, K, out.stride(0), seed, threshold, BLOCK_M=32, BLOCK_K=32)
    return out.bool().reshape(shape)
