"""Pure-PyTorch ResLoRA ops: the oracle every fused kernel is tested against, and the CPU path.

Each function here has the same signature as its fast counterpart (``reslora_kernels.ops`` and
``reslora_kernels.fused``) and reads as the formula of docs/design.md section 2. Gradients come
from PyTorch's autograd. The dropout mask is :func:`reslora_kernels.dropout_mask.dropout_keep_mask`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dropout_mask import dropout_keep_mask

__all__ = ["squared_norm", "reslora_linear", "fold_lora_", "dequant_4bit", "dequant_int8"]


def squared_norm(t: torch.Tensor) -> torch.Tensor:
    """``||t||_F^2`` as a float32 scalar, accumulated in at least float32, without autograd."""
    acc = torch.promote_types(t.dtype, torch.float32)
    return torch.linalg.vector_norm(t.detach(), dtype=acc).square().float()


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
