"""Pure-PyTorch ResLoRA ops: the oracle every fused kernel is tested against, and the CPU path.

Each function here has the same signature as its fast counterpart (``reslora_kernels.ops`` and
``reslora_kernels.fused``) and reads as the formula of docs/design.md section 2. Gradients come
from PyTorch's autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dropout_keep_mask", "squared_norm", "reslora_linear", "fold_lora_", "dequant_4bit", "dequant_int8"]


def squared_norm(t: torch.Tensor) -> torch.Tensor:
    """``||t||_F^2`` as a float32 scalar, accumulated in at least float32, without autograd."""
    acc = torch.promote_types(t.dtype, torch.float32)
    return torch.linalg.vector_norm(t.detach(), dtype=acc).square().float()


# Dropout masks are a pure function of (seed, row, column), defined here once and implemented
# bit-identically by every backend (the Triton kernels in ops/dropout.py): one seed names one mask
# everywhere, and backward regenerates the mask instead of storing it. The hash is lowbias32
# (C. Wellons, "Hash function prospector"): two multiply-xorshift rounds with full avalanche.
# Arithmetic is uint32 held in int32 tensors: multiplication wraps modulo 2^32 on every torch
# backend (checked by the tests), and ">>" is made logical by masking the sign-extended bits.
MIX_MUL_1 = 0x7FEB352D
MIX_MUL_2 = 0x846CA68B
#: XORed into the seed for the column key, so that row and column keys differ when m == k.
COLUMN_SALT = 0x9E3779B9


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
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor(int(seed), dtype=torch.int64)
    seed = seed.to(device=device, dtype=torch.int32)
    threshold = min(int(p * 2**31), 2**31 - 1)
    row_key = mix32(torch.arange(rows, device=device, dtype=torch.int32) ^ mix32(seed))
    col_key = mix32(torch.arange(cols, device=device, dtype=torch.int32) ^ mix32(seed ^ _int32(COLUMN_SALT)))
    draw = _shr(mix32(row_key[:, None] ^ col_key[None, :]), 1)
    return (draw >= threshold).reshape(shape)


def reslora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    x_prev: torch.Tensor | None = None,
    z_prev: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    compute_x_sqnorm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One ResLoRA block, every mode in one formula::

        z = drop(x [+ x_prev]) A^T                 # [..., r]
        y = x W^T + b + s * (z [+ z_prev]) B^T      # [..., out]

    ``none`` passes neither shortcut; ``is`` passes ``x_prev`` (the previous block's input, or
    ``x`` itself for the first block); ``bs`` passes the concatenated ``A``/``B`` of the block and
    its predecessors; ``ms`` passes ``z_prev``, the sum of the previous blocks' ``z``.

    Returns ``(y, z, x_sqnorm)`` where ``x_sqnorm`` is ``||x||_F^2`` in float32 (for the merge
    statistics) when ``compute_x_sqnorm`` is set, else ``None``.
    """
    lora_in = x if x_prev is None else x + x_prev
    if dropout_p > 0.0:
        if dropout_seed is None:
            raise ValueError("dropout_p > 0 needs a dropout_seed")
        keep = dropout_keep_mask(lora_in.shape, dropout_p, dropout_seed, lora_in.device)
        lora_in = lora_in * keep / (1.0 - dropout_p)
    z = lora_in @ lora_A.t()
    u = z if z_prev is None else z + z_prev
    y = F.linear(x, weight, bias) + scaling * (u @ lora_B.t())
    x_sqnorm = squared_norm(x) if compute_x_sqnorm else None
    return y, z, x_sqnorm


@torch.no_grad()
def fold_lora_(weight: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor, coef: float) -> torch.Tensor:
    """In place ``W += coef * B A`` with the product accumulated in (at least) float32; ``W``
    keeps its dtype.

    ``lora_B`` is ``[out, r]`` and ``lora_A`` is ``[r, in]``; block-shortcut merges pass the
    concatenated ranks of several blocks in one call.
    """
    acc = torch.promote_types(weight.dtype, torch.float32)
    update = torch.addmm(weight.to(acc), lora_B.to(acc), lora_A.to(acc), alpha=coef)
    return weight.copy_(update)


@torch.no_grad()
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
    """A 4-bit blockwise-quantized weight (bitsandbytes' NF4 / FP4 layout) decoded into ``out [N, K]``::

        W[n, k] = code[q_e] * scale_{e // blocksize},   e = n K + k
        q_e     = high nibble of packed[e // 2] for even e, low nibble for odd e
        scale_b = absmax[b], or nested_code[absmax[b]] * nested_absmax[b // nested_blocksize] + nested_offset

    in float32, rounded once to ``out``'s dtype. The oracle of :func:`reslora_kernels.ops.dequant_4bit`.
    """
    N, K = out.shape
    element = torch.arange(N * K, device=out.device)
    byte = packed.reshape(-1)[element // 2].to(torch.int64)
    q = torch.where(element % 2 == 0, byte >> 4, byte & 15)
    if nested_absmax is not None:
        blocks = torch.arange(absmax.numel(), device=out.device)
        scale = nested_code[absmax.to(torch.int64)] * nested_absmax[blocks // nested_blocksize]
        scale = scale + nested_offset
    else:
        scale = absmax
    return out.copy_((code[q] * scale[element // blocksize]).view(N, K))


@torch.no_grad()
def dequant_int8(weight_int8: torch.Tensor, row_absmax: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
    """A row-wise absmax int8 weight (LLM.int8) decoded into ``out``:
    ``W = (q * row_absmax[:, None]) * float32(1/127)``, float32 products rounded in that order
    (bitsandbytes' ``int8_vectorwise_dequant``), then once to ``out``'s dtype. The oracle of
    :func:`reslora_kernels.ops.dequant_int8`."""
    return out.copy_(weight_int8 * row_absmax.view(-1, 1) * 7.874015718698502e-3)
