"""The dropout mask, defined once (docs/design.md section 4): the hash's constants and its torch
implementation, which the reference and the composed path use and the Triton kernels
(``ops/dropout_kernel.py``) port bit for bit with these constants.

A mask is a pure function of (seed, row, column): one seed names one mask on every backend and
device, and backward regenerates the mask instead of storing it. The hash is lowbias32
(C. Wellons, "Hash function prospector"): two multiply-xorshift rounds with full avalanche.
Arithmetic is uint32 held in int32 tensors: multiplication wraps modulo 2^32 on every torch
backend (checked by the tests), and ``>>`` is made logical by masking the sign-extended bits.
"""

from __future__ import annotations

import torch

__all__ = ["MIX_MUL_1", "MIX_MUL_2", "COLUMN_SALT", "dropout_threshold", "mix32", "dropout_keep_mask", "keep_values_cpu"]

MIX_MUL_1 = 0x7FEB352D
MIX_MUL_2 = 0x846CA68B
#: XORed into the seed for the column key, so that row and column keys differ when m == k.
COLUMN_SALT = 0x9E3779B9
#: XORing the sign bit maps uint32 order onto int32 order: (h >>> 1) >= t  <=>  h ^ INT_MIN >= 2t - 2^31.
_SIGN_BIT = -(2**31)


def dropout_threshold(p: float) -> int:
    """The 31-bit threshold of drop probability ``p``: an element is kept when its 31-bit draw is
    at least this (``floor(p 2^31)``, at most ``2^31 - 1``)."""
    return min(int(p * 2**31), 2**31 - 1)


def _int32(value: int) -> int:
    """The int32 with the same 32 bits as the uint32 ``value``."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of uint32 values held in an int32 tensor."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of the uint32 values held in the int32 tensor ``x`` (a new tensor)."""
    if torch.compiler.is_compiling():
        # Functional form: Inductor fuses it into one kernel anyway.
        x = x ^ _shr(x, 16)
        x = x * _int32(MIX_MUL_1)
        x = x ^ _shr(x, 15)
        x = x * _int32(MIX_MUL_2)
        return x ^ _shr(x, 16)
    # Eager: in place on one scratch buffer. Each fresh [M, K] temporary costs page faults that
    # dominate these cheap integer ops (3x slower out of place on CPU).
    x = x.clone()
    scratch = torch.empty_like(x)
    for bits, factor in ((16, MIX_MUL_1), (15, MIX_MUL_2), (16, None)):
        torch.bitwise_right_shift(x, bits, out=scratch)
        x.bitwise_xor_(scratch.bitwise_and_((1 << (32 - bits)) - 1))
        if factor is not None:
            x.mul_(_int32(factor))
    return x


def _keys(rows: int, cols: int, seed: int | torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_key [rows], col_key [cols])``: ``mix(m ^ mix(seed))`` and ``mix(k ^ mix(seed ^ salt))``."""
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor(int(seed), dtype=torch.int64)
    seed = seed.to(device=device, dtype=torch.int32)
    row_key = mix32(torch.arange(rows, device=device, dtype=torch.int32) ^ mix32(seed))
    col_key = mix32(torch.arange(cols, device=device, dtype=torch.int32) ^ mix32(seed ^ _int32(COLUMN_SALT)))
    return row_key, col_key


def dropout_keep_mask(
    shape: torch.Size | tuple[int, ...], p: float, seed: int | torch.Tensor, device: torch.device | str
) -> torch.Tensor:
    """Boolean keep-mask of a LoRA input of ``shape`` (leading dims flattened to rows ``m``,
    the last dim is the column ``k``): ``True`` with probability ``1 - p``::

        s        = mix(seed)
        row_key  = mix(m ^ s)
        col_key  = mix(k ^ mix(seed ^ 0x9E3779B9))
        keep     = (mix(row_key ^ col_key) >> 1) >= floor(p * 2^31)

    ``mix`` is lowbias32 on uint32; ``seed`` is an int or a 0-d integer tensor in [0, 2^31)
    (a device tensor: drawing and using it never reads the device from the host). Every backend
    draws exactly this mask, so the same seed gives the same mask on every backend and device.
    """
    shape = tuple(shape)
    cols = shape[-1] if shape else 1
    rows = 1
    for d in shape[:-1]:
        rows *= d
    row_key, col_key = _keys(rows, cols, seed, device)
    draw = _shr(mix32(row_key[:, None] ^ col_key[None, :]), 1)
    return (draw >= dropout_threshold(p)).reshape(shape)


def keep_values_cpu(
    rows: int, cols: int, p: float, seed: int | torch.Tensor, dtype: torch.dtype, block_bytes: int
) -> torch.Tensor:
    """:func:`dropout_keep_mask` of a ``[rows, cols]`` CPU input as 0/1 in ``dtype``, hashed in blocks
    of rows of about ``block_bytes`` int32 bytes, so that the hash's ~15 passes stay in cache."""
    keep = torch.empty((rows, cols), dtype=dtype)
    if keep.numel() == 0:
        return keep
    row_key, col_key = _keys(rows, cols, seed, "cpu")
    threshold = 2 * dropout_threshold(p) + _SIGN_BIT
    step = max(1, block_bytes // (4 * cols))
    block = torch.empty((min(step, rows), cols), dtype=torch.int32)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        torch.bitwise_xor(row_key[start : start + n, None], col_key[None, :], out=block[:n])
        draw = mix32(block[:n]).bitwise_xor_(_SIGN_BIT).ge_(threshold)  # 0/1 in int32
        keep[start : start + n].copy_(draw)
    return keep
