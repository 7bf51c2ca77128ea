"""Dequantization of a row-wise absmax int8 weight (LLM.int8, bitsandbytes ``Linear8bitLt``) into an
``[N, K]`` float tensor: ``W[n, k] = (q[n, k] * row_absmax[n]) * (1/127)``.

``q`` is the int8 weight (bitsandbytes' ``CB``), ``row_absmax`` the float32 absolute maximum of each
row (``SCB``). The two products are float32 and rounded in that order, with ``1/127`` rounded to
float32 first, as bitsandbytes' ``int8_vectorwise_dequant`` computes them; then one rounding to
the output's dtype. One pass: one byte read and one element written per element, where torch's
version makes two float32 ``[N, K]`` temporaries before the cast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dtypes import KERNEL_DTYPES
from ._common import cdiv
from ._configs import DEQUANT, tile_configs
from ._jit import rounded_for, tile_ptrs
from ._target import autotune, launch

KEY = ["N", "K"]
#: 1/127 rounded to float32: the factor bitsandbytes multiplies by (a float32 product, not a division).
INT8_STEP = tl.constexpr(7.874015718698502e-3)


@triton.jit
def _dequant_int8_kernel(
    q_ptr,
    scale_ptr,
    out_ptr,
    N,
    K,
    stride_qn,
    stride_qk,
    stride_on,
    stride_ok,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One [BLOCK_N, BLOCK_K] tile of out [N, K]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = offs_n < N
    mask = row_ok[:, None] & (offs_k < K)[None, :]
    q = tl.load(tile_ptrs(q_ptr, offs_n, offs_k, stride_qn, stride_qk), mask=mask, other=0).to(tl.float32)
    row_absmax = tl.load(scale_ptr + offs_n, mask=row_ok, other=0.0)
    values = (q * row_absmax[:, None]) * INT8_STEP
    tl.store(tile_ptrs(out_ptr, offs_n, offs_k, stride_on, stride_ok), rounded_for(values, out_ptr), mask=mask)


_dequant_int8_kernel = autotune(tile_configs(DEQUANT, ("BLOCK_N", "BLOCK_K")), KEY)(_dequant_int8_kernel)


def dequant_int8(weight_int8: torch.Tensor, row_absmax: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    """``out = (weight_int8 * row_absmax[:, None]) * float32(1/127)`` for ``weight_int8 [N, K]``
    (int8, any strides) and ``row_absmax [N]`` (float32), written into ``out [N, K]`` (float16,
    bfloat16 or float32, any strides) and returned. Same signature as
    :func:`reslora_kernels.reference.dequant_int8`."""
    if out.dim() != 2:
        raise ValueError(f"out must be 2-D [N, K], got {tuple(out.shape)}")
    if out.dtype not in KERNEL_DTYPES:
        raise TypeError(f"out must be float16, bfloat16 or float32, got {out.dtype}")
    N, K = out.shape
    if weight_int8.dtype != torch.int8 or weight_int8.shape != (N, K) or weight_int8.device != out.device:
        raise ValueError(
            f"weight_int8 must be int8 [{N}, {K}] on {out.device}, got {weight_int8.dtype} "
            f"{tuple(weight_int8.shape)} on {weight_int8.device}"
        )
    if row_absmax.dtype != torch.float32 or row_absmax.shape != (N,) or row_absmax.device != out.device:
        raise ValueError(
            f"row_absmax must be float32 [{N}] on {out.device}, got {row_absmax.dtype} {tuple(row_absmax.shape)} "
            f"on {row_absmax.device}"
        )
    if out.numel() == 0:
        return out
    launch(
        _dequant_int8_kernel,
        lambda meta: (cdiv(N, meta["BLOCK_N"]), cdiv(K, meta["BLOCK_K"])),
        q_ptr=weight_int8,
        scale_ptr=row_absmax,
        out_ptr=out,
        N=N,
        K=K,
        stride_qn=weight_int8.stride(0),
        stride_qk=weight_int8.stride(1),
        stride_on=out.stride(0),
        stride_ok=out.stride(1),
    )
    return out
