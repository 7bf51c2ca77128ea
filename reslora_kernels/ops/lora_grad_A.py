"""The LoRA-A gradient: ``dA = g^T drop(s_in * (x [+ x_prev]))``, the LoRA input rebuilt from
``x`` (and ``x_prev``) and the dropout seed instead of being saved in forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRETED,
    check_2d,
    check_same,
    deterministic,
    dot_precision,
    pick,
    rank_block,
    sm_count,
)
from ._jit import lora_input_tile
from .dropout import dropout_args


def _configs():
    return pick(
        [
            triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk, w, s in [(64, 128, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (64, 256, 8, 3)]
        ],
        [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32})],
    )


@triton.autotune(configs=_configs(), key=["M_BUCKET", "K", "R", "SPLIT_M"], reset_to_zero=["da_ptr"])
@triton.jit
def _lora_grad_a_kernel(
    g_ptr,
    x_ptr,
    x_prev_ptr,
    da_ptr,
    M,
    K,
    R,
    M_BUCKET,
    SPLIT_M,
    ROWS_PER_SPLIT,
    stride_gm,
    stride_gr,
    stride_xm,
    stride_xk,
    stride_pm,
    stride_pk,
    seed_ptr,
    drop_threshold,
    drop_scale,
    input_scale,
    HAS_PREV: tl.constexpr,
    DROPOUT: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One [BLOCK_R, BLOCK_K] tile of dA over the rows of split pid_s; added atomically into
    da_ptr [R, K] (or written to slice pid_s of da_ptr [SPLIT_M, R, K] when DETERMINISTIC)."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = offs_k < K
    rank_ok = offs_r < R
    # The seed lives on the device: loading it here keeps the host from ever reading it.
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    row_start = pid_s * ROWS_PER_SPLIT
    row_end = min(row_start + ROWS_PER_SPLIT, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)
        row_ok = offs_m < row_end
        in_bounds = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=in_bounds, other=0.0)
        lora_in = lora_input_tile(
            x.to(tl.float32),
            x_prev_ptr,
            rows,
            offs_m,
            offs_k,
            in_bounds,
            stride_pm,
            stride_pk,
            seed,
            drop_threshold,
            drop_scale,
            input_scale,
            HAS_PREV=HAS_PREV,
            DROPOUT=DROPOUT,
        )
        g_t = tl.load(
            g_ptr + offs_r[:, None] * stride_gr + rows[None, :] * stride_gm,
            mask=rank_ok[:, None] & row_ok[None, :],
            other=0.0,
        )  # [BLOCK_R, BLOCK_M]
        dtype = x_ptr.dtype.element_ty
        acc = tl.dot(g_t.to(dtype), lora_in.to(dtype), acc, input_precision=DOT_PRECISION)
    if DETERMINISTIC:
        da_ptr += pid_s.to(tl.int64) * R * K
    da_ptrs = da_ptr + offs_r[:, None] * K + offs_k[None, :]
    da_mask = rank_ok[:, None] & col_ok[None, :]
    if DETERMINISTIC:
        tl.store(da_ptrs, acc, mask=da_mask)
    else:
        tl.atomic_add(da_ptrs, acc, mask=da_mask)


def lora_grad_A(
    g: torch.Tensor,
    x: torch.Tensor,
    x_prev: torch.Tensor | None = None,
    *,
    input_scale: float = 1.0,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dA = g^T @ drop(input_scale * (x [+ x_prev]))`` for ``g [M, R]`` (float32) and 2-D
    ``x [M, K]``, in x's dtype."""
    M, K = x.shape
    R = g.shape[1]
    check_2d("g", g, M, R)
    if x_prev is not None:
        check_2d("x_prev", x_prev, M, K)
    check_same(x, x_prev=x_prev)
    if g.dtype != torch.float32 or g.device != x.device:
        raise TypeError(f"g must be float32 on {x.device}, got {g.dtype} on {g.device}")
    if M == 0:
        return torch.zeros((R, K), device=x.device, dtype=x.dtype)
    block_r = rank_block(R)
    block_k_min = 32 if INTERPRETED else 64
    # Split the rows so that the grid fills the GPU even when K / BLOCK_K is small.
    programs = triton.cdiv(K, block_k_min) * triton.cdiv(R, block_r)
    target = (
        2
        if INTERPRETED
        else 4 * sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    )
    split = max(1, min(triton.cdiv(target, programs), triton.cdiv(M, 128)))
    rows_per_split = triton.cdiv(M, split)
    det = deterministic()
    da = torch.zeros((split, R, K) if det else (R, K), device=x.device, dtype=torch.float32)
    seed_arg, threshold, scale = dropout_args(dropout_p, dropout_seed, x)
    prev = x_prev if x_prev is not None else x

    def grid(meta):
        return (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(R, block_r), split)

    _lora_grad_a_kernel[grid](
        g,
        x,
        prev,
        da,
        M,
        K,
        R,
        triton.next_power_of_2(M),
        split,
        rows_per_split,
        g.stride(0),
        g.stride(1),
        x.stride(0),
        x.stride(1),
        prev.stride(0),
        prev.stride(1),
        seed_arg,
        threshold,
        scale,
        float(input_scale),
        HAS_PREV=x_prev is not None,
        DROPOUT=dropout_p > 0.0,
        DETERMINISTIC=det,
        DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_R=block_r,
    )
    if det:
        da = da.sum(0)
    return da.to(x.dtype)
