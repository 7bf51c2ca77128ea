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

from ._common import check_2d, check_same, pick, rank_block


def _configs():
    return pick(
        [
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in [(64, 128, 4, 2), (64, 256, 8, 2), (128, 128, 8, 2), (32, 256, 4, 2)]
        ],
        [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32})],
    )


# restore_value: tuning runs the in-place update several times; W must be as it was after each.
@triton.autotune(configs=_configs(), key=["N", "K", "R"], restore_value=["w_ptr"])
@triton.jit
def _fold_kernel(
    w_ptr,
    b_ptr,
    a_ptr,
    N,
    K,
    R,
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
    rows = offs_n.to(tl.int64)
    row_ok = offs_n < N
    col_ok = offs_k < K
    delta = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        b = tl.load(
            b_ptr + rows[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=row_ok[:, None] & (offs_r[None, :] < R),
            other=0.0,
        )
        a = tl.load(
            a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
            mask=(offs_r[:, None] < R) & col_ok[None, :],
            other=0.0,
        )
        delta = tl.dot(b, a, delta, input_precision=DOT_PRECISION)
    w_ptrs = w_ptr + rows[:, None] * stride_wn + offs_k[None, :] * stride_wk
    mask = row_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptrs, (w + coef * delta).to(w_ptr.dtype.element_ty), mask=mask)


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

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"]))

    _fold_kernel[grid](
        weight,
        lora_B,
        lora_A,
        N,
        K,
        R,
        weight.stride(0),
        weight.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        float(coef),
        # The merge is one-off and memory-bound: full float32 precision costs nothing here.
        DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        BLOCK_R=rank_block(R),
    )
    return weight
