"""The LoRA-A gradient: ``dA = g^T drop(s_in * (x [+ x_prev]))``, the LoRA input rebuilt from
``x`` (and ``x_prev``) and the dropout seed instead of being saved in forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dropout_mask import dropout_threshold
from ._common import (
    PlanCache,
    aligned,
    allow_tf32,
    cdiv,
    check_2d,
    check_rank_space,
    check_same,
    deterministic,
    dot_precision,
    next_power_of_2,
    rank_block,
    rank_bucket,
    tensor_key,
)
from ._configs import ROWS, ROWS_UNALIGNED, smallest, tile_configs
from ._jit import lora_input_tile, tile_ptrs
from ._target import autotune, launch, target_of
from .dropout_kernel import dropout_args

KEY = ["M_BUCKET", "K", "R_BUCKET", "BLOCK_R", "SPLIT_M", "HAS_PREV", "DROPOUT", "DETERMINISTIC", "DOT_PRECISION"]


@triton.jit
def _lora_grad_a_kernel(
    g_ptr,
    x_ptr,
    x_prev_ptr,
    da_ptr,
    seed_ptr,
    M,
    K,
    R,
    M_BUCKET,
    R_BUCKET,
    SPLIT_M,
    ROWS_PER_SPLIT,
    stride_gm,
    stride_gr,
    stride_xm,
    stride_xk,
    stride_pm,
    stride_pk,
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
    da_ptr [R, K] (or written to slice pid_s of da_ptr [SPLIT_M, R, K] when DETERMINISTIC).

    The dot has BLOCK_R (16..64) rows, below wgmma's 64: on Hopper it runs as mma.sync. The kernel
    streams x once and is memory-bound, so tensor-core width is not what limits it."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = offs_k < K
    rank_ok = offs_r < R
    seed = tl.load(seed_ptr) if DROPOUT else 0
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    row_start = pid_s * ROWS_PER_SPLIT
    row_end = min(row_start + ROWS_PER_SPLIT, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < row_end
        in_bounds = row_ok[:, None] & col_ok[None, :]
        x = tl.load(tile_ptrs(x_ptr, offs_m, offs_k, stride_xm, stride_xk), mask=in_bounds, other=0.0)
        lora_in = lora_input_tile(
            x.to(tl.float32), x_prev_ptr, offs_m, offs_k, in_bounds, stride_pm, stride_pk, seed, drop_threshold,
            drop_scale, input_scale, HAS_PREV=HAS_PREV, DROPOUT=DROPOUT,
        )  # fmt: skip
        g_t = tl.load(
            tile_ptrs(g_ptr, offs_r, offs_m, stride_gr, stride_gm),
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
        # relaxed: read only after the kernel ends; acq_rel would add a fence per atomic.
        tl.atomic_add(da_ptrs, acc, mask=da_mask, sem="relaxed")


_CONFIGS = tile_configs(ROWS, ("BLOCK_M", "BLOCK_K"))
_UNALIGNED_CONFIGS = tile_configs(ROWS_UNALIGNED, ("BLOCK_M", "BLOCK_K"))
_grad_a_jit = _lora_grad_a_kernel
_lora_grad_a_kernel = autotune(_CONFIGS, KEY, reset_to_zero=["da_ptr"])(_grad_a_jit)
_lora_grad_a_unaligned_kernel = autotune(_UNALIGNED_CONFIGS, KEY, reset_to_zero=["da_ptr"])(_grad_a_jit)


class _Plan:
    """What every ``lora_grad_A`` call of one key launches (see ``linear_lora_fwd._Plan``)."""

    __slots__ = ("kernel", "grid", "static", "da_shape")


_PLANS = PlanCache()


def _plan(g, x, x_prev, dropout_p, det, target) -> _Plan:
    M, K = x.shape
    R = g.shape[1]
    check_2d("g", g, M, R)
    if x_prev is not None:
        check_2d("x_prev", x_prev, M, K)
    check_same(x, x_prev=x_prev)
    check_rank_space("g", g, x)
    plan = _Plan()
    plan.kernel = None  # no rows: dA is zero
    if M == 0:
        return plan
    block_r = rank_block(R)
    is_aligned = aligned(x, x_prev)
    configs = _CONFIGS if is_aligned else _UNALIGNED_CONFIGS
    # Split the rows so that the grid fills the GPU (4 programs per SM) even when K / BLOCK_K is
    # small; each split keeps at least one full tile of the largest BLOCK_M.
    programs = cdiv(K, smallest(configs, "BLOCK_K")) * cdiv(R, block_r)
    block_m_max = max(c.kwargs["BLOCK_M"] for c in configs)
    wanted = 4 * target.sm_count
    split = max(1, min(cdiv(wanted, programs), cdiv(M, block_m_max)))
    plan.da_shape = (split, R, K) if det else (R, K)
    plan.kernel = _lora_grad_a_kernel if is_aligned else _lora_grad_a_unaligned_kernel
    rank_tiles = cdiv(R, block_r)
    plan.grid = lambda meta: (cdiv(K, meta["BLOCK_K"]), rank_tiles, split)
    prev = x_prev if x_prev is not None else x
    threshold, scale = (dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)) if dropout_p > 0.0 else (0, 1.0)
    plan.static = dict(
        M=M,
        K=K,
        R=R,
        M_BUCKET=next_power_of_2(M),
        R_BUCKET=rank_bucket(R),
        SPLIT_M=split,
        ROWS_PER_SPLIT=cdiv(M, split),
        stride_gm=g.stride(0),
        stride_gr=g.stride(1),
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_pm=prev.stride(0),
        stride_pk=prev.stride(1),
        drop_threshold=threshold,
        drop_scale=scale,
        HAS_PREV=x_prev is not None,
        DROPOUT=dropout_p > 0.0,
        DETERMINISTIC=det,
        DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_R=block_r,
    )
    return plan


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
    ``x [M, K]``, in x's dtype. ``dropout_seed`` is the forward's 0-d int64 seed tensor."""
    seed_ptr = dropout_args(dropout_p, dropout_seed, x)[0]
    det = deterministic()
    target = target_of(x.device)
    key = (
        tensor_key(g),
        tensor_key(x),
        None if x_prev is None else tensor_key(x_prev),
        dropout_p,
        det,
        target,
        allow_tf32(),
    )
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS.put(key, _plan(g, x, x_prev, dropout_p, det, target))
    if plan.kernel is None:
        return torch.zeros((g.shape[1], x.shape[1]), device=x.device, dtype=x.dtype)
    da = torch.zeros(plan.da_shape, device=x.device, dtype=torch.float32)
    launch(
        plan.kernel,
        plan.grid,
        g_ptr=g,
        x_ptr=x,
        x_prev_ptr=x_prev if x_prev is not None else x,
        da_ptr=da,
        seed_ptr=seed_ptr,
        input_scale=float(input_scale),
        **plan.static,
    )
    if det:
        da = da.sum(0)
    return da.to(x.dtype)
