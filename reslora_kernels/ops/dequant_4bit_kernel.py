"""Dequantization of a 4-bit blockwise-quantized weight (bitsandbytes' NF4 / FP4 layout) into an
``[N, K]`` float tensor: ``W[n, k] = code[q_e] * scale_b`` with ``e = n K + k`` (row-major), ``b = e //
blocksize``.

The layout (bitsandbytes ``Params4bit``): the codes of the row-major weight are packed two per byte,
element ``2i`` in the high nibble of byte ``i`` and ``2i + 1`` in the low nibble, over the flattened
tensor (so for odd ``K`` a row starts mid-byte). ``code`` is the 16-entry table of the format. One
float32 ``absmax`` scales each block of ``blocksize`` consecutive elements (blocks also run across
rows). With double quantization the absmax values are themselves 8-bit codes:
``scale_b = nested_code[absmax_b] * nested_absmax[b // nested_blocksize] + nested_offset``.

Memory-bound: each element costs half a byte read and one element written (2 bytes in 16-bit),
plus the scales (1/blocksize of a float32, or of a byte when nested) and two table lookups that
stay in L1. Everything is float32 until the single rounding to the output's dtype (to nearest, ties
to even; bfloat16 rounded in integer arithmetic, identical on the GPU and in the interpreter), and
the nested scale's multiply and add are not fused into an FMA (the launch disables fp fusion): the
result is bitsandbytes' own dequantization, bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dtypes import KERNEL_DTYPES
from ._common import cdiv
from ._configs import DEQUANT, tile_configs
from ._jit import rounded_for, tile_offsets, tile_ptrs
from ._target import autotune, launch

KEY = ["N", "K", "BLOCKSIZE", "NESTED", "NESTED_BLOCKSIZE", "EVEN_K"]
#: The block sizes bitsandbytes quantizes with (``quantize_4bit``); powers of two, so the block of
#: an element is a shift of its index.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@triton.jit
def _scales(
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    nested_offset_ptr,
    block,
    mask,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
):
    """The float32 scale of quantization block ``block`` (an int64 tile): its absmax, or the
    absmax decoded from its 8-bit code (double quantization)."""
    if NESTED:
        absmax_code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested_scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        # Two roundings, as bitsandbytes computes them (a multiply, then the offset added).
        scale = tl.load(nested_code_ptr + absmax_code, mask=mask, other=0.0) * nested_scale + tl.load(nested_offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _dequant_4bit_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    nested_offset_ptr,
    out_ptr,
    N,
    K,
    stride_bn,
    stride_on,
    stride_ok,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One [BLOCK_N, BLOCK_K] tile of out [N, K]. ``stride_bn`` = K // 2: the packed bytes of a row
    when K is even (each row then starts on a byte)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = offs_n < N
    if EVEN_K:
        # Contiguous bytes per row (vectorised loads); both nibbles of a byte share a block since
        # the block size is even, so the scale is looked up once per byte.
        offs_b = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        byte_mask = row_ok[:, None] & (offs_b < stride_bn)[None, :]
        byte_index = tile_offsets(offs_n, offs_b, stride_bn, 1)
        packed = tl.load(packed_ptr + byte_index, mask=byte_mask, other=0).to(tl.int32)
        scale = _scales(
            absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
            byte_index // (BLOCKSIZE // 2), byte_mask, NESTED, NESTED_BLOCKSIZE,
        )  # fmt: skip
        high = tl.load(code_ptr + (packed >> 4)) * scale
        low = tl.load(code_ptr + (packed & 15)) * scale
        # join + reshape interleaves (high_0, low_0, high_1, ...): element 2i is the high nibble.
        values = tl.reshape(tl.join(high, low), (BLOCK_N, BLOCK_K))
    else:
        # A row starts mid-byte: each element finds its own byte and nibble.
        mask = row_ok[:, None] & (offs_k < K)[None, :]
        element = tile_offsets(offs_n, offs_k, K, 1)
        packed = tl.load(packed_ptr + (element >> 1), mask=mask, other=0).to(tl.int32)
        q = tl.where((element & 1) == 0, packed >> 4, packed & 15)
        scale = _scales(
            absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
            element // BLOCKSIZE, mask, NESTED, NESTED_BLOCKSIZE,
        )  # fmt: skip
        values = tl.load(code_ptr + q) * scale
    out_mask = row_ok[:, None] & (offs_k < K)[None, :]
    tl.store(tile_ptrs(out_ptr, offs_n, offs_k, stride_on, stride_ok), rounded_for(values, out_ptr), mask=out_mask)


_dequant_4bit_kernel = autotune(tile_configs(DEQUANT, ("BLOCK_N", "BLOCK_K")), KEY)(_dequant_4bit_kernel)


def _check_table(name: str, t: torch.Tensor, size: int, device: torch.device) -> None:
    if t.dtype != torch.float32 or t.dim() != 1 or t.numel() < size or t.device != device:
        raise ValueError(
            f"{name} must be a float32 vector of at least {size} entries on {device}, "
            f"got {t.dtype} {tuple(t.shape)} on {t.device}"
        )


def dequant_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    *,
    out: torch.Tensor,
    blocksize: int,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """``out[n, k] = code[q_e] * scale_{e // blocksize}`` (``e = n K + k``) for ``out [N, K]``
    (float16, bfloat16 or float32, any strides), written in place and returned.

    ``packed``: uint8, the ``ceil(N K / 2)`` packed codes (any shape, contiguous). ``absmax``: one
    float32 per block, or with double quantization (``nested_absmax`` given) one uint8 code per
    block, decoded as ``nested_code[absmax_b] * nested_absmax[b // nested_blocksize] +
    nested_offset`` (``nested_code`` float32 [256], ``nested_offset`` a float32 0-d tensor: read on
    the device, never synchronised). Same signature as :func:`reslora_kernels.reference.dequant_4bit`.
    """
    if out.dim() != 2:
        raise ValueError(f"out must be 2-D [N, K], got {tuple(out.shape)}")
    if out.dtype not in KERNEL_DTYPES:
        raise TypeError(f"out must be float16, bfloat16 or float32, got {out.dtype}")
    N, K = out.shape
    device = out.device
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if packed.dtype != torch.uint8 or not packed.is_contiguous() or packed.device != device:
        raise ValueError(f"packed must be contiguous uint8 on {device}, got {packed.dtype} on {packed.device}")
    if packed.numel() < (N * K + 1) // 2:
        raise ValueError(f"packed holds {packed.numel()} bytes; [{N}, {K}] needs {(N * K + 1) // 2}")
    blocks = cdiv(N * K, blocksize)
    nested = nested_absmax is not None
    if absmax.device != device or absmax.dim() != 1 or absmax.numel() < blocks:
        raise ValueError(
            f"absmax must be a vector of at least {blocks} blocks on {device}, got {tuple(absmax.shape)} on "
            f"{absmax.device}"
        )
    if absmax.dtype != (torch.uint8 if nested else torch.float32):
        raise ValueError(f"absmax must be {'uint8 (double quantization)' if nested else 'float32'}, got {absmax.dtype}")
    _check_table("code", code, 16, device)
    if nested:
        if nested_code is None or nested_offset is None:
            raise ValueError("double quantization needs nested_absmax, nested_code and nested_offset")
        if nested_blocksize <= 0 or nested_blocksize & (nested_blocksize - 1):
            raise ValueError(f"nested_blocksize must be a power of two, got {nested_blocksize}")
        _check_table("nested_absmax", nested_absmax, cdiv(blocks, nested_blocksize), device)
        _check_table("nested_code", nested_code, 256, device)
        if nested_offset.dtype != torch.float32 or nested_offset.numel() != 1 or nested_offset.device != device:
            raise ValueError(f"nested_offset must be one float32 on {device}, got {nested_offset.dtype}")
    if out.numel() == 0:
        return out
    launch(
        _dequant_4bit_kernel,
        lambda meta: (cdiv(N, meta["BLOCK_N"]), cdiv(K, meta["BLOCK_K"])),
        packed_ptr=packed,
        absmax_ptr=absmax,
        code_ptr=code,
        # Placeholders without double quantization: never read.
        nested_absmax_ptr=nested_absmax if nested else code,
        nested_code_ptr=nested_code if nested else code,
        nested_offset_ptr=nested_offset if nested else code,
        out_ptr=out,
        N=N,
        K=K,
        stride_bn=K // 2,
        stride_on=out.stride(0),
        stride_ok=out.stride(1),
        BLOCKSIZE=blocksize,
        NESTED=nested,
        NESTED_BLOCKSIZE=nested_blocksize if nested else 1,
        EVEN_K=K % 2 == 0,
        # The nested scale is a multiply then an add in bitsandbytes; an FMA would round once.
        enable_fp_fusion=False,
    )
    return out
