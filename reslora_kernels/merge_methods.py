"""The merge methods (docs/design.md section 8): what each block's merged weight is.

Every method reduces a block to one term ``W_n + coef * B' A'``:

* ``exact`` (none, bs): ``coef = s`` with ``B' = [B_n, B_{n-1}, ...]``, ``A' = [A_n; A_{n-1}; ...]``
  over the blocks the block sums over (just ``B_n``, ``A_n`` for none);
* ``input_norm`` (is, ms) and ``weight_norm`` (is): ``coef = s * (1 + a_n)`` with ``B_n``, ``A_n``;
* ``lstsq`` (is, ms): ``coef = s`` with ``B_n`` and ``A_n + P_n``, ``P_n`` the ridge least-squares
  map from the block's input to its shortcut term, fitted on calibration data
  (:mod:`reslora_kernels.lstsq`).

The coefficients ``a_n`` follow the authors' code: a ratio with a zero statistic counts as 1.
Nothing here changes a model; :mod:`reslora_kernels.merging` applies the terms.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from .chain import ResLoRAChain
from .layer import FusedResLoRALinear
from .lstsq import LSTSQ_MODES, LstsqStatistics, calibrate_lstsq
from .model_utils import reslora_blocks
from .statistics import skipped_norms

__all__ = ["MERGE_METHODS"]

MERGE_METHODS = ("auto", "exact", "input_norm", "weight_norm", "lstsq")
#: Which modes each merge method applies to.
METHOD_MODES = {
    "exact": ("none", "bs"),
    "input_norm": ("is", "ms"),
    "weight_norm": ("is",),
    "lstsq": LSTSQ_MODES,
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


def input_norm_coefficients(chain: ResLoRAChain) -> list[float]:
    """``a_n`` of the input-norm merge: is ``mu_{n-1} / mu_n`` (``a_0 = 1``); ms
    ``sum_{k=1..min(m,n)} nu_{n-k} / nu_n`` (``a_0 = 0``)."""
    stats = [block.statistics.mean_norm() for block in chain]
    for name, stat in zip(chain.block_names, stats):
        if not math.isfinite(stat):
            raise ValueError(
                f"the norm statistics of {name} (chain {chain.name!r}) hold Inf/NaN, which no training forward "
                "records: they were set by hand or loaded from a damaged file. Reset them "
                "(block.statistics.reset()) or use another merge method"
            )
    skipped = skipped_norms(list(zip(chain.block_names, chain)))
    if skipped:
        warnings.warn(
            f"input_norm merge of chain {chain.name!r}: training forwards with Inf/NaN norms were left out of the "
            f"statistics ({', '.join(f'{name}: {n}' for name, n in skipped.items())})",
            stacklevel=3,
        )
    empty = [name for name, block in zip(chain.block_names, chain) if int(block.statistics.norm_count) == 0]
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
def weight_norm_coefficients(chain: ResLoRAChain) -> list[float]:
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
def chain_merge_terms(
    chain: ResLoRAChain, method: str, lstsq: dict[int, LstsqStatistics] | None = None, ridge: float = 1e-3
) -> list[MergeTerm]:
    """One :class:`MergeTerm` per block of ``chain``, computed from the unmerged weights.
    ``lstsq`` holds the calibration statistics the lstsq method needs."""
    method = resolve_method(method, chain.mode)
    blocks = list(chain)
    if method == "lstsq":
        if lstsq is None:
            raise ValueError("method 'lstsq' needs calibration statistics")
        terms = []
        for n, block in enumerate(blocks):
            A = block.lora_A.detach()
            if n == 0:
                # Exact anyway: the first is block's shortcut is its own input (P = A), the first
                # ms block has none (P = 0).
                A_merged = 2 * A if chain.mode == "is" else A
            else:
                P = lstsq[id(block)].solve(ridge)
                A_merged = (A.double() + P).to(A.dtype)
            terms.append(MergeTerm(block.scaling, block.lora_B.detach(), A_merged))
        return terms
    if method == "exact":
        terms = []
        for n, block in enumerate(blocks):
            span = [blocks[j] for j in chain.span(n)] if chain.mode == "bs" else [block]
            lora_B = torch.cat([b.lora_B.detach().to(block.lora_B.device) for b in span], dim=1)
            lora_A = torch.cat([b.lora_A.detach().to(block.lora_A.device) for b in span], dim=0)
            terms.append(MergeTerm(block.scaling, lora_B, lora_A))
        return terms
    coefficients = input_norm_coefficients(chain) if method == "input_norm" else weight_norm_coefficients(chain)
    return [
        MergeTerm(block.scaling * (1.0 + a), block.lora_B.detach(), block.lora_A.detach())
        for block, a in zip(blocks, coefficients)
    ]


def chains_of(blocks: list[tuple[str, FusedResLoRALinear]]) -> list[ResLoRAChain]:
    """The chains of ``blocks``, each once, in the order of their first block."""
    chains: dict[int, ResLoRAChain] = {}
    for _, layer in blocks:
        chains.setdefault(id(layer.chain), layer.chain)
    return list(chains.values())


def merge_terms(
    model: nn.Module, method: str, calibration=None, ridge: float = 1e-3
) -> list[tuple[FusedResLoRALinear, MergeTerm]]:
    """Every block's merge term under ``method``, computed before anything changes."""
    blocks = reslora_blocks(model)
    if not blocks:
        raise ValueError("the model has no ResLoRA layers to merge")
    chains = chains_of(blocks)
    # Every method/mode pair is checked before anything is computed.
    resolved = {resolve_method(method, chain.mode) for chain in chains}
    if "lstsq" in resolved:
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0:
            raise ValueError(f"ridge must be a positive number, got {ridge!r}")
        lstsq = calibrate_lstsq(model, [layer for _, layer in blocks], calibration)
    elif calibration is not None:
        raise ValueError(f"calibration is only used by method 'lstsq', not {method!r}")
    else:
        lstsq = None
    in_model = {id(layer) for _, layer in blocks}
    terms = []
    for chain in chains:
        for block, term in zip(chain, chain_merge_terms(chain, method, lstsq, ridge)):
            if id(block) in in_model:
                terms.append((block, term))
    return terms
