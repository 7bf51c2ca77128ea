"""Turning a trained chain into plain linear weights (docs/design.md section 8).

Every method reduces a block to one term ``W_n + coef * B' A'``:

* ``exact`` (none, bs): ``coef = s`` with ``B' = [B_n, B_{n-1}, ...]``, ``A' = [A_n; A_{n-1}; ...]``
  over the blocks the block sums over (just ``B_n``, ``A_n`` for none);
* ``input_norm`` (is, ms) and ``weight_norm`` (is): ``coef = s * (1 + a_n)`` with ``B_n``, ``A_n``;
* ``lstsq`` (is, ms): ``coef = s`` with ``B_n`` and ``A_n + P_n``, ``P_n`` the ridge least-squares
  map from the block's input to its shortcut term, fitted on calibration data.

The coefficients ``a_n`` follow the authors' code: a ratio with a zero statistic counts as 1.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from . import functional
from .apply import ModelTransaction, refuse_sharded, reslora_blocks, set_module, unwrap_model
from .layer import FusedResLoRALinear
from .passes import track_passes, untrack_passes
from .statistics import skipped_norms

if TYPE_CHECKING:
    from .chain import ResLoRAChain

__all__ = [
    "MERGE_METHODS",
    "METHOD_MODES",
    "MergeTerm",
    "resolve_method",
    "chain_merge_terms",
    "LstsqStatistics",
    "calibrate_lstsq",
    "run_batch",
    "merge_terms",
    "folded_weight",
    "merge_and_unload",
    "merge_report",
    "MergeReport",
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


def _observe_shortcut(stats: LstsqStatistics):
    def hook(block, x, x_prev, z_prev):
        # The shortcut term the merged weight must reproduce, in rank space.
        acc = torch.promote_types(x.dtype, torch.float32)
        target = x_prev.to(acc) @ block.lora_A.to(acc).t() if block.mode == "is" else z_prev
        stats.observe(x, target)

    return hook


@torch.no_grad()
def calibrate_lstsq(
    model: nn.Module, blocks: list["FusedResLoRALinear"], batches: Iterable
) -> dict[int, LstsqStatistics]:
    """One streaming pass of ``batches`` through ``model`` (eval mode, no grad) that accumulates
    :class:`LstsqStatistics` for every block of ``blocks`` with a shortcut term (is/ms blocks
    after the first of their chain). Keyed by ``id(block)``; no activation is kept."""
    if batches is None:
        raise ValueError("method 'lstsq' needs calibration=<an iterable of model inputs>")
    stats: dict[int, LstsqStatistics] = {}
    handles = []
    for block in blocks:
        if block.mode in METHOD_MODES["lstsq"] and block.chain_index > 0:
            stats[id(block)] = LstsqStatistics(block)
            handles.append(block.register_shortcut_hook(_observe_shortcut(stats[id(block)])))
    was_training = model.training
    model.eval()
    count = 0
    try:
        for batch in batches:
            run_batch(model, batch)
            count += 1
    finally:
        for handle in handles:
            handle.remove()
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


# ---------------------------------------------------------------------------- model level
def chains_of(blocks: list[tuple[str, FusedResLoRALinear]]) -> list[ResLoRAChain]:
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


def _check_untied(model: nn.Module, blocks: list[tuple[str, FusedResLoRALinear]]) -> None:
    holders: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        holders[id(param)].append(name)
    # The names a block's base weight has through the block itself (under each name of the block).
    own: dict[int, set[str]] = defaultdict(set)
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, FusedResLoRALinear):
            own[id(mod.base_layer.weight)].add(f"{name}.base_layer.weight" if name else "base_layer.weight")
    owner: dict[int, str] = {}
    for name, layer in blocks:
        weight = layer.base_layer.weight
        others = [n for n in holders[id(weight)] if n not in own[id(weight)]]
        if id(weight) in owner:
            others.append(f"{owner[id(weight)]}.base_layer.weight")
        owner[id(weight)] = name
        if others:
            raise ValueError(
                f"{name}.base_layer.weight is tied to {', '.join(others)}: merging would change those too. "
                "Untie the weights (clone the parameter) before merging"
            )


@torch.no_grad()
def folded_weight(block: FusedResLoRALinear, term: MergeTerm) -> torch.Tensor:
    """A new tensor holding ``block``'s base weight Parameter with ``term`` folded in (the product
    accumulated in float32 on the fastest fold for the device); the block is not changed."""
    weight = block.base_layer.weight.detach().clone()
    if block.fan_in_fan_out:
        # The Parameter is stored [in, out] (Conv1D): fold the transposed update, W^T += c A^T B^T.
        lora_B, lora_A = term.lora_A.t().contiguous(), term.lora_B.t().contiguous()
        return functional.fold_lora_(weight, lora_B, lora_A, term.coef)
    return functional.fold_lora_(weight, term.lora_B, term.lora_A, term.coef)


def _nonfinite_cause(block: FusedResLoRALinear, term: MergeTerm) -> str:
    if not (torch.isfinite(block.lora_A).all() and torch.isfinite(block.lora_B).all()):
        return "its lora_A or lora_B holds Inf/NaN"
    if not (torch.isfinite(term.lora_A).all() and torch.isfinite(term.lora_B).all()):
        return "the adapters of the blocks it sums over, or its lstsq correction, hold Inf/NaN"
    if not math.isfinite(term.coef):
        return f"its merge coefficient is {term.coef} (from non-finite norm statistics)"
    return f"the folded weight overflows {block.weight.dtype}"


@torch.no_grad()
def merge_and_unload(
    model: nn.Module, method: str = "auto", *, calibration=None, ridge: float = 1e-3, safe_merge: bool = True
) -> nn.Module:
    """Fold every ResLoRA block into its base weight and put the original linear modules back.

    Args:
        method: ``auto`` (``exact`` for none/bs, ``input_norm`` for is/ms), ``exact``,
            ``input_norm``, ``weight_norm`` or ``lstsq`` (docs/design.md section 8).
        calibration: for ``lstsq`` only, an iterable of model inputs (a tensor is run as
            ``model(t)``, a dict as ``model(**d)``); see below.
        ridge: for ``lstsq``, the ridge ``lambda`` relative to the mean eigenvalue of each
            block's input Gram matrix.
        safe_merge: check that every merged weight is finite and raise, naming the block and the
            cause, if one is not (the default). ``False`` merges whatever comes out (PEFT's name;
            PEFT's default is ``False``, ours is the check).

    ``lstsq`` runs one streaming pass over ``calibration`` (eval mode, no grad) and accumulates
    per block the float32 sums ``sum x x^T`` ``[in, in]`` and ``sum S x^T`` ``[r, in]`` on the
    block's device; no activation is kept. Memory: ``4 * (in^2 + r * in)`` bytes per is/ms block
    after the first of its chain, all held until the pass ends. Cost: the model's forward over
    the calibration data, plus ``2 * (in + r) * in`` flops per token and block, plus one float64
    Cholesky solve of size ``in`` per block.

    Atomic: the merge terms and every merged weight are computed out of place first (the product
    accumulated in float32, on the fastest fold for the device: :func:`reslora_kernels.fold_report`),
    so the merged weights of all blocks are held at once beside the unmerged ones (peak memory: one
    extra copy of every adapted weight); only then are they swapped in and the modules replaced. Any
    error leaves the model as it was. Each block goes back to its base layer (for a block made by
    ``from_linear`` or ``apply_reslora`` the module it was made from, the same object of the same
    type, its weight Parameter now holding the merged values, frozen). Returns the model (that base
    layer if ``model`` itself was a single :class:`FusedResLoRALinear`); nothing of ResLoRA is left
    in it. A model wrapped in DDP or
    torch.compile is merged inside its wrapper and the bare model is returned (an FSDP-sharded one
    is refused: merge an unsharded copy).
    """
    refuse_sharded(model, "merge_and_unload")
    model = unwrap_model(model)
    blocks = reslora_blocks(model)
    if not blocks:
        raise ValueError("the model has no ResLoRA layers to merge")
    _check_untied(model, blocks)
    names = {id(layer): name for name, layer in blocks}
    terms = merge_terms(model, method, calibration, ridge)
    merged: list[tuple[FusedResLoRALinear, torch.Tensor]] = []
    for block, term in terms:
        weight = folded_weight(block, term)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(
                f"merging {names[id(block)] or 'the layer'} gives non-finite weights: {_nonfinite_cause(block, term)}. "
                "Nothing was changed; pass safe_merge=False to merge anyway"
            )
        merged.append((block, weight))
    replacements = {id(layer): layer.base_layer for _, layer in blocks}
    with ModelTransaction(model) as tx:
        for block, weight in merged:
            tx.set_data(block.base_layer.weight, weight)
        root = replacements.get(id(model))
        if root is None:
            for name, mod in list(model.named_modules(remove_duplicate=False)):
                if name and id(mod) in replacements:
                    tx.set_module(name, replacements[id(mod)])
            tx.delattr(model, "reslora_config")
            for mod in model.modules():  # the pass hooks of apply_reslora / link_chain(model=)
                chains = untrack_passes(mod)
                if chains:
                    tx.on_undo(lambda mod=mod, chains=chains: track_passes(mod, chains))
    for chain in chains_of(blocks):
        chain.reset()
    return model if root is None else root


def _output_tensor(output) -> torch.Tensor:
    """The tensor a model's output is judged by: itself, ``.logits``, ``.last_hidden_state``, or
    the first tensor of a tuple / ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    for attr in ("logits", "last_hidden_state"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find an output tensor in a {type(output).__name__}")


class MergeReport(dict):
    """:func:`merge_report`'s result: method -> relative output error, and in ``skipped_norms``
    the training forwards per block whose Inf/NaN norm the merge statistics left out."""

    def __init__(self, errors: dict[str, float], skipped: dict[str, int]) -> None:
        super().__init__(errors)
        self.skipped_norms = skipped

    def __repr__(self) -> str:
        return f"MergeReport({dict.__repr__(self)}, skipped_norms={self.skipped_norms!r})"


@torch.no_grad()
def merge_report(model: nn.Module, batches, methods=None, *, calibration=None, ridge: float = 1e-3) -> "MergeReport":
    """How far each merge method's merged model is from the unmerged one, without changing it.

    For every method (default: every method that applies to all of the model's chains; lstsq
    only when ``calibration`` is given), returns ``||y_merged - y|| / ||y||`` over ``batches``
    (held-out model inputs, run as in :func:`merge_and_unload`), where ``y`` is the model's
    output tensor (``.logits``, ``.last_hidden_state`` or the first tensor) in eval mode. Each
    merged weight is built on the fly, one block at a time, with the same rounding as a real
    merge; the model's weights, adapters and mode are left as they were. The result is a
    :class:`MergeReport` (a dict) whose ``skipped_norms`` says, per block, how many training
    forwards had an Inf/NaN norm that the statistics left out. DDP and torch.compile wrappers
    are looked through; FSDP-sharded models are refused.
    """
    refuse_sharded(model, "merge_report")
    model = unwrap_model(model)
    blocks = reslora_blocks(model)
    if not blocks:
        raise ValueError("the model has no ResLoRA layers to merge")
    modes = {layer.chain.mode for _, layer in blocks}
    if methods is None:
        methods = [
            m
            for m in ("exact", "input_norm", "weight_norm", "lstsq")
            if all(mode in METHOD_MODES[m] for mode in modes) and (m != "lstsq" or calibration is not None)
        ]
    methods = list(methods)
    if not methods:
        raise ValueError("no merge method to report")
    terms = {m: merge_terms(model, m, calibration if m == "lstsq" else None, ridge) for m in methods}
    sums = {m: [0.0, 0.0] for m in methods}
    was_training = model.training
    model.eval()
    count = 0
    try:
        for batch in batches:
            reference_out = _output_tensor(run_batch(model, batch)).double()
            for m in methods:
                with _merged_preview(model, terms[m]) as merged:
                    merged_out = _output_tensor(run_batch(merged, batch)).double()
                sums[m][0] += float((merged_out - reference_out).square().sum())
                sums[m][1] += float(reference_out.square().sum())
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("batches is empty: merge_report needs held-out model inputs")
    errors = {m: (num / den) ** 0.5 if den > 0 else num**0.5 for m, (num, den) in sums.items()}
    return MergeReport(errors, skipped_norms(blocks))


class _MergedPreview(nn.Module):
    """What the merged ``nn.Linear`` of a block outputs, its weight built on every call (rounded to
    the weight's dtype as a real merge rounds it) so that no merged copy of the model is kept."""

    def __init__(self, block: FusedResLoRALinear, term: MergeTerm) -> None:
        super().__init__()
        self.block, self.term = block, term

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = functional.fold_lora_(
            self.block.weight.detach().clone(), self.term.lora_B, self.term.lora_A, self.term.coef
        )
        return torch.nn.functional.linear(x, weight, self.block.bias)


@contextlib.contextmanager
def _merged_preview(model: nn.Module, terms: list[tuple[FusedResLoRALinear, MergeTerm]]):
    """Swap every block of ``model`` for its merged preview, and back on exit whatever happens;
    yields the module to run (the preview itself when ``model`` is a single block)."""
    previews = {id(block): _MergedPreview(block, term) for block, term in terms}
    swapped = [(name, mod) for name, mod in model.named_modules(remove_duplicate=False) if name and id(mod) in previews]
    try:
        for name, mod in swapped:
            set_module(model, name, previews[id(mod)])
        yield previews.get(id(model), model)
    finally:
        for name, mod in swapped:
            set_module(model, name, mod)
