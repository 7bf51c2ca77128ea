"""Dropout masks regenerated wherever they are needed and never stored: the Triton port of
:func:`reslora_kernels.dropout_mask.dropout_keep_mask`, bit for bit, with its constants.

Element ``(m, k)`` of the ``[M, K]`` LoRA input (``m`` the flattened row) is kept when::

    row_key = mix(m ^ mix(seed))
    col_key = mix(k ^ mix(seed ^ 0x9E3779B9))
    keep    = (mix(row_key ^ col_key) >> 1) >= threshold,   threshold = min(floor(p 2^31), 2^31 - 1)

with ``mix`` the lowbias32 hash on uint32. A tile computes ``BLOCK_M`` row keys and ``BLOCK_K``
column keys, then one ``mix`` per element. Every kernel that touches the LoRA input
(down-projection, input gradient, ``dA``) evaluates the same :func:`keep_mask` on its tile, so
forward and backward agree without a stored mask.

The seed is a 0-d int64 tensor on the input's device that the kernels load themselves: the host
never reads it (no synchronisation, nothing for ``torch.compile`` to guard on), and a new seed per
step never recompiles a kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dropout_mask import COLUMN_SALT, MIX_MUL_1, MIX_MUL_2, dropout_threshold
from ._common import cdiv
from ._target import launch

# The hash constants as uint32 constexprs: a bare Python literal above 2^31 - 1 would be typed
# differently from one below it, and the products must wrap modulo 2^32 as uint32.
_MUL_1 = tl.constexpr(MIX_MUL_1)
_MUL_2 = tl.constexpr(MIX_MUL_2)
_SALT = tl.constexpr(COLUMN_SALT)


@triton.jit
def mix32(x):
    """lowbias32 of uint32 values (multiplication wraps modulo 2^32, ``>>`` is logical)."""
    x ^= x >> 16
    x *= tl.full((), _MUL_1, tl.uint32)
    x ^= x >> 15
    x *= tl.full((), _MUL_2, tl.uint32)
    x ^= x >> 16
    return x


@triton.jit
def keep_mask(seed, offs_m, offs_k, threshold):
    """Boolean ``[BLOCK_M, BLOCK_K]`` keep-mask of the tile at rows ``offs_m``, columns ``offs_k``;
    ``seed`` is the loaded int64 seed, ``threshold`` from :func:`dropout_threshold`."""
    seed32 = seed.to(tl.uint32)
    row_key = mix32(offs_m.to(tl.uint32) ^ mix32(seed32))
    col_key = mix32(offs_k.to(tl.uint32) ^ mix32(seed32 ^ tl.full((), _SALT, tl.uint32)))
    draw = mix32(row_key[:, None] ^ col_key[None, :]) >> 1
    # draw < 2^31 after the shift: the signed comparison is exact.
    return draw.to(tl.int32) >= threshold


@triton.jit
def _dropout_mask_kernel(out_ptr, seed_ptr, M, K, stride_om, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The keep-mask of the ``[M, K]`` LoRA input as 0/1 in ``out_ptr``'s dtype (int8 for a
    boolean mask, the input's float dtype for the composed path's multiplier)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask(tl.load(seed_ptr), offs_m, offs_k, threshold)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_k[None, :]
    # Through float32: the interpreter converts booleans to bfloat16 as raw bits (0x0001).
    tl.store(out, tl.where(keep, 1.0, 0.0).to(out_ptr.dtype.element_ty), mask=mask)


def seed_tensor(seed: int | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``seed`` as the 0-d int64 tensor on ``device`` the kernels load (a tensor already there is
    returned as is; nothing is read back to the host)."""
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            got = f"{seed.dtype} {tuple(seed.shape)}"
            raise TypeError(f"dropout_seed must be an int or a 0-d integer tensor, got {got}")
        # non_blocking: a seed drawn on the host must not make the host wait for the device.
        return seed.to(device=device, dtype=torch.int64, non_blocking=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"dropout_seed must be an int or a 0-d integer tensor, got {type(seed).__name__}")
    # torch.full writes the value with a fill kernel (the value travels as a launch argument);
    # torch.tensor(seed, device=...) would copy from pageable host memory and synchronise.
    return torch.full((), seed, dtype=torch.int64, device=device)


def dropout_args(p: float, seed: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """``(seed_ptr, threshold, scale)`` for a launcher: kept elements are multiplied by
    ``scale = 1 / (1 - p)``. Without dropout ``seed_ptr`` is ``like``, a placeholder the kernel
    never reads. Raises before anything launches if ``p`` or the seed is unusable."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    if p == 0.0:
        return like, 0, 1.0
    if seed is None:
        raise ValueError("dropout_p > 0 needs a dropout_seed")
    if not isinstance(seed, torch.Tensor) or seed.dim() != 0 or seed.dtype != torch.int64:
        got = f"{seed.dtype} {tuple(seed.shape)}" if isinstance(seed, torch.Tensor) else type(seed).__name__
        raise TypeError(f"dropout_seed must be a 0-d int64 tensor, got {got}")
    if seed.device != like.device:
        raise ValueError(f"device mismatch: dropout_seed is on {seed.device}, expected {like.device}")
    return seed, dropout_threshold(p), 1.0 / (1.0 - p)


#: The mask kernel's tile: 128 contiguous columns per row keep the stores coalesced.
MASK_BLOCK_M, MASK_BLOCK_K = 32, 128


def _write_mask(out: torch.Tensor, p: float, seed: int | torch.Tensor) -> torch.Tensor:
    """Fill the contiguous 2-D ``out`` with the keep-mask (0/1 in its dtype); one launch."""
    M, K = out.shape
    if out.numel():
        launch(
            _dropout_mask_kernel,
            (cdiv(M, MASK_BLOCK_M), cdiv(K, MASK_BLOCK_K)),
            out_ptr=out,
            seed_ptr=seed_tensor(seed, out.device),
            M=M,
            K=K,
            stride_om=out.stride(0),
            threshold=dropout_threshold(p),
            BLOCK_M=MASK_BLOCK_M,
            BLOCK_K=MASK_BLOCK_K,
        )
    return out


def dropout_keep_mask(
    shape: torch.Size | tuple[int, ...], p: float, seed: int | torch.Tensor, device: torch.device | str
) -> torch.Tensor:
    """The keep-mask the fused kernels apply to a LoRA input of ``shape`` (leading dims
    flattened): same signature and same bits as :func:`reslora_kernels.dropout_mask.dropout_keep_mask`.
    For tests and debugging; the kernels themselves never materialise it."""
    shape = tuple(shape)
    K = shape[-1] if shape else 1
    M = 1
    for d in shape[:-1]:
        M *= d
    out = _write_mask(torch.empty((M, K), dtype=torch.int8, device=device), p, seed)
    return out.view(torch.bool).reshape(shape)  # 0/1 bytes are valid booleans: no copy


def dropout_keep_values(rows: int, cols: int, p: float, seed: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The keep-mask of a ``[rows, cols]`` LoRA input as a 0/1 tensor in ``like``'s dtype and
    device, written by one kernel: the composed path's multiplier on a GPU (one write per element,
    where the torch definition runs about fifteen int32 passes)."""
    return _write_mask(torch.empty((rows, cols), dtype=like.dtype, device=like.device), p, seed)
