"""The fused input gradient: ``dx = grad_out W + v`` with the LoRA term
``v = s_in * drop'(g A)`` (``drop'`` multiplies by the forward's mask / (1 - p)).

``v`` is computed first from the small rank-space tile and becomes the GEMM's initial
accumulator, so one accumulator serves both terms and ``dx`` is written once. For the
input-shortcut, ``x_prev`` received the same LoRA input, so its gradient is ``v`` itself: the
kernel also stores it, with no second pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_2d, check_same, dot_precision, pick, rank_block
from ._jit import grouped_tile
from .dropout import dropout_args, keep_mask


def _configs():
    return pick(
        [
            triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bk, bn, w, s in [
                (128, 256, 64, 8, 3),
                (128, 128, 64, 8, 4),
                (128, 128, 64, 4, 4),
                (64, 128, 64, 4, 4),
            ]
        ],
        [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_N": 32, "GROUP_M": 2})],
    )


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "R"])
@triton.jit
def _linear_lora_dx_kernel(
    grad_out_ptr,
    w_ptr,
    g_ptr,
    a_ptr,
    dx_ptr,
    dx_prev_ptr,
    M,
    N,
    K,
    R,
    M_BUCKET,
    stride_om,
    stride_on,
    stride_wn,
    stride_wk,
    stride_gm,
    stride_gr,
    stride_ar,
    stride_ak,
    stride_dm,
    stride_dk,
    stride_pm,
    stride_pk,
    seed_ptr,
    drop_threshold,
    drop_scale,
    input_scale,
    DROPOUT: tl.constexpr,
    STORE_PREV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_K] tile of dx: the rank loop of v, then the N loop of grad_out W."""
    # Grouped tile order: GROUP_M row tiles share each weight tile while it is in L2.
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)
    cols = offs_k.to(tl.int64)
    row_ok = offs_m < M
    col_ok = offs_k < K

    # The seed lives on the device: loading it here keeps the host from ever reading it.
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        g = tl.load(
            g_ptr + rows[:, None] * stride_gm + offs_r[None, :] * stride_gr,
            mask=row_ok[:, None] & (offs_r[None, :] < R),
            other=0.0,
        )
        a = tl.load(
            a_ptr + offs_r[:, None] * stride_ar + cols[None, :] * stride_ak,
            mask=(offs_r[:, None] < R) & col_ok[None, :],
            other=0.0,
        )  # [BLOCK_R, BLOCK_K]
        acc = tl.dot(g.to(a.dtype), a, acc, input_precision=DOT_PRECISION)
    acc = acc * input_scale
    if DROPOUT:
        acc = tl.where(keep_mask(seed, offs_m, offs_k, drop_threshold), acc * drop_scale, 0.0)
    out_mask = row_ok[:, None] & col_ok[None, :]
    if STORE_PREV:
        tl.store(
            dx_prev_ptr + rows[:, None] * stride_pm + cols[None, :] * stride_pk,
            acc.to(dx_prev_ptr.dtype.element_ty),
            mask=out_mask,
        )
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        grad_out = tl.load(
            grad_out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on,
            mask=row_ok[:, None] & (offs_n[None, :] < N),
            other=0.0,
        )
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + cols[None, :] * stride_wk,
            mask=(offs_n[:, None] < N) & col_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(grad_out, w, acc, input_precision=DOT_PRECISION)
    tl.store(
        dx_ptr + rows[:, None] * stride_dm + cols[None, :] * stride_dk, acc.to(dx_ptr.dtype.element_ty), mask=out_mask
    )


def linear_lora_dx(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    g: torch.Tensor,
    lora_A: torch.Tensor,
    *,
    input_scale: float = 1.0,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
    store_prev: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dx, dx_prev)`` for 2-D ``grad_out [M, N]`` and the rank-space gradient ``g [M, R]``
    (float32): ``dx_prev = input_scale * drop'(g @ lora_A)`` (returned when ``store_prev``) and
    ``dx = grad_out @ weight + dx_prev``."""
    M, N = grad_out.shape
    K = weight.shape[1]
    R = lora_A.shape[0]
    check_2d("weight", weight, N, K)
    check_2d("g", g, M, R)
    check_2d("lora_A", lora_A, R, K)
    check_same(grad_out, weight=weight, lora_A=lora_A)
    if g.dtype != torch.float32 or g.device != grad_out.device:
        raise TypeError(f"g must be float32 on {grad_out.device}, got {g.dtype} on {g.device}")
    dx = torch.empty((M, K), device=grad_out.device, dtype=grad_out.dtype)
    dx_prev = torch.empty_like(dx) if store_prev else None
    if M == 0:
        return dx, dx_prev

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)

    seed_arg, threshold, scale = dropout_args(dropout_p, dropout_seed, grad_out)
    prev = dx_prev if dx_prev is not None else dx
    _linear_lora_dx_kernel[grid](
        grad_out,
        weight,
        g,
        lora_A,
        dx,
        prev,
        M,
        N,
        K,
        R,
        triton.next_power_of_2(M),
        grad_out.stride(0),
        grad_out.stride(1),
        weight.stride(0),
        weight.stride(1),
        g.stride(0),
        g.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        dx.stride(0),
        dx.stride(1),
        prev.stride(0),
        prev.stride(1),
        seed_arg,
        threshold,
        scale,
        float(input_scale),
        DROPOUT=dropout_p > 0.0,
        STORE_PREV=store_prev,
        DOT_PRECISION=dot_precision(grad_out.dtype),
        BLOCK_R=rank_block(R),
    )
    return dx, dx_prev
