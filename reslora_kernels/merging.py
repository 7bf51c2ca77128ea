"""Turning a trained chain into plain linear weights (DESIGN.md section 3).

Every method reduces a block to one term ``W_n + coef * B' A'``:

* ``exact`` (none, bs): ``coef = s`` with ``B' = [B_n, B_{n-1}, ...]``, ``A' = [A_n; A_{n-1}; ...]``
  over the blocks the block sums over (just ``B_n``, ``A_n`` for none);
* ``input_norm`` (is, ms) and ``weight_norm`` (is): ``coef = s * (1 + a_n)`` with ``B_n``, ``A_n``;
* ``lstsq`` (is, ms): ``coef = s`` with ``B_n`` and ``A_n + P_n``, ``P_n`` the ridge least-squares
  map from the block's input to its shortcut term, fitted on calibration data.

The coefficients ``a_n`` follow the authors' code: a ratio with a zero statistic counts as 1.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from .chain import ResLoRAChain
    from .layer import FusedResLoRALinear

__all__ = [
    "MERGE_METHODS",
    "METHOD_MODES",
    "MergeTerm",
    "resolve_method",
    "chain_merge_terms",
    "LstsqStatistics",
    "calibrate_lstsq",
    "run_batch",
]

MERGE_METHODS = ("auto", "exact", "input_norm", "weight_norm", "lstsq")
#: Which modes each merge method applies to.
METHOD_MODES = {
    "exact": ("none", "bs"),
    "input_norm": ("is", "ms"),
    "weight_norm": ("is",),
    "lstsq": ("is", "ms"),
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


class LstsqStatistics:
    """Streaming sums of one block for the lstsq merge, in float32 (float64 for a float64 model) on
    the block's device:
    ``gram = sum_t x_t x_t^T`` ``[in, in]`` and ``cross = sum_t S_t x_t^T`` ``[r, in]``, where ``S_t``
    is the block's shortcut term in rank space (``A_n x_{n-1}`` for is, ``sum_k z_{n-k}`` for ms)."""

    def __init__(self, block: "FusedResLoRALinear") -> None:
        factory = {"device": block.weight.device, "dtype": torch.promote_types(block.weight.dtype, torch.float32)}
        self.gram = torch.zeros((block.in_features, block.in_features), **factory)
        self.cross = torch.zeros((block.rank, block.in_features), **factory)
        self.tokens = 0

    def observe(self, x: torch.Tensor, target: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).to(self.gram.dtype)
        t2 = target.reshape(-1, target.shape[-1]).to(self.gram.dtype)
        self.gram.addmm_(x2.t(), x2)
        self.cross.addmm_(t2.t(), x2)
        self.tokens += x2.shape[0]

    def solve(self, ridge: float) -> torch.Tensor:
        """``P = cross (gram + lam I)^-1`` in float64 with ``lam = ridge * trace(gram) / in``, the
        ridge relative to the mean eigenvalue so that it does not depend on the inputs' scale."""
        gram = self.gram.double()
        lam = ridge * float(gram.diagonal().mean())
        if lam <= 0.0:
            lam = ridge
        gram.diagonal().add_(lam)
        # gram is symmetric positive definite once lam > 0: P^T = gram^-1 cross^T by Cholesky.
        factor = torch.linalg.cholesky(gram)
        return torch.cholesky_solve(self.cross.double().t(), factor).t()


def run_batch(model: nn.Module, batch) -> object:
    """Run ``model`` on one batch: a tensor as ``model(t)``, a mapping as ``model(**d)``."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(f"a batch must be a tensor or a dict of model inputs, got {type(batch).__name__}")


@torch.no_grad()
def calibrate_lstsq(
    model: nn.Module, blocks: list["FusedResLoRALinear"], batches: Iterable
) -> dict[int, LstsqStatistics]:
    """One streaming pass of ``batches`` through ``model`` (eval mode, no grad) that accumulates
    :class:`LstsqStatistics` for every block of ``blocks`` with a shortcut term (is/ms blocks
    after the first of their chain). Keyed by ``id(block)``; no activation is kept."""
    if batches is None:
        raise ValueError("method 'lstsq' needs calibration=<an iterable of model inputs>")
    stats = {}
    for block in blocks:
        if block.mode in METHOD_MODES["lstsq"] and block.chain_index > 0:
            stats[id(block)] = block._lstsq_stats = LstsqStatistics(block)
    was_training = model.training
    model.eval()
    count = 0
    try:
        for batch in batches:
            run_batch(model, batch)
            count += 1
    finally:
        for block in blocks:
            block._lstsq_stats = None
        model.train(was_training)
    if count == 0:
        raise ValueError("calibration is empty: lstsq needs at least one batch of model inputs")
    return stats


@torch.no_grad()
def chain_merge_terms(
    chain: "ResLoRAChain", method: str, lstsq: dict[int, LstsqStatistics] | None = None, ridge: float = 1e-3
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
            lora_B = torch.cat([b.lora_B.detach().to(block.weight.device) for b in span], dim=1)
            lora_A = torch.cat([b.lora_A.detach().to(block.weight.device) for b in span], dim=0)
            terms.append(MergeTerm(block.scaling, lora_B, lora_A))
        return terms
    coefficients = input_norm_coefficients(chain) if method == "input_norm" else weight_norm_coefficients(chain)
    return [
        MergeTerm(block.scaling * (1.0 + a), block.lora_B.detach(), block.lora_A.detach())
        for block, a in zip(blocks, coefficients)
    ]
