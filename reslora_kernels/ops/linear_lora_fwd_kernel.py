"""The fused linear forward: ``y = x W^T + b + s * u B^T`` in one GEMM.

The LoRA-up term rides in the same accumulator: the rank-space tile ``s * u`` times ``B^T`` is
added with ``tl.dot`` after the K loop, so ``y`` is written once and no ``[M, N]`` temporary of the
LoRA branch exists (PEFT writes one, scales it and adds it: three extra passes over ``[M, N]``).
``u`` is ``z`` (none, is), the concatenated-rank ``z`` (bs) or ``z + z_prev`` (ms).

Two kernels compute it. On Hopper (sm_90), with 16-byte aligned operands, a persistent kernel
loads ``x`` and ``W`` through tensor descriptors (TMA: the copy engine fills shared memory while
the warpgroups run wgmma) and stores ``y`` the same way; one program per SM walks the tiles in
grouped order. Elsewhere (sm_80, unaligned shapes, the interpreter) a one-tile-per-program
kernel with pointer loads runs.
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
    descriptor_template,
    dot_precision,
    fresh_descriptor,
    next_power_of_2,
    rank_block,
    rank_bucket,
    tensor_key,
)
from ._configs import GEMM, GEMM_TMA, GEMM_UNALIGNED, gemm_configs
from ._jit import grouped_tile, lora_up_tile, tile_ptrs
from ._target import autotune, launch, target_of, uses_tma

# Everything that changes the build (and so what fits) is in the key; shapes by bucket.
KEY = ["M_BUCKET", "N", "K", "R_BUCKET", "BLOCK_R", "ONE_RANK_TILE", "HAS_BIAS", "DOT_PRECISION"]


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
    R_BUCKET,
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
    ONE_RANK_TILE: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y: the K loop of x W^T, then the rank loop of s u B^T."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            tile_ptrs(x_ptr, offs_m, offs_k, stride_xm, stride_xk),
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        )
        w_t = tl.load(
            tile_ptrs(w_ptr, offs_k, offs_n, stride_wk, stride_wn),
            mask=(offs_k[:, None] < K) & (offs_n[None, :] < N),
            other=0.0,
        )  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(x, w_t, acc, input_precision=DOT_PRECISION)
    acc = lora_up_tile(
        acc, u_ptr, b_ptr, offs_m, offs_n, M, N, R, stride_um, stride_ur, stride_bn, stride_br, scaling,
        DOT_PRECISION=DOT_PRECISION, BLOCK_R=BLOCK_R, ONE_RANK_TILE=ONE_RANK_TILE,
    )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        tile_ptrs(y_ptr, offs_m, offs_n, stride_ym, stride_yn),
        acc.to(y_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


@triton.jit
def _linear_lora_fwd_tma_kernel(
    x_desc,
    w_desc,
    y_desc,
    bias_ptr,
    u_ptr,
    b_ptr,
    M,
    N,
    K,
    R,
    M_BUCKET,
    R_BUCKET,
    stride_um,
    stride_ur,
    stride_bn,
    stride_br,
    scaling,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ONE_RANK_TILE: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
):
    """Persistent: program p computes tiles p, p + NUM_SMS, ... of y in grouped order. Tensor
    descriptors bound every load and store, so edge tiles need no masks (TMA zero-fills reads past
    the end and drops writes past it)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # flatten: the compiler pipelines the K loops of consecutive tiles as one loop, so the next
    # tile's first loads are in flight during this tile's epilogue. It flattens only a body with
    # one inner loop: with ONE_RANK_TILE (r <= 64) the epilogue has no rank loop; larger ranks
    # keep it, and the loop nest stays as written.
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
        pid_m, pid_n = grouped_tile(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([off_m, k0])
            w = w_desc.load([off_n, k0])  # [BLOCK_N, BLOCK_K], K-major: what wgmma reads as B^T
            acc = tl.dot(x, w.T, acc, input_precision=DOT_PRECISION)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        acc = lora_up_tile(
            acc, u_ptr, b_ptr, offs_m, offs_n, M, N, R, stride_um, stride_ur, stride_bn, stride_br, scaling,
            DOT_PRECISION=DOT_PRECISION, BLOCK_R=BLOCK_R, ONE_RANK_TILE=ONE_RANK_TILE,
        )  # fmt: skip
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


def _set_tma_blocks(nargs: dict) -> None:
    """Autotuning pre-hook: the descriptors' block shapes follow the config being run."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk]
    nargs["y_desc"].block_shape = [bm, bn]


_fwd_jit = _linear_lora_fwd_kernel
_linear_lora_fwd_kernel = autotune(gemm_configs(GEMM, "BLOCK_N", "BLOCK_K"), KEY)(_fwd_jit)
_linear_lora_fwd_unaligned_kernel = autotune(gemm_configs(GEMM_UNALIGNED, "BLOCK_N", "BLOCK_K"), KEY)(_fwd_jit)
_linear_lora_fwd_tma_kernel = autotune(
    gemm_configs(GEMM_TMA, "BLOCK_N", "BLOCK_K", pre_hook=_set_tma_blocks), KEY + ["NUM_SMS"]
)(_linear_lora_fwd_tma_kernel)


class _Plan:
    """What every ``linear_lora_fwd`` call of one key launches: the kernel, its grid, the keyword
    arguments that are the same for each such call, and (TMA) the descriptors' static parts."""

    __slots__ = ("kernel", "grid", "static", "tma", "x_desc", "w_desc", "y_desc", "copy_bias")


_PLANS = PlanCache()


def _plan(x, weight, bias, u, lora_B, y, target) -> _Plan:
    M, K = x.shape
    N = weight.shape[0]
    R = u.shape[1]
    check_2d("weight", weight, N, K)
    check_2d("u", u, M, R)
    check_2d("lora_B", lora_B, N, R)
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    check_same(x, weight=weight, bias=bias, u=u, lora_B=lora_B)
    plan = _Plan()
    plan.kernel = None  # nothing to launch: no rows or no output columns
    if M == 0 or N == 0:
        return plan
    plan.copy_bias = bias is not None and bias.stride(0) != 1  # the kernel reads bias[n] at bias_ptr + n
    plan.static = dict(
        M=M,
        N=N,
        K=K,
        R=R,
        M_BUCKET=next_power_of_2(M),
        R_BUCKET=rank_bucket(R),
        stride_um=u.stride(0),
        stride_ur=u.stride(1),
        stride_bn=lora_B.stride(0),
        stride_br=lora_B.stride(1),
        HAS_BIAS=bias is not None,
        DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_R=rank_block(R),
        ONE_RANK_TILE=R <= rank_block(R),
    )
    is_aligned = aligned(x, weight, y)
    # Tensor descriptors describe no empty dimension: K = 0 (y = bias + s u B^T) takes the pointers.
    plan.tma = uses_tma(target) and is_aligned and K > 0
    if plan.tma:
        sms = target.sm_count
        plan.kernel = _linear_lora_fwd_tma_kernel
        plan.grid = lambda meta: (min(sms, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)
        plan.static["NUM_SMS"] = sms
        plan.x_desc = descriptor_template(x)
        plan.w_desc = descriptor_template(weight)
        plan.y_desc = descriptor_template(y)
        return plan
    plan.kernel = _linear_lora_fwd_kernel if is_aligned else _linear_lora_fwd_unaligned_kernel
    plan.grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    # The one-tile-per-program kernel keeps its rank loop: it has no tile loop to flatten, and
    # without the loop ptxas (Triton 3.6) spills in some of its configs (compile matrix).
    plan.static["ONE_RANK_TILE"] = False
    plan.static.update(
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_wn=weight.stride(0),
        stride_wk=weight.stride(1),
        stride_ym=y.stride(0),
        stride_yn=y.stride(1),
    )
    return plan


def linear_lora_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    u: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``y = x @ weight^T + bias + scaling * u @ lora_B^T`` for 2-D ``x [M, K]``, ``u [M, R]``."""
    y = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    target = target_of(x.device)
    key = (
        tensor_key(x),
        tensor_key(weight),
        None if bias is None else tensor_key(bias),
        tensor_key(u),
        tensor_key(lora_B),
        y.data_ptr() % 16,
        target,
        allow_tf32(),
    )
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS.put(key, _plan(x, weight, bias, u, lora_B, y, target))
    if plan.kernel is None:
        return y
    kwargs = plan.static.copy()
    if bias is None:
        bias = x  # a placeholder pointer, never read
    elif plan.copy_bias:
        bias = bias.contiguous()
    kwargs.update(bias_ptr=bias, u_ptr=u, b_ptr=lora_B, scaling=float(scaling))
    if plan.tma:
        kwargs.update(
            x_desc=fresh_descriptor(plan.x_desc, x),
            w_desc=fresh_descriptor(plan.w_desc, weight),
            y_desc=fresh_descriptor(plan.y_desc, y),
        )
    else:
        kwargs.update(x_ptr=x, w_ptr=weight, y_ptr=y)
    launch(plan.kernel, plan.grid, **kwargs)
    return y
