"""The fused linear forward: ``y = x W^T + b + s * u B^T`` in one GEMM.

The LoRA-up term rides in the same accumulator: the rank-space tile ``s * u`` times ``B^T`` is
added with ``tl.dot`` after the K loop, so ``y`` is written once and no ``[M, N]`` temporary of the
LoRA branch exists (PEFT writes one, scales it and adds it: three extra passes over ``[M, N]``).
``u`` is ``z`` (none, is), the concatenated-rank ``z`` (bs) or ``z + z_prev`` (ms).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_2d, check_same, dot_precision, pick, rank_block
from ._jit import grouped_tile


def _configs():
    return pick(
        [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [
                (128, 256, 64, 8, 3),
                (128, 128, 64, 8, 4),
                (128, 128, 64, 4, 4),
                (64, 128, 64, 4, 4),
            ]
        ],
        [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2})],
    )


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "R"])
@triton.jit
def _linear_lora_fwd_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    u_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    R,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_um,
    stride_ur,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y: the K loop of x W^T, then the rank loop of s u B^T."""
    # Grouped tile order: GROUP_M row tiles share each weight tile while it is in L2.
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        )
        w_t = tl.load(
            w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk,
            mask=(offs_n[None, :] < N) & (offs_k[:, None] < K),
            other=0.0,
        )  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(x, w_t, acc, input_precision=DOT_PRECISION)
    # Epilogue: the LoRA-up term into the same accumulator; scaling folded into the u tile so
    # no second [BLOCK_M, BLOCK_N] accumulator is needed.
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        u = tl.load(
            u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur,
            mask=(offs_m[:, None] < M) & (offs_r[None, :] < R),
            other=0.0,
        )
        b_t = tl.load(
            b_ptr + cols[None, :] * stride_bn + offs_r[:, None] * stride_br,
            mask=(offs_n[None, :] < N) & (offs_r[:, None] < R),
            other=0.0,
        )  # [BLOCK_R, BLOCK_N]
        u = (u.to(tl.float32) * scaling).to(b_t.dtype)
        acc = tl.dot(u, b_t, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def linear_lora_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    u: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``y = x @ weight^T + bias + scaling * u @ lora_B^T`` for 2-D ``x [M, K]``, ``u [M, R]``."""
    M, K = x.shape
    N = weight.shape[0]
    R = u.shape[1]
    check_2d("weight", weight, N, K)
    check_2d("u", u, M, R)
    check_2d("lora_B", lora_B, N, R)
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    check_same(x, weight=weight, bias=bias, u=u, lora_B=lora_B)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _linear_lora_fwd_kernel[grid](
        x,
        weight,
        bias if bias is not None else x,
        u,
        lora_B,
        y,
        M,
        N,
        K,
        R,
        triton.next_power_of_2(M),
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        u.stride(0),
        u.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        y.stride(0),
        y.stride(1),
        float(scaling),
        HAS_BIAS=bias is not None,
        DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_R=rank_block(R),
    )
    return y
