"""LoRA down-projection with the input-shortcut folded in:
``z = drop(s_in * (x [+ x_prev])) A^T`` and, as a by-product, ``||x||_F^2``.

``x + x_prev`` is formed in registers and never materialised; the dropout mask comes from the
dropout seed. ``s_in = 2`` covers the first block of an input-shortcut chain, whose ``x_prev`` is
its own input.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_2d, check_same, dot_precision, pick, rank_block
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


# reset_to_zero: configs differ in BLOCK_M, so a tuning run must not leave partial sums behind.
@triton.autotune(configs=_configs(), key=["M_BUCKET", "K", "R"], reset_to_zero=["sqnorm_ptr"])
@triton.jit
def _lora_down_kernel(
    x_ptr,
    x_prev_ptr,
    a_ptr,
    z_ptr,
    sqnorm_ptr,
    M,
    K,
    R,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_pm,
    stride_pk,
    stride_ar,
    stride_ak,
    stride_zm,
    stride_zr,
    seed_ptr,
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
    rows = offs_m.to(tl.int64)  # row * stride can pass 2^31 elements
    # The seed lives on the device: loading it here keeps the host from ever reading it.
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_bounds = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=in_bounds, other=0.0)
        x = x.to(tl.float32)
        if SQNORM:
            sq += x * x
        lora_in = lora_input_tile(
            x,
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
        a_t = tl.load(
            a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=(offs_r[None, :] < R) & (offs_k[:, None] < K),
            other=0.0,
        )  # [BLOCK_K, BLOCK_R]
        acc = tl.dot(lora_in.to(a_t.dtype), a_t, acc, input_precision=DOT_PRECISION)
    z_ptrs = z_ptr + rows[:, None] * stride_zm + offs_r[None, :] * stride_zr
    tl.store(z_ptrs, acc.to(z_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))
    if SQNORM:
        if pid_r == 0:
            tl.store(sqnorm_ptr + pid_m, tl.sum(tl.sum(sq, axis=1), axis=0))


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
    ``(z [M, R] in x's dtype, ||x||_F^2 as a float32 scalar or None)``."""
    M, K = x.shape
    R = lora_A.shape[0]
    check_2d("lora_A", lora_A, R, K)
    if x_prev is not None:
        check_2d("x_prev", x_prev, M, K)
    check_same(x, lora_A=lora_A, x_prev=x_prev)
    z = torch.empty((M, R), device=x.device, dtype=x.dtype)
    if M == 0:
        return z, (torch.zeros((), device=x.device, dtype=torch.float32) if compute_x_sqnorm else None)
    block_r = rank_block(R)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, block_r))

    # One partial per M tile; the smallest BLOCK_M of the configs bounds how many there can be.
    partials = torch.zeros(triton.cdiv(M, 32), device=x.device, dtype=torch.float32) if compute_x_sqnorm else None
    seed_arg, threshold, scale = dropout_args(dropout_p, dropout_seed, x)
    prev = x_prev if x_prev is not None else x
    _lora_down_kernel[grid](
        x,
        prev,
        lora_A,
        z,
        partials if partials is not None else z,
        M,
        K,
        R,
        triton.next_power_of_2(M),
        x.stride(0),
        x.stride(1),
        prev.stride(0),
        prev.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        z.stride(0),
        z.stride(1),
        seed_arg,
        threshold,
        scale,
        float(input_scale),
        HAS_PREV=x_prev is not None,
        DROPOUT=dropout_p > 0.0,
        SQNORM=compute_x_sqnorm,
        DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_R=block_r,
    )
    return z, (partials.sum() if partials is not None else None)
