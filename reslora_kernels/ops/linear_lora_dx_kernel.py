"""The fused input gradient: ``dx = grad_out W + v`` with the LoRA term
``v = s_in * drop'(g A)`` (``drop'`` multiplies by the forward's mask / (1 - p)).

``v`` is computed first from the small rank-space tile and becomes the GEMM's initial
accumulator, so one accumulator serves both terms and ``dx`` is written once. For the
input-shortcut, ``x_prev`` received the same LoRA input, so its gradient is ``v`` itself: the
kernel also stores it, with no second pass.

As for the forward, Hopper (sm_90) with 16-byte aligned operands runs a persistent kernel that
loads ``grad_out`` and ``W`` through tensor descriptors (TMA) into wgmma; other targets run the
one-tile-per-program pointer kernel.
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
    descriptor_template,
    dot_precision,
    fresh_descriptor,
    next_power_of_2,
    rank_block,
    rank_bucket,
    tensor_key,
)
from ._configs import GEMM, GEMM_TMA, GEMM_UNALIGNED, gemm_configs
from ._jit import grouped_tile, lora_grad_tile, tile_ptrs
from ._target import autotune, launch, target_of, uses_tma
from .dropout_kernel import dropout_args

KEY = ["M_BUCKET", "N", "K", "R_BUCKET", "BLOCK_R", "ONE_RANK_TILE", "DROPOUT", "STORE_PREV", "DOT_PRECISION"]


@triton.jit
def _linear_lora_dx_kernel(
    grad_out_ptr,
    w_ptr,
    g_ptr,
    a_ptr,
    dx_ptr,
    dx_prev_ptr,
    seed_ptr,
    M,
    N,
    K,
    R,
    M_BUCKET,
    R_BUCKET,
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
    ONE_RANK_TILE: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_K] tile of dx: the rank loop of v, then the N loop of grad_out W."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    # The seed lives on the device: loading it here keeps the host from ever reading it.
    seed = tl.load(seed_ptr) if DROPOUT else 0
    acc = lora_grad_tile(
        g_ptr, a_ptr, offs_m, offs_k, M, K, R, stride_gm, stride_gr, stride_ar, stride_ak,
        seed, drop_threshold, drop_scale, input_scale,
        DROPOUT=DROPOUT, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
        ONE_RANK_TILE=ONE_RANK_TILE,
    )  # fmt: skip
    out_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    if STORE_PREV:
        tl.store(
            tile_ptrs(dx_prev_ptr, offs_m, offs_k, stride_pm, stride_pk),
            acc.to(dx_prev_ptr.dtype.element_ty),
            mask=out_mask,
        )
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        grad_out = tl.load(
            tile_ptrs(grad_out_ptr, offs_m, offs_n, stride_om, stride_on),
            mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
            other=0.0,
        )
        w = tl.load(
            tile_ptrs(w_ptr, offs_n, offs_k, stride_wn, stride_wk),
            mask=(offs_n[:, None] < N) & (offs_k[None, :] < K),
            other=0.0,
        )  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(grad_out, w, acc, input_precision=DOT_PRECISION)
    tl.store(tile_ptrs(dx_ptr, offs_m, offs_k, stride_dm, stride_dk), acc.to(dx_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _linear_lora_dx_tma_kernel(
    grad_out_desc,
    w_desc,
    dx_desc,
    dx_prev_desc,
    g_ptr,
    a_ptr,
    seed_ptr,
    M,
    N,
    K,
    R,
    M_BUCKET,
    R_BUCKET,
    stride_gm,
    stride_gr,
    stride_ar,
    stride_ak,
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
    ONE_RANK_TILE: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
):
    """Persistent: program p computes tiles p, p + NUM_SMS, ... of dx in grouped order.

    With one rank tile (r <= 64) the tiles and their N loops run as one software-pipelined loop,
    and the LoRA term of the next tile (g and A loads, the rank dot, the dropout mask, dx_prev)
    is computed right after this tile's dx store: by then the pipeliner has issued the next
    tile's first TMA loads, which land while that math runs, and the next tile's accumulator
    starts from it. (A prologue before each tile's N loop, as the multi-rank-tile schedule below
    has, runs before the loop's loads are issued; and the compiler's own loop flattening makes
    the accumulator a branch result, which disables the pipeliner.) Only a program's first tile
    computes its LoRA term before any load."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    num_tiles = num_m * num_k
    seed = tl.load(seed_ptr) if DROPOUT else 0
    if ONE_RANK_TILE:
        tile = tl.program_id(0)
        acc = _dx_lora_term(
            tile, dx_prev_desc, g_ptr, a_ptr, M, K, R, num_m, num_k, num_tiles, stride_gm, stride_gr, stride_ar,
            stride_ak, seed, drop_threshold, drop_scale, input_scale, DROPOUT, STORE_PREV, DOT_PRECISION, BLOCK_M,
            BLOCK_K, BLOCK_R, ONE_RANK_TILE, GROUP_M,
        )  # fmt: skip
        n_iters = tl.cdiv(N, BLOCK_N)
        for it in range(0, tl.cdiv(num_tiles - tl.program_id(0), NUM_SMS) * n_iters):
            t = it // n_iters
            n0 = (it - t * n_iters) * BLOCK_N
            tile = tl.program_id(0) + t * NUM_SMS
            pid_m, pid_k = grouped_tile(tile, num_m, num_k, GROUP_M)
            grad_out = grad_out_desc.load([pid_m * BLOCK_M, n0])
            w = w_desc.load([n0, pid_k * BLOCK_K])  # [BLOCK_N, BLOCK_K]
            acc = tl.dot(grad_out, w, acc, input_precision=DOT_PRECISION)
            if n0 + BLOCK_N >= N:
                dx_desc.store([pid_m * BLOCK_M, pid_k * BLOCK_K], acc.to(dx_desc.dtype))
                # Past a program's last tile this computes a term nobody uses (rows past M load
                # as zeros): guarding it would make the accumulator a nested branch result, which
                # stops the pipeliner from overlapping consecutive wgmma groups.
                acc = _dx_lora_term(
                    tile + NUM_SMS, dx_prev_desc, g_ptr, a_ptr, M, K, R, num_m, num_k, num_tiles, stride_gm,
                    stride_gr, stride_ar, stride_ak, seed, drop_threshold, drop_scale, input_scale, DROPOUT,
                    STORE_PREV, DOT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_R, ONE_RANK_TILE, GROUP_M,
                )  # fmt: skip
    else:
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS):
            acc = _dx_lora_term(
                tile, dx_prev_desc, g_ptr, a_ptr, M, K, R, num_m, num_k, num_tiles, stride_gm, stride_gr, stride_ar,
                stride_ak, seed, drop_threshold, drop_scale, input_scale, DROPOUT, STORE_PREV, DOT_PRECISION, BLOCK_M,
                BLOCK_K, BLOCK_R, ONE_RANK_TILE, GROUP_M,
            )  # fmt: skip
            pid_m, pid_k = grouped_tile(tile, num_m, num_k, GROUP_M)
            for n0 in range(0, N, BLOCK_N):
                grad_out = grad_out_desc.load([pid_m * BLOCK_M, n0])
                w = w_desc.load([n0, pid_k * BLOCK_K])  # [BLOCK_N, BLOCK_K]
                acc = tl.dot(grad_out, w, acc, input_precision=DOT_PRECISION)
            dx_desc.store([pid_m * BLOCK_M, pid_k * BLOCK_K], acc.to(dx_desc.dtype))


@triton.jit
def _dx_lora_term(tile, dx_prev_desc, g_ptr, a_ptr, M, K, R, num_m, num_k, num_tiles, stride_gm, stride_gr,
                  stride_ar, stride_ak, seed, drop_threshold, drop_scale, input_scale, DROPOUT: tl.constexpr,
                  STORE_PREV: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ONE_RANK_TILE: tl.constexpr,
                  GROUP_M: tl.constexpr):  # fmt: skip
    """``v = s_in drop'(g A)`` of dx tile number ``tile`` (stored as that tile of dx_prev when
    ``STORE_PREV`` and the tile exists): the initial accumulator of the tile's N loop."""
    pid_m, pid_k = grouped_tile(tile, num_m, num_k, GROUP_M)
    v = lora_grad_tile(
        g_ptr, a_ptr, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_k * BLOCK_K + tl.arange(0, BLOCK_K), M, K, R,
        stride_gm, stride_gr, stride_ar, stride_ak, seed, drop_threshold, drop_scale, input_scale,
        DROPOUT=DROPOUT, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
        ONE_RANK_TILE=ONE_RANK_TILE,
    )  # fmt: skip
    if STORE_PREV:
        if tile < num_tiles:
            dx_prev_desc.store([pid_m * BLOCK_M, pid_k * BLOCK_K], v.to(dx_prev_desc.dtype))
    return v


def _set_tma_blocks(nargs: dict) -> None:
    """Autotuning pre-hook: the descriptors' block shapes follow the config being run."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["grad_out_desc"].block_shape = [bm, bn]
    nargs["w_desc"].block_shape = [bn, bk]
    nargs["dx_desc"].block_shape = [bm, bk]
    nargs["dx_prev_desc"].block_shape = [bm, bk]


_dx_jit = _linear_lora_dx_kernel
_linear_lora_dx_kernel = autotune(gemm_configs(GEMM, "BLOCK_K", "BLOCK_N"), KEY)(_dx_jit)
_linear_lora_dx_unaligned_kernel = autotune(gemm_configs(GEMM_UNALIGNED, "BLOCK_K", "BLOCK_N"), KEY)(_dx_jit)
_linear_lora_dx_tma_kernel = autotune(
    gemm_configs(GEMM_TMA, "BLOCK_K", "BLOCK_N", pre_hook=_set_tma_blocks), KEY + ["NUM_SMS"]
)(_linear_lora_dx_tma_kernel)


class _Plan:
    """What every ``linear_lora_dx`` call of one key launches (see ``linear_lora_fwd._Plan``)."""

    __slots__ = ("kernel", "grid", "static", "tma", "grad_out_desc", "w_desc", "dx_desc")


_PLANS = PlanCache()


def _plan(grad_out, weight, g, lora_A, dx, dx_prev, dropout_p, target) -> _Plan:
    M, N = grad_out.shape
    K = weight.shape[1]
    R = lora_A.shape[0]
    check_2d("weight", weight, N, K)
    check_2d("g", g, M, R)
    check_2d("lora_A", lora_A, R, K)
    check_same(grad_out, weight=weight, lora_A=lora_A)
    check_rank_space("g", g, grad_out)
    plan = _Plan()
    plan.kernel = None  # nothing to launch: no rows or no input columns
    if M == 0 or K == 0:
        return plan
    threshold, scale = (dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)) if dropout_p > 0.0 else (0, 1.0)
    plan.static = dict(
        M=M,
        N=N,
        K=K,
        R=R,
        M_BUCKET=next_power_of_2(M),
        R_BUCKET=rank_bucket(R),
        stride_gm=g.stride(0),
        stride_gr=g.stride(1),
        stride_ar=lora_A.stride(0),
        stride_ak=lora_A.stride(1),
        drop_threshold=threshold,
        drop_scale=scale,
        DROPOUT=dropout_p > 0.0,
        STORE_PREV=dx_prev is not None,
        DOT_PRECISION=dot_precision(grad_out.dtype),
        BLOCK_R=rank_block(R),
        ONE_RANK_TILE=R <= rank_block(R),
    )
    is_aligned = aligned(grad_out, weight, dx, dx_prev)
    # Tensor descriptors describe no empty dimension: N = 0 (dx = the LoRA term) takes the pointers.
    plan.tma = uses_tma(target) and is_aligned and N > 0
    if plan.tma:
        sms = target.sm_count
        plan.kernel = _linear_lora_dx_tma_kernel
        plan.grid = lambda meta: (min(sms, cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"])),)
        plan.static["NUM_SMS"] = sms
        plan.grad_out_desc = descriptor_template(grad_out)
        plan.w_desc = descriptor_template(weight)
        plan.dx_desc = descriptor_template(dx)  # dx_prev: the same shape, strides and dtype
        return plan
    plan.kernel = _linear_lora_dx_kernel if is_aligned else _linear_lora_dx_unaligned_kernel
    plan.grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"]),)
    # The one-tile-per-program kernel keeps its rank loop: it has no tile loop to flatten, and
    # without the loop ptxas spills in some of its dropout configs (compile matrix).
    plan.static["ONE_RANK_TILE"] = False
    plan.static.update(
        stride_om=grad_out.stride(0),
        stride_on=grad_out.stride(1),
        stride_wn=weight.stride(0),
        stride_wk=weight.stride(1),
        stride_dm=dx.stride(0),
        stride_dk=dx.stride(1),
        stride_pm=dx.stride(0),
        stride_pk=dx.stride(1),
    )
    return plan


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
    ``dx = grad_out @ weight + dx_prev``. ``dropout_seed`` is the forward's 0-d int64 seed tensor."""
    seed_ptr = dropout_args(dropout_p, dropout_seed, grad_out)[0]
    shape = (grad_out.shape[0], weight.shape[-1])
    dx = torch.empty(shape, device=grad_out.device, dtype=grad_out.dtype)
    dx_prev = torch.empty(shape, device=grad_out.device, dtype=grad_out.dtype) if store_prev else None
    target = target_of(grad_out.device)
    key = (
        tensor_key(grad_out),
        tensor_key(weight),
        tensor_key(g),
        tensor_key(lora_A),
        dx.data_ptr() % 16,
        None if dx_prev is None else dx_prev.data_ptr() % 16,
        dropout_p,
        target,
        allow_tf32(),
    )
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS.put(key, _plan(grad_out, weight, g, lora_A, dx, dx_prev, dropout_p, target))
    if plan.kernel is None:
        return dx, dx_prev
    prev = dx_prev if dx_prev is not None else dx  # never written unless STORE_PREV
    kwargs = plan.static.copy()
    kwargs.update(g_ptr=g, a_ptr=lora_A, seed_ptr=seed_ptr, input_scale=float(input_scale))
    if plan.tma:
        kwargs.update(
            grad_out_desc=fresh_descriptor(plan.grad_out_desc, grad_out),
            w_desc=fresh_descriptor(plan.w_desc, weight),
            dx_desc=fresh_descriptor(plan.dx_desc, dx),
            dx_prev_desc=fresh_descriptor(plan.dx_desc, prev),
        )
    else:
        kwargs.update(grad_out_ptr=grad_out, w_ptr=weight, dx_ptr=dx, dx_prev_ptr=prev)
    launch(plan.kernel, plan.grid, **kwargs)
    return dx, dx_prev
