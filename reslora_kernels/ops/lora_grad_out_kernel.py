"""Both LoRA gradients that read ``grad_out``, from one read of it:
``g = s * grad_out B`` (the gradient of ``u``) and ``dB = s * grad_out^T u``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    PlanCache,
    aligned,
    allow_tf32,
    cdiv,
    check_2d,
    check_same,
    deterministic,
    dot_precision,
    next_power_of_2,
    rank_block,
    rank_bucket,
    tensor_key,
)
from ._configs import GRAD_OUT, GRAD_OUT_BLOCK_M, GRAD_OUT_UNALIGNED, tile_configs
from ._jit import tile_ptrs
from ._target import autotune, launch, target_of

KEY = ["M_BUCKET", "N", "R_BUCKET", "BLOCK_R", "DETERMINISTIC", "DOT_PRECISION"]


@triton.jit
def _lora_grad_out_kernel(
    grad_out_ptr,
    b_ptr,
    u_ptr,
    g_ptr,
    db_ptr,
    M,
    N,
    R,
    M_BUCKET,
    R_BUCKET,
    stride_om,
    stride_on,
    stride_bn,
    stride_br,
    stride_um,
    stride_ur,
    stride_gm,
    stride_gr,
    scaling,
    DETERMINISTIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Rows [BLOCK_M] x ranks [BLOCK_R]; loops over N. g is complete per program; dB gets this
    program's [N, BLOCK_R] share, added atomically into db_ptr [N, R] (or written to the slice
    pid_m of db_ptr [num_m, N, R] when DETERMINISTIC)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_m < M
    rank_ok = offs_r < R
    u = tl.load(
        tile_ptrs(u_ptr, offs_m, offs_r, stride_um, stride_ur),
        mask=row_ok[:, None] & rank_ok[None, :],
        other=0.0,
    )
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if DETERMINISTIC:
        db_ptr += pid_m.to(tl.int64) * N * R
    # Each program starts at its own N tile and wraps around: the M-tile programs add into the
    # same rows of dB, and starting together at n = 0 they would queue on the same addresses.
    num_n = tl.cdiv(N, BLOCK_N)
    first = pid_m % num_n
    for i in range(0, num_n):
        n_tile = first + i
        n_tile = tl.where(n_tile >= num_n, n_tile - num_n, n_tile)
        offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        grad_out = tl.load(
            tile_ptrs(grad_out_ptr, offs_m, offs_n, stride_om, stride_on),
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            tile_ptrs(b_ptr, offs_n, offs_r, stride_bn, stride_br),
            mask=col_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_R]
        g = tl.dot(grad_out, b, g, input_precision=DOT_PRECISION)
        db = tl.dot(tl.trans(grad_out), u, input_precision=DOT_PRECISION) * scaling  # [BLOCK_N, BLOCK_R]
        db_ptrs = db_ptr + offs_n[:, None] * R + offs_r[None, :]
        db_mask = col_ok[:, None] & rank_ok[None, :]
        if DETERMINISTIC:
            tl.store(db_ptrs, db, mask=db_mask)
        else:
            # relaxed: the sums are read only after the kernel ends, so no ordering with other
            # memory operations is needed, and the default acq_rel costs a fence (MEMBAR.GPU) per
            # atomic.
            tl.atomic_add(db_ptrs, db, mask=db_mask, sem="relaxed")
    tl.store(
        tile_ptrs(g_ptr, offs_m, offs_r, stride_gm, stride_gr),
        g * scaling,
        mask=row_ok[:, None] & rank_ok[None, :],
    )


_grad_out_jit = _lora_grad_out_kernel
_lora_grad_out_kernel = autotune(tile_configs(GRAD_OUT, ("BLOCK_N",)), KEY, reset_to_zero=["db_ptr"])(_grad_out_jit)
_lora_grad_out_unaligned_kernel = autotune(
    tile_configs(GRAD_OUT_UNALIGNED, ("BLOCK_N",)), KEY, reset_to_zero=["db_ptr"]
)(_grad_out_jit)


class _Plan:
    """What every ``lora_grad_out`` call of one key launches (see ``linear_lora_fwd._Plan``)."""

    __slots__ = ("kernel", "grid", "static", "db_shape")


_PLANS = PlanCache()


def _plan(grad_out, lora_B, u, det) -> _Plan:
    M, N = grad_out.shape
    R = u.shape[1]
    check_2d("lora_B", lora_B, N, R)
    check_2d("u", u, M, R)
    check_same(grad_out, lora_B=lora_B, u=u)
    plan = _Plan()
    plan.kernel = None  # no rows or no output columns: g and dB are zero
    if M == 0 or N == 0:
        return plan
    # BLOCK_M is the launcher's choice, not the tuner's: the deterministic partials depend on it.
    num_m = cdiv(M, GRAD_OUT_BLOCK_M)
    block_r = rank_block(R)
    plan.db_shape = (num_m, N, R) if det else (N, R)
    plan.kernel = _lora_grad_out_kernel if aligned(grad_out) else _lora_grad_out_unaligned_kernel
    plan.grid = (num_m, cdiv(R, block_r))
    plan.static = dict(
        M=M,
        N=N,
        R=R,
        M_BUCKET=next_power_of_2(M),
        R_BUCKET=rank_bucket(R),
        stride_om=grad_out.stride(0),
        stride_on=grad_out.stride(1),
        stride_bn=lora_B.stride(0),
        stride_br=lora_B.stride(1),
        stride_um=u.stride(0),
        stride_ur=u.stride(1),
        stride_gm=R,  # g is a new contiguous [M, R]
        stride_gr=1,
        DETERMINISTIC=det,
        DOT_PRECISION=dot_precision(grad_out.dtype),
        BLOCK_M=GRAD_OUT_BLOCK_M,
        BLOCK_R=block_r,
    )
    return plan


def lora_grad_out(
    grad_out: torch.Tensor, lora_B: torch.Tensor, u: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, dB)`` = ``(scaling * grad_out @ lora_B, scaling * grad_out^T @ u)`` for 2-D
    ``grad_out [M, N]``, ``u [M, R]``; ``g`` in float32 (it feeds two more products), ``dB`` in
    ``lora_B``'s dtype."""
    det = deterministic()
    key = (tensor_key(grad_out), tensor_key(lora_B), tensor_key(u), det, target_of(grad_out.device), allow_tf32())
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS.put(key, _plan(grad_out, lora_B, u, det))
    device, g_shape = grad_out.device, (grad_out.shape[0], u.shape[1])
    if plan.kernel is None:
        return torch.zeros(g_shape, device=device, dtype=torch.float32), torch.zeros_like(lora_B)
    g = torch.empty(g_shape, device=device, dtype=torch.float32)
    db = torch.zeros(plan.db_shape, device=device, dtype=torch.float32)
    launch(
        plan.kernel,
        plan.grid,
        grad_out_ptr=grad_out,
        b_ptr=lora_B,
        u_ptr=u,
        g_ptr=g,
        db_ptr=db,
        scaling=float(scaling),
        **plan.static,
    )
    if det:
        db = db.sum(0)
    return g, db.to(lora_B.dtype)
