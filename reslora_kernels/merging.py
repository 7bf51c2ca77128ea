"""Turning a trained chain into plain linear weights (DESIGN.md section 3).

Every method reduces a block to one term ``W_n + coef * B' A'``:

* ``exact`` (none, bs): ``coef = s`` with ``B' = [B_n, B_{n-1}, ...]``, ``A' = [A_n; A_{n-1}; ...]``
  over the blocks the block sums over (just ``B_n``, ``A_n`` for none);
* ``input_norm`` (is, ms) and ``weight_norm`` (is): ``coef = s * (1 + a_n)`` with ``B_n``, ``A_n``.

The coefficients ``a_n`` follow the authors' code: a ratio with a zero statistic counts as 1.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .chain import ResLoRAChain

__all__ = ["MERGE_METHODS", "METHOD_MODES", "MergeTerm", "resolve_method", "chain_merge_terms"]

MERGE_METHODS = ("auto", "exact", "input_norm", "weight_norm")
#: Which modes each merge method applies to.
METHOD_MODES = {
    "exact": ("none", "bs"),
    "input_norm": ("is", "ms"),
    "weight_norm": ("is",),
}


@dataclass
class MergeTerm:
    """The merged weight of one block is ``weight + coef * lora_B @ lora_A``."""

    coef: float
    lora_B: torch.Tensor  # [out, r']
    lora_A: torch.Tensor  # [r', in]


def resolve_method(method: str, mode: str) -> str:
    """The concrete method ``method`` means for ``mode``; a clear error if it does not apply."""
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(MERGE_METHODS)}")
    if method == "auto":
        return "exact" if mode in METHOD_MODES["exact"] else "input_norm"
    if mode not in METHOD_MODES[method]:
        fits = [m for m, modes in METHOD_MODES.items() if mode in modes]
        raise ValueError(
            f"merge method {method!r} does not apply to mode {mode!r} (it merges modes "
            f"{', '.join(METHOD_MODES[method])}); for {mode!r} use {' or '.join(fits)}"
        )
    return method


def _ratio(numerator: float, denominator: float) -> float:
    # The authors' rule: a zero statistic on either side gives a term of 1.
    return 1.0 if numerator == 0.0 or denominator == 0.0 else numerator / denominator


def input_norm_coefficients(chain: "ResLoRAChain") -> list[float]:
    """``a_n`` of the input-norm merge: is ``mu_{n-1} / mu_n`` (``a_0 = 1``); ms
    ``sum_{k=1..min(m,n)} nu_{n-k} / nu_n`` (``a_0 = 0``)."""
    stats = [block.recorded_norm_mean() for block in chain]
    empty = [name for name, block in zip(chain.block_names, chain) if int(block.norm_count) == 0]
    if empty:
        warnings.warn(
            f"input_norm merge of chain {chain.name!r}: no training forward recorded norm statistics for "
            f"{', '.join(empty)}; their ratio terms fall back to 1",
            stacklevel=3,
        )
    if chain.mode == "is":
        return [1.0] + [_ratio(stats[n - 1], stats[n]) for n in range(1, len(chain))]
    return [sum(_ratio(stats[j], stats[n]) for j in list(chain.span(n))[1:]) for n in range(len(chain))]


@torch.no_grad()
def weight_norm_coefficients(chain: "ResLoRAChain") -> list[float]:
    """``a_n = f_{n-2} / f_{n-1}`` with ``f_j = ||W_j + s B_j A_j||_F``, ``a_n = 1`` for n < 2."""
    norms = [
        float(
            torch.linalg.matrix_norm(
                torch.addmm(b.weight.double(), b.lora_B.double(), b.lora_A.double(), alpha=b.scaling)
            )
        )
        for b in chain
    ]
    return [1.0 if n < 2 else _ratio(norms[n - 2], norms[n - 1]) for n in range(len(chain))]


@torch.no_grad()
def chain_merge_terms(chain: "ResLoRAChain", method: str) -> list[MergeTerm]:
    """One :class:`MergeTerm` per block of ``chain``, computed from the unmerged weights."""
    method = resolve_method(method, chain.mode)
    blocks = list(chain)
    if method == "exact":
        terms = []
        for n, block in enumerate(blocks):
            span = [blocks[j] for j in chain.span(n)] if chain.mode == "bs" else [block]
            lora_B = torch.cat([b.lora_B.detach().to(block.weight.device) for b in span], dim=1)
            lora_A = torch.cat([b.lora_A.detach().to(block.weight.device) for b in span], dim=0)
            terms.append(MergeTerm(block.scaling, lora_B, lora_A))
        return terms
    coefficients = input_norm_coefficients(chain) if method == "input_norm" else weight_norm_coefficients(chain)
    return [
        MergeTerm(block.scaling * (1.0 + a), block.lora_B.detach(), block.lora_A.detach())
        for block, a in zip(blocks, coefficients)
    ]
