"""Merging a model: fold every block's merge term into its base weight and put the base layers
back (:func:`merge_and_unload`), or measure each method's output error without changing the model
(:func:`merge_report`). The terms themselves come from :mod:`reslora_kernels.merge_methods`."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import defaultdict

import torch
import torch.nn as nn

from . import fold
from .apply import restore_modules
from .base_layers import base_dtype
from .layer import FusedResLoRALinear
from .quant import dequantize
from .quant_merge import merged_linear, requantized_module
from .merge_methods import METHOD_MODES, MergeTerm, chains_of, merge_terms
from .model_utils import (
    MERGED_ADAPTERS_ATTR,
    adapter_fingerprint,
    refuse_sharded,
    reslora_blocks,
    run_batch,
    set_module,
    unwrap_model,
)
from .statistics import skipped_norms
from .transaction import ModelTransaction

__all__ = ["MergeReport", "merge_and_unload", "merge_report"]


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
    accumulated in float32 on the fastest fold for the device); the block is not changed. A
    quantized base's weight is dequantized to float32, folded, and rounded once to its compute
    dtype (:func:`reslora_kernels.base_layers.base_dtype`)."""
    if block.quantized:
        weight = dequantize(block.base_layer, torch.float32)
        fold.fold_lora_(weight, term.lora_B, term.lora_A, term.coef)
        return weight.to(base_dtype(block.base_layer))
    weight = block.base_layer.weight.detach().clone()
    if block.fan_in_fan_out:
        # The Parameter is stored [in, out] (Conv1D): fold the transposed update, W^T += c A^T B^T.
        lora_B, lora_A = term.lora_A.t().contiguous(), term.lora_B.t().contiguous()
        return fold.fold_lora_(weight, lora_B, lora_A, term.coef)
    return fold.fold_lora_(weight, term.lora_B, term.lora_A, term.coef)


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
    model: nn.Module,
    method: str = "auto",
    *,
    calibration=None,
    ridge: float = 1e-3,
    safe_merge: bool = True,
    requantize: bool = False,
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
        requantize: for blocks over a quantized base (bitsandbytes ``Linear4bit`` /
            ``Linear8bitLt``): ``False`` (the default) puts back an ``nn.Linear`` of the base's
            compute dtype holding the dequantized weight plus the merge term (folded in float32,
            rounded once) and the base's bias; ``True`` quantizes the merged weight again with the
            base's format, block size and double quantization, and warns with the share of the
            merge terms the rounding lost (merging into 4 bits rounds away most of a typical
            adapter).

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
    type, its weight Parameter now holding the merged values, frozen), and each module to save
    (``modules_to_save``) to its trained copy. Returns the model (that base
    layer if ``model`` itself was a single :class:`FusedResLoRALinear`); nothing of ResLoRA is left
    in it but the attribute ``reslora_merged_adapters``, the fingerprints of the adapters folded in,
    by which :func:`reslora_kernels.load_reslora` refuses to load one of them a second time. A model
    wrapped in DDP or
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
    instead: dict[int, nn.Module] = {}
    lost: dict[str, float] = {}
    for block, weight in merged:
        if not block.quantized:
            continue
        if requantize:
            instead[id(block)], lost[names[id(block)]] = requantized_module(block.base_layer, weight)
        else:
            instead[id(block)] = merged_linear(block.base_layer, weight)
    # Remembered on the merged model, so that loading the same adapter onto it again (which would
    # add it a second time) is refused by load_reslora.
    fingerprint = adapter_fingerprint({name: (layer.lora_A, layer.lora_B) for name, layer in blocks})
    with ModelTransaction(model) as tx:
        for block, weight in merged:
            if not block.quantized:
                tx.set_data(block.base_layer.weight, weight)
        root = restore_modules(model, tx, instead)
        merged_into = model if root is None else root
        tx.setattr(merged_into, MERGED_ADAPTERS_ATTR, (*getattr(merged_into, MERGED_ADAPTERS_ATTR, ()), fingerprint))
    for chain in chains_of(blocks):
        chain.reset()
    if lost:
        worst = max(lost, key=lost.get)
        warnings.warn(
            f"merge_and_unload(requantize=True): quantizing the merged weights again lost "
            f"{100 * sum(lost.values()) / len(lost):.1f}% of the merge terms on average (relative Frobenius norm; "
            f"most: {100 * lost[worst]:.1f}% at {worst or 'the layer'}); "
            "requantize=False keeps them in a 16-bit nn.Linear",
            UserWarning,
            stacklevel=2,
        )
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
        if self.block.quantized:  # what the merged nn.Linear holds: folded in float32, rounded once
            weight = folded_weight(self.block, self.term)
            bias = None if self.block.bias is None else self.block.bias.to(weight.dtype)
            return torch.nn.functional.linear(x, weight, bias)
        weight = fold.fold_lora_(
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
