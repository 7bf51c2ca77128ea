"""Put ResLoRA into a model, and take it out: plan (targets, chains, modules to save, warnings), then
execute through an undo log; :func:`unload` is the inverse, without merging.

:func:`apply_reslora` works in two steps: :func:`plan_reslora` decides everything (which modules,
:mod:`reslora_kernels.targets`; which chains, :mod:`reslora_kernels.chaining`) and raises on any
problem without touching the model; :func:`execute_plan` then carries the plan out inside a
:class:`reslora_kernels.transaction.ModelTransaction`, which puts everything back should a step
still fail. :func:`reslora_kernels.load_reslora` runs the same two steps with the blocks and
chains read from a file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .base_layers import is_conv1d
from .chain import ResLoRAChain, link_chain
from .chaining import Chains, checked_chains, form_chains, sequential_children
from .config import ResLoRAConfig
from .layer import FusedResLoRALinear
from .model_utils import (
    clean_name,
    compiled_classes,
    refuse_sharded,
    reslora_blocks,
    saved_modules,
    sharded_by,
    unwrap_model,
)
from .module_to_save import ModuleToSave
from .passes import track_passes, untrack_passes
from .targets import (
    Targets,
    matched_modules_to_save,
    matched_targets,
    module_names,
    named_modules_to_save,
    named_targets,
)
from .transaction import ModelTransaction

__all__ = ["apply_reslora", "unload"]


@dataclass
class ApplyPlan:
    """What :func:`apply_reslora` will do to a model, decided before anything changes."""

    config: ResLoRAConfig
    #: (every name the module has in the model, the module), in model order.
    targets: Targets
    #: (chain name, the first names of its blocks in chain order), chains of two or more blocks.
    chains: Chains
    #: (every name the module has in the model, the module): the modules to save, in model order.
    saved: Targets = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_wrapping(model: nn.Module) -> nn.Module:
    """The model to put ResLoRA into: ``model`` itself, or the model inside a torch.compile
    wrapper. DDP/DataParallel and FSDP wrappers are refused: they must be built after ResLoRA."""
    kind = sharded_by(model)
    if kind is not None:
        raise ValueError(
            f"apply or load ResLoRA before sharding the model with {kind}: sharded parameters cannot be replaced"
        )
    inner = unwrap_model(model)
    if inner is not model and not isinstance(model, compiled_classes()):
        raise ValueError(
            f"apply ResLoRA before wrapping the model in {type(model).__name__}: the wrapper registered the "
            "parameters it synchronises when it was built, and would not train the new adapters"
        )
    return inner


def _check_model(model: nn.Module, config: ResLoRAConfig) -> None:
    if not isinstance(config, ResLoRAConfig):
        raise TypeError(f"config must be a ResLoRAConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if any(isinstance(mod, (FusedResLoRALinear, ModuleToSave)) for mod in model.modules()):
        raise ValueError("the model already has ResLoRA layers; merge_and_unload it first or load into it")
    if isinstance(model, nn.Linear) or is_conv1d(model):
        raise TypeError(
            f"apply_reslora replaces submodules; wrap a single {type(model).__name__} with "
            "FusedResLoRALinear.from_linear"
        )


def plan_reslora(
    model: nn.Module,
    config: ResLoRAConfig,
    *,
    block_names: list[str] | None = None,
    chains: Chains | None = None,
    saved_names: list[str] | None = None,
) -> ApplyPlan:
    """Decide what :func:`apply_reslora` does to ``model`` (targets, chains, modules to save,
    warnings) without changing it; every error :func:`apply_reslora` can raise for this model is
    raised here.

    ``block_names``, ``chains`` and ``saved_names`` (what :func:`reslora_kernels.load_reslora` read
    from a file) replace the matching and the chain forming: exactly those modules become blocks,
    linked exactly so, and exactly those are saved."""
    _check_model(model, config)
    names = module_names(model)
    if saved_names is not None:
        saved = named_modules_to_save(model, names, saved_names)
    else:
        saved = matched_modules_to_save(model, names, config)
    if block_names is not None:
        targets = named_targets(model, names, block_names)
    else:
        targets = matched_targets(model, names, config, {n for saved_names_, _ in saved for n in saved_names_})
    notes = _tied_notes(model, saved)
    blocks = [(clean_name(names_[0]), mod) for names_, mod in targets]
    if chains is not None:
        chains = checked_chains(dict(blocks), chains)
    else:
        all_names = [clean_name(name) for name, _ in model.named_modules()]
        sequential = {clean_name(name) for name in sequential_children(model)}
        chains, chain_notes = form_chains(config, blocks, all_names, sequential)
        notes += chain_notes
    return ApplyPlan(config=config, targets=targets, chains=chains, saved=saved, warnings=notes)


def _tied_notes(model: nn.Module, saved: Targets) -> list[str]:
    """A warning for each module to save whose parameters other modules share (tied weights): its
    trained copy does not share them."""
    notes = []
    for names, mod in saved:
        own = {id(p) for p in mod.parameters()}
        inside = tuple(name + "." for name in names)
        others = sorted(
            {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in own and not n.startswith(inside)}
        )
        if others:
            notes.append(
                f"ResLoRA: {clean_name(names[0])} (modules_to_save) shares parameters with {', '.join(others)}; its "
                "trained copy does not: training unties them"
            )
    return notes


def execute_plan(model: nn.Module, plan: ApplyPlan, tx: ModelTransaction) -> dict[str, FusedResLoRALinear]:
    """Carry out ``plan`` on ``model`` through ``tx``; returns the new blocks by (clean) first name."""
    tx.freeze_all()  # first: building a block freezes its base weight
    for names, mod in plan.saved:
        wrapper = ModuleToSave(mod)
        for name in names:
            tx.set_module(name, wrapper)
    with warnings.catch_warnings():
        # The config gave its setting warnings (alpha = 0) once already: not once per layer.
        warnings.simplefilter("ignore", UserWarning)
        settings = plan.config.block_settings()
        layers = {clean_name(names[0]): FusedResLoRALinear.from_linear(mod, settings) for names, mod in plan.targets}
    for names, _ in plan.targets:
        for name in names:
            tx.set_module(name, layers[clean_name(names[0])])
    linked = set()
    if "_reslora_pass_tracker" not in vars(model):
        tx.on_undo(lambda: untrack_passes(model))
    for chain_name, members in plan.chains:
        # model=: a call of the model's forward delimits the chains' passes (skipped blocks are caught).
        link_chain([layers[m] for m in members], name=chain_name, block_names=members, model=model)
        linked.update(members)
    for name, layer in layers.items():
        if name not in linked:  # a chain of its own, named, so that its errors can say which block
            ResLoRAChain([layer], block_names=[name])
    tx.setattr(model, "reslora_config", plan.config)
    return layers


def apply_reslora(model: nn.Module, config: ResLoRAConfig) -> nn.Module:
    """Put ResLoRA into ``model`` in place and return it.

    Every linear layer chosen by ``config.target_modules`` (a list of names, a regex,
    ``"all-linear"``, or ``None`` for the defaults of ``model.config.model_type``) becomes the
    ``base_layer`` of a :class:`FusedResLoRALinear` that takes its place (an ``nn.Linear`` or a
    transformers ``Conv1D``, its Parameters frozen, not copied); each module of
    ``config.modules_to_save`` (and the heads its ``task_type`` adds) becomes a
    :class:`reslora_kernels.ModuleToSave` whose trainable copy runs; every other parameter is frozen.
    For modes is/bs/ms the blocks are linked into chains by ``config.chain_key`` (default: the rule
    of :func:`reslora_kernels.chain_key`: one chain per target position, in model order, split with
    a warning where the shape changes; MoE experts unchained, with a warning; a warning if no chain
    forms at all). Works on any ``nn.Module``, HuggingFace models included.
    :func:`reslora_kernels.reslora_summary` reports what was replaced and how it was chained.

    A ``torch.compile``-wrapped model is looked through (the compiled wrapper is returned);
    DDP/FSDP wrappers must be built after ResLoRA is applied and are refused.

    Atomic: everything is checked first (the settings, the targets and their types: a module with
    a forward or hooks of its own, a parametrized or non-float weight is refused), and should a
    later step fail the model is left exactly as it was.
    """
    inner = check_wrapping(model)
    plan = plan_reslora(inner, config)
    with ModelTransaction(inner) as tx:
        execute_plan(inner, plan, tx)
    for note in plan.warnings:
        warnings.warn(note, UserWarning, stacklevel=2)
    return model


def restore_modules(
    model: nn.Module, tx: ModelTransaction, instead: dict[int, nn.Module] | None = None
) -> nn.Module | None:
    """Put every block's base layer and every module to save's trained copy back in its place
    through ``tx``, and remove what ResLoRA attached to ``model`` (its config, the pass hooks).
    ``instead`` maps ``id(block)`` to the module to put back in place of its base layer (a merged
    quantized block's ``nn.Linear``). Returns what takes the place of ``model`` itself when it is a
    single block, else ``None``."""
    instead = instead or {}
    replacements: dict[int, nn.Module] = {}
    for mod in model.modules():
        if isinstance(mod, FusedResLoRALinear):
            replacements[id(mod)] = instead.get(id(mod), mod.base_layer)
        elif isinstance(mod, ModuleToSave):
            replacements[id(mod)] = mod.trained_module
    root = replacements.get(id(model))
    if root is not None:
        return root
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        if name and id(mod) in replacements:
            tx.set_module(name, replacements[id(mod)])
    tx.delattr(model, "reslora_config")
    for mod in model.modules():  # the pass hooks of apply_reslora / link_chain(model=)
        chains = untrack_passes(mod)
        if chains:
            tx.on_undo(lambda mod=mod, chains=chains: track_passes(mod, chains))
    return None


@torch.no_grad()
def unload(model: nn.Module) -> nn.Module:
    """Take ResLoRA out of ``model`` without merging: every block is replaced by its base layer (the
    module it was made from, the same object, its weights untouched), every module to save by its
    trained copy (as PEFT's ``unload`` does), and the config and pass hooks are removed. The
    adapters are dropped: save them first (:func:`reslora_kernels.save_reslora`) to keep them.

    Returns the model (the base layer if ``model`` itself is a single block). Atomic: should a step
    fail, the model is left as it was. DDP and torch.compile wrappers are looked through (the bare
    model is returned); an FSDP-sharded model is refused.
    """
    refuse_sharded(model, "unload")
    model = unwrap_model(model)
    blocks = reslora_blocks(model)
    if not blocks and not saved_modules(model):
        raise ValueError("the model has no ResLoRA layers to unload")
    with ModelTransaction(model) as tx:
        root = restore_modules(model, tx)
    for chain in {id(layer.chain): layer.chain for _, layer in blocks}.values():
        chain.reset()
    return model if root is None else root
