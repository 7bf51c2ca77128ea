"""LoRA down-projection with the input-shortcut folded in:
``z = drop(s_in * (x [+ x_prev])) A^T`` and, as a by-product, ``||x||_F^2``.

``x + x_prev`` is formed in registers and never materialised; the dropout mask comes from the
dropout seed. ``s_in = 2`` covers the first block of an input-shortcut chain, whose ``x_prev`` is
its own input. Memory-bound: one read of ``x`` (and ``x_prev``) per rank tile.
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
    check_same,
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

# Every flag that changes the build is in the key: an is-chain's block 0 (no x_prev) must not
# hand its tuned config to block 1 (x_prev, twice the shared memory).
KEY = ["M_BUCKET", "K", "R_BUCKET", "BLOCK_R", "HAS_PREV", "DROPOUT", "SQNORM", "DOT_PRECISION"]


@triton.jit
def _lora_down_kernel(
    x_ptr,
    x_prev_ptr,
    a_ptr,
    z_ptr,
    sqnorm_ptr,
    seed_ptr,
    M,
    K,
    R,
    M_BUCKET,
    R_BUCKET,
    stride_xm,
    stride_xk,
    stride_pm,
    stride_pk,
    stride_ar,
    stride_ak,
    stride_zm,
    stride_zr,
    drop_threshold,
    drop_scale,
    input_scale,
    HAS_PREV: tl.constexpr,
    DROPOUT: tl.constexpr,
    SQNORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_R] tile of z; loops over K. sqnorm_ptr gets one partial sum per M tile."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    seed = tl.load(seed_ptr) if DROPOUT else 0
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # A [BLOCK_M] running sum: a [BLOCK_M, BLOCK_K] accumulator would hold a whole float32 tile in
    # registers across the K loop (and spill).
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_bounds = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(tile_ptrs(x_ptr, offs_m, offs_k, stride_xm, stride_xk), mask=in_bounds, other=0.0)
        x = x.to(tl.float32)
        if SQNORM:
            sq += tl.sum(x * x, axis=1)
        lora_in = lora_input_tile(
            x, x_prev_ptr, offs_m, offs_k, in_bounds, stride_pm, stride_pk, seed, drop_threshold, drop_scale,
            input_scale, HAS_PREV=HAS_PREV, DROPOUT=DROPOUT,
        )  # fmt: skip
        a_t = tl.load(
            tile_ptrs(a_ptr, offs_k, offs_r, stride_ak, stride_ar),
            mask=(offs_k[:, None] < K) & (offs_r[None, :] < R),
            other=0.0,
        )  # [BLOCK_K, BLOCK_R]
        acc = tl.dot(lora_in.to(a_t.dtype), a_t, acc, input_precision=DOT_PRECISION)
    tl.store(
        tile_ptrs(z_ptr, offs_m, offs_r, stride_zm, stride_zr),
        acc.to(z_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_r[None, :] < R),
    )
    if SQNORM:
        if pid_r == 0:
            tl.store(sqnorm_ptr + pid_m, tl.sum(sq, axis=0))


_CONFIGS = tile_configs(ROWS, ("BLOCK_M", "BLOCK_K"))
_UNALIGNED_CONFIGS = tile_configs(ROWS_UNALIGNED, ("BLOCK_M", "BLOCK_K"))
_down_jit = _lora_down_kernel
# reset_to_zero: configs differ in BLOCK_M, so a tuning run must not leave partial sums behind.
_lora_down_kernel = autotune(_CONFIGS, KEY, reset_to_zero=["sqnorm_ptr"])(_down_jit)
_lora_down_unaligned_kernel = autotune(_UNALIGNED_CONFIGS, KEY, reset_to_zero=["sqnorm_ptr"])(_down_jit)


class _Plan:
    """What every ``lora_down`` call of one key launches (see ``linear_lora_fwd._Plan``)."""

    __slots__ = ("kernel", "grid", "static", "partials")


_PLANS = PlanCache()


def _plan(x, lora_A, x_prev, z, dropout_p, compute_x_sqnorm) -> _Plan:
    M, K = x.shape
    R = lora_A.shape[0]
    check_2d("lora_A", lora_A, R, K)
    if x_prev is not None:
        check_2d("x_prev", x_prev, M, K)
    check_same(x, lora_A=lora_A, x_prev=x_prev)
    plan = _Plan()
    plan.kernel = None  # no rows: nothing to launch
    if M == 0:
        return plan
    block_r = rank_block(R)
    is_aligned = aligned(x, x_prev)
    plan.kernel = _lora_down_kernel if is_aligned else _lora_down_unaligned_kernel
    # One partial per M tile: as many as the smallest BLOCK_M the tuner may pick produces.
    plan.partials = cdiv(M, smallest(_CONFIGS if is_aligned else _UNALIGNED_CONFIGS, "BLOCK_M"))
    rank_tiles = cdiv(R, block_r)
    plan.grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), rank_tiles)
    prev = x_prev if x_prev is not None else x
    threshold, scale = (dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)) if dropout_p > 0.0 else (0, 1.0)
    plan.static = dict(
        M=M,
        K=K,
        R=R,
        M_BUCKET=next_power_of_2(M),
        R_BUCKET=rank_bucket(R),
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_pm=prev.stride(0),
        stride_pk=prev.stride(1),
        stride_ar=lora_A.stride(0),
        stride_ak=lora_A.stride(1),
        stride_zm=z.stride(0),
        stride_zr=z.stride(1),
        drop_threshold=threshold,
        drop_scale=scale,
        HAS_PREV=x_prev is not None,
        DROPOUT=dropout_p > 0.0,
        SQNORM=compute_x_sqnorm,
        DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_R=block_r,
    )
    return plan


def lora_down(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    x_prev: torch.Tensor | None = None,
    *,
    input_scale: float = 1.0,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
    compute_x_sqnorm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``z = drop(input_scale * (x [+ x_prev])) @ lora_A^T`` for 2-D ``x [M, K]``; returns
    ``(z [M, R] in x's dtype, ||x||_F^2 as a float32 scalar or None)``. ``dropout_seed`` is a
    0-d int64 tensor on x's device."""
    seed_ptr = dropout_args(dropout_p, dropout_seed, x)[0]
    z = torch.empty((x.shape[0], lora_A.shape[0]), device=x.device, dtype=x.dtype)
    key = (
        tensor_key(x),
        tensor_key(lora_A),
        None if x_prev is None else tensor_key(x_prev),
        dropout_p,
        compute_x_sqnorm,
        target_of(x.device),
        allow_tf32(),
    )
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS.put(key, _plan(x, lora_A, x_prev, z, dropout_p, compute_x_sqnorm))
    if plan.kernel is None:
        return z, (torch.zeros((), device=x.device, dtype=torch.float32) if compute_x_sqnorm else None)
    partials = torch.zeros(plan.partials, device=x.device, dtype=torch.float32) if compute_x_sqnorm else None
    launch(
        plan.kernel,
        plan.grid,
        x_ptr=x,
        x_prev_ptr=x_prev if x_prev is not None else x,
        a_ptr=lora_A,
        z_ptr=z,
        sqnorm_ptr=partials if partials is not None else z,  # z: a placeholder, never written
        seed_ptr=seed_ptr,
        input_scale=float(input_scale),
        **plan.static,
    )
    return z, (partials.sum() if compute_x_sqnorm else None)
