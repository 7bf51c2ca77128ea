"""Put ResLoRA into a model: plan (targets, chains, warnings), then execute through an undo log.

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

import torch.nn as nn

from .base_layers import is_conv1d
from .chain import ResLoRAChain, link_chain
from .chaining import Chains, checked_chains, form_chains, sequential_children
from .config import ResLoRAConfig
from .layer import FusedResLoRALinear
from .model_utils import clean_name, compiled_classes, sharded_by, unwrap_model
from .passes import untrack_passes
from .targets import Targets, matched_targets, module_names, named_targets
from .transaction import ModelTransaction

__all__ = ["apply_reslora"]


@dataclass
class ApplyPlan:
    """What :func:`apply_reslora` will do to a model, decided before anything changes."""

    config: ResLoRAConfig
    #: (every name the module has in the model, the module), in model order.
    targets: Targets
    #: (chain name, the first names of its blocks in chain order), chains of two or more blocks.
    chains: Chains
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
    if any(isinstance(mod, FusedResLoRALinear) for mod in model.modules()):
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
) -> ApplyPlan:
    """Decide what :func:`apply_reslora` does to ``model`` (targets, chains, warnings) without
    changing it; every error :func:`apply_reslora` can raise for this model is raised here.

    ``block_names`` and ``chains`` (what :func:`reslora_kernels.load_reslora` read from a file)
    replace the target matching and the chain forming: exactly those modules become blocks,
    linked exactly so."""
    _check_model(model, config)
    names = module_names(model)
    if block_names is not None:
        targets = named_targets(model, names, block_names)
    else:
        targets = matched_targets(model, names, config)
    blocks = [(clean_name(names_[0]), mod) for names_, mod in targets]
    if chains is not None:
        return ApplyPlan(config=config, targets=targets, chains=checked_chains(dict(blocks), chains))
    all_names = [clean_name(name) for name, _ in model.named_modules()]
    sequential = {clean_name(name) for name in sequential_children(model)}
    chains, notes = form_chains(config, blocks, all_names, sequential)
    return ApplyPlan(config=config, targets=targets, chains=chains, warnings=notes)


def execute_plan(model: nn.Module, plan: ApplyPlan, tx: ModelTransaction) -> dict[str, FusedResLoRALinear]:
    """Carry out ``plan`` on ``model`` through ``tx``; returns the new blocks by (clean) first name."""
    tx.freeze_all()  # first: building a block freezes its base weight
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
    transformers ``Conv1D``, its Parameters frozen, not copied); every other parameter is frozen.
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
