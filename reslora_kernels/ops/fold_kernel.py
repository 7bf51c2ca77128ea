"""The merge fold: ``W += coef * B A`` in place, one launch for any rank.

Memory-bound: each element of ``W`` is read once and written once; the rank-space product runs
on tensor cores with float32 accumulation (exact products for half types) and is added to ``W``
in float32 before the single rounding to ``W``'s dtype. Block-shortcut merges pass the
concatenated ranks of every block they sum over, so a whole bs merge of one block is one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import aligned, cdiv, check_2d, check_same, rank_block, rank_bucket
from ._configs import FOLD, FOLD_UNALIGNED, tile_configs
from ._jit import tile_ptrs
from ._target import autotune, launch

KEY = ["N", "K", "R_BUCKET", "BLOCK_R", "DOT_PRECISION"]


@triton.jit
def _fold_kernel(
    w_ptr,
    b_ptr,
    a_ptr,
    N,
    K,
    R,
    R_BUCKET,
    stride_wn,
    stride_wk,
    stride_bn,
    stride_br,
    stride_ar,
    stride_ak,
    coef,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One [BLOCK_N, BLOCK_K] tile of W: the rank loop of B A, then one read-modify-write."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = offs_n < N
    col_ok = offs_k < K
    delta = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        b = tl.load(
            tile_ptrs(b_ptr, offs_n, offs_r, stride_bn, stride_br),
            mask=row_ok[:, None] & (offs_r[None, :] < R),
            other=0.0,
        )
        a = tl.load(
            tile_ptrs(a_ptr, offs_r, offs_k, stride_ar, stride_ak),
            mask=(offs_r[:, None] < R) & col_ok[None, :],
            other=0.0,
        )
        delta = tl.dot(b, a, delta, input_precision=DOT_PRECISION)
    w_ptrs = tile_ptrs(w_ptr, offs_n, offs_k, stride_wn, stride_wk)
    mask = row_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptrs, (w + coef * delta).to(w_ptr.dtype.element_ty), mask=mask)


_fold_jit = _fold_kernel
# restore_value: tuning runs the in-place update several times; W must be as it was after each.
_fold_kernel = autotune(tile_configs(FOLD, ("BLOCK_N", "BLOCK_K")), KEY, restore_value=["w_ptr"])(_fold_jit)
_fold_unaligned_kernel = autotune(tile_configs(FOLD_UNALIGNED, ("BLOCK_N", "BLOCK_K")), KEY, restore_value=["w_ptr"])(
    _fold_jit
)


def fold_lora_(weight: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor, coef: float) -> torch.Tensor:
    """In place ``weight += coef * lora_B @ lora_A`` (``[N, R] @ [R, K]``), accumulated in
    float32; same signature as :func:`reslora_kernels.reference.fold_lora_`."""
    N, K = weight.shape
    R = lora_A.shape[0]
    check_2d("lora_B", lora_B, N, R)
    check_2d("lora_A", lora_A, R, K)
    check_same(weight, lora_B=lora_B, lora_A=lora_A)
    if weight.numel() == 0 or R == 0:
        return weight

    launch(
        _fold_kernel if aligned(weight) else _fold_unaligned_kernel,
        lambda meta: (cdiv(N, meta["BLOCK_N"]), cdiv(K, meta["BLOCK_K"])),
        w_ptr=weight,
        b_ptr=lora_B,
        a_ptr=lora_A,
        N=N,
        K=K,
        R=R,
        R_BUCKET=rank_bucket(R),
        stride_wn=weight.stride(0),
        stride_wk=weight.stride(1),
        stride_bn=lora_B.stride(0),
        stride_br=lora_B.stride(1),
        stride_ar=lora_A.stride(0),
        stride_ak=lora_A.stride(1),
        coef=float(coef),
        # The merge is one-off and memory-bound: full float32 precision costs nothing here.
        DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        BLOCK_R=rank_block(R),
    )
    return weight
