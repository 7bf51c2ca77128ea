"""Put ResLoRA into a model: replace the target linear layers, link their chains, summarise.

:func:`apply_reslora` works in two steps: :func:`plan_reslora` decides everything (targets,
chains, warnings) and raises on any problem without touching the model; the plan is then carried
out inside a :class:`ModelTransaction`, which puts everything back should a step still fail.
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .base_layers import base_features, is_conv1d, is_linear
from .chain import ResLoRAChain, link_chain
from .config import ALL_LINEAR, DEFAULT_TARGET_MODULES, ResLoRAConfig
from .layer import FusedResLoRALinear
from .passes import untrack_passes
from .statistics import skipped_norms

__all__ = [
    "apply_reslora",
    "chain_key",
    "parallel_copies",
    "plan_reslora",
    "ApplyPlan",
    "ModelTransaction",
    "reslora_blocks",
    "resolve_targets",
    "unwrap_model",
    "clean_name",
    "reslora_summary",
    "ResLoRASummary",
]


def chain_key(module_name: str) -> str:
    """The default chain key of a module: its name with every numeric part (layer index) replaced
    by ``*`` (``model.layers.3.self_attn.q_proj`` -> ``model.layers.*.self_attn.q_proj``), so that
    each repeated position of a model (every q_proj, every BERT ``attention.output.dense``) is one
    chain.

    The default rule of :func:`apply_reslora` (``ResLoRAConfig.chain_key=None``) in full: the
    targets with one key form one chain, in model order (the order of ``model.named_modules()``,
    which is the layer order of a ``ModuleList``); a chain splits, with a warning, where the
    (in, out) shape changes; a module under a numbered index after the first whose siblings hold a
    module at the same path (MoE experts, which run on different tokens: :func:`parallel_copies`)
    forms no chain, with a warning; if no chain of two or more blocks forms at all, a warning says
    so. ``ResLoRAConfig.chain_key`` replaces the rule (a regex or a function)."""
    return ".".join("*" if part.isdigit() else part for part in module_name.split("."))


def _linear_patterns(model: nn.Module) -> list[str]:
    patterns = dict.fromkeys(chain_key(name) for name, mod in model.named_modules() if is_linear(mod))
    return list(patterns)


#: Module names that wrappers insert into the names of what they wrap: FSDP (1) units, activation
#: checkpointing, torch.compile of a submodule.
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def _wrapper_class(name: str, module_path: str):
    # Only look a wrapper class up where its module was imported: a model wrapped in one has
    # imported it, and importing torch.distributed / torch._dynamo just to look is slow.
    module = sys.modules.get(module_path)
    return getattr(module, name, None) if module is not None else None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / FullyShardedDataParallel
    (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, however nested."""
    while True:
        compiled = _wrapper_class("OptimizedModule", "torch._dynamo.eval_frame")
        fsdp = _wrapper_class("FullyShardedDataParallel", "torch.distributed.fsdp.fully_sharded_data_parallel")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif fsdp is not None and isinstance(model, fsdp):
            model = model.module
        elif compiled is not None and isinstance(model, compiled):
            model = model._orig_mod
        else:
            return model


def clean_name(name: str) -> str:
    """``name`` without the parts wrappers insert (``_fsdp_wrapped_module``, ``_orig_mod``, ...): the
    name the module has in the bare model."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def sharded_by(model: nn.Module) -> str | None:
    """``"FSDP"`` or ``"FSDP2"`` (fully_shard) if ``model`` or a submodule is sharded, else ``None``."""
    fsdp = _wrapper_class("FullyShardedDataParallel", "torch.distributed.fsdp.fully_sharded_data_parallel")
    fsdp2 = _wrapper_class("FSDPModule", "torch.distributed.fsdp")
    for mod in model.modules():
        if fsdp is not None and isinstance(mod, fsdp):
            return "FSDP"
        if fsdp2 is not None and isinstance(mod, fsdp2):
            return "FSDP2"
    return None


def refuse_sharded(model: nn.Module, what: str) -> None:
    """Raise if ``model`` is FSDP-sharded: ``what`` needs every weight whole in this process."""
    kind = sharded_by(model)
    if kind is not None:
        raise ValueError(
            f"{what} needs the whole model in one process, but this model is sharded by {kind} (each process "
            "holds a shard of each weight). save_reslora works on the sharded model: save the adapter, "
            f"load_reslora it into an unsharded copy of the base model and call {what} there"
        )


def whole_parameters(model: nn.Module):
    """A context in which every parameter of ``model`` is whole in this process: FSDP (1) gathers
    them (``summon_full_params``, read-only); anything else already is. FSDP2's DTensors are
    gathered where read (``full_tensor``)."""
    fsdp = _wrapper_class("FullyShardedDataParallel", "torch.distributed.fsdp.fully_sharded_data_parallel")
    if fsdp is not None and any(isinstance(mod, fsdp) for mod in model.modules()):
        return fsdp.summon_full_params(model, writeback=False)
    return contextlib.nullcontext()


def reslora_blocks(model: nn.Module) -> list[tuple[str, FusedResLoRALinear]]:
    """Every ResLoRA block of ``model`` once, under its first name in the bare model (wrappers
    such as DDP, FSDP and torch.compile are looked through), in model order."""
    model = unwrap_model(model)
    return [(clean_name(name), mod) for name, mod in model.named_modules() if isinstance(mod, FusedResLoRALinear)]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


class ModelTransaction:
    """An undo log for changes to a model. Used as ``with ModelTransaction(model) as tx:``; every
    change made through it (module swaps, ``requires_grad`` flags, tensor values, attributes) is
    undone, newest first, if the block raises, so that a failed operation leaves the model as it was."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._undo: list = []

    def __enter__(self) -> "ModelTransaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            for undo in reversed(self._undo):
                undo()
        self._undo.clear()
        return False

    def set_module(self, name: str, module: nn.Module) -> None:
        old = self.model.get_submodule(name)
        set_module(self.model, name, module)
        self._undo.append(lambda: set_module(self.model, name, old))

    def freeze_all(self) -> None:
        """``requires_grad_(False)`` on every parameter of the model."""
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self._undo.append(lambda: [p.requires_grad_(flag) for p, flag in flags])
        self.model.requires_grad_(False)

    @torch.no_grad()
    def copy_(self, target: torch.Tensor, source: torch.Tensor) -> None:
        old = target.detach().clone()
        self._undo.append(lambda: target.copy_(old))
        target.copy_(source)

    def set_data(self, param: torch.Tensor, data: torch.Tensor) -> None:
        """``param.data = data``: the Parameter object (and whoever holds it) stays, its values change."""
        old = param.data
        self._undo.append(lambda: setattr(param, "data", old))
        param.data = data

    def on_undo(self, undo) -> None:
        """Run ``undo()`` should the transaction fail (for changes made outside the log)."""
        self._undo.append(undo)

    def setattr(self, obj: object, name: str, value: object) -> None:
        missing = object()
        old = obj.__dict__.get(name, missing)

        def undo():
            if old is missing:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = old

        self._undo.append(undo)
        obj.__dict__[name] = value

    def delattr(self, obj: object, name: str) -> None:
        if name in obj.__dict__:
            self.setattr(obj, name, None)
            del obj.__dict__[name]


def _compiled() -> tuple[type, ...]:
    compiled = _wrapper_class("OptimizedModule", "torch._dynamo.eval_frame")
    return () if compiled is None else (compiled,)


def base_layer_problem(name: str, module: nn.Module) -> str | None:
    """Why ``module`` cannot become a ResLoRA block (``None``: it can). The block computes
    ``x W^T + b`` plus the LoRA branch from the module's weight and bias without running its
    forward, so anything the module does beyond that would be lost silently: such modules are
    refused."""
    if isinstance(module, FusedResLoRALinear):
        return f"{name} is already a ResLoRA layer"
    conv = is_conv1d(module)
    if not isinstance(module, nn.Linear) and not conv:
        return f"{name} is a {type(module).__name__}, not an nn.Linear or a transformers Conv1D"
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return (
            f"{name} is the output projection of an nn.MultiheadAttention, which reads its weight "
            "directly and never calls its forward: a LoRA there would be ignored. Exclude it from target_modules"
        )
    if parametrize.is_parametrized(module):
        return (
            f"{name} is parametrized (torch.nn.utils.parametrize, e.g. weight_norm): its weight is computed "
            "on every forward. Remove the parametrization (parametrize.remove_parametrizations) first"
        )
    base_forward = sys.modules["transformers.pytorch_utils"].Conv1D.forward if conv else nn.Linear.forward
    if type(module).forward is not base_forward or "forward" in vars(module):
        return f"{name} ({type(module).__name__}) has a forward of its own, which a ResLoRA layer would not run"
    hooks = [
        kind
        for kind in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
        if getattr(module, kind, None)
    ]
    if hooks:
        return f"{name} has module hooks ({', '.join(hooks)}), which the ResLoRA layer replacing it would not run"
    if not isinstance(module.weight, nn.Parameter) or not module.weight.is_floating_point():
        weight = module.weight
        return f"{name}.weight is a {type(weight).__name__} of {weight.dtype}, not a floating-point Parameter"
    return None


@dataclass
class ApplyPlan:
    """What :func:`apply_reslora` will do to a model, decided before anything changes."""

    config: ResLoRAConfig
    #: (every name the module has in the model, the module), in model order.
    targets: list[tuple[list[str], nn.Module]]
    #: (chain name, the first names of its blocks in chain order), chains of two or more blocks.
    chains: list[tuple[str, list[str]]]
    warnings: list[str] = field(default_factory=list)


def _module_names(model: nn.Module) -> dict[int, list[str]]:
    # remove_duplicate=False: a module reachable under two names must be replaced under both.
    names: dict[int, list[str]] = defaultdict(list)
    for name, mod in model.named_modules(remove_duplicate=False):
        if name:
            names[id(mod)].append(name)
    return names


def check_wrapping(model: nn.Module) -> nn.Module:
    """The model to put ResLoRA into: ``model`` itself, or the model inside a torch.compile
    wrapper. DDP/DataParallel and FSDP wrappers are refused: they must be built after ResLoRA."""
    kind = sharded_by(model)
    if kind is not None:
        raise ValueError(
            f"apply or load ResLoRA before sharding the model with {kind}: sharded parameters cannot be replaced"
        )
    inner = unwrap_model(model)
    if inner is not model and not isinstance(model, _compiled()):
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
    chains: list[tuple[str, list[str]]] | None = None,
) -> ApplyPlan:
    """Decide what :func:`apply_reslora` does to ``model`` (targets, chains, warnings) without
    changing it; every error :func:`apply_reslora` can raise for this model is raised here.

    ``block_names`` and ``chains`` (what :func:`reslora_kernels.load_reslora` read from a file)
    replace the target matching and the chain forming: exactly those modules become blocks,
    linked exactly so."""
    _check_model(model, config)
    names = _module_names(model)
    if block_names is not None:
        targets = _named_targets(model, names, block_names)
    else:
        targets = _matched_targets(model, names, config)
    if chains is not None:
        return ApplyPlan(config=config, targets=targets, chains=_checked_chains(targets, chains))
    all_names = [clean_name(name) for name, _ in model.named_modules()]
    chains, notes = _form_chains(config, [(clean_name(names_[0]), mod) for names_, mod in targets], all_names)
    return ApplyPlan(config=config, targets=targets, chains=chains, warnings=notes)


def resolve_targets(model: nn.Module, config: ResLoRAConfig) -> tuple[str | list[str], str]:
    """``(targets, how)``: what ``config.target_modules`` means for ``model`` (a list of names or
    a regex; for ``"all-linear"`` the list of every linear layer but the output head) and a
    description of where it came from."""
    targets = config.target_modules
    if targets == ALL_LINEAR:
        # PEFT's meaning: every nn.Linear / Conv1D but the output head (get_output_embeddings).
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [name for name, mod in model.named_modules() if name and is_linear(mod) and mod is not head]
        return names, "all-linear: every linear layer but the output head"
    if targets is not None:
        return targets, "target_modules"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type], f"the default for model_type {model_type!r}"
    raise ValueError(
        f"ResLoRAConfig.target_modules is not set and model_type {model_type!r} has no default targets "
        f"(defaults exist for {', '.join(sorted(DEFAULT_TARGET_MODULES))}); the model's linear layers are: "
        + ", ".join(_linear_patterns(model))
    )


def _matched_targets(model, names, config) -> list[tuple[list[str], nn.Module]]:
    wanted, how = resolve_targets(model, config)
    lenient = config.target_modules == ALL_LINEAR
    if isinstance(wanted, list):
        matches = lambda name: any(name == t or name.endswith("." + t) for t in wanted)  # noqa: E731
    else:
        matches = lambda name: re.fullmatch(wanted, name) is not None  # noqa: E731
    targets: list[tuple[list[str], nn.Module]] = []
    skipped: list[str] = []
    seen: set[int] = set()
    for name, mod in model.named_modules(remove_duplicate=False):
        if not name or id(mod) in seen or not is_linear(mod) or not matches(name):
            continue
        seen.add(id(mod))
        problem = base_layer_problem(name, mod)
        if problem is not None and lenient:
            skipped.append(problem)  # all-linear takes what it can, and says what it left
            continue
        if problem is not None:
            raise ValueError(problem)
        targets.append((names[id(mod)], mod))
    if skipped:
        warnings.warn("ResLoRA all-linear leaves out: " + "; ".join(skipped), UserWarning, stacklevel=4)
    if not targets:
        raise ValueError(
            f"no linear layer (nn.Linear or Conv1D) in the model matches target_modules={wanted!r} ({how}); "
            f"its linear layers are: {', '.join(_linear_patterns(model)) or '(none)'}"
        )
    return targets


def _named_targets(model, names, block_names) -> list[tuple[list[str], nn.Module]]:
    modules = {clean_name(name): mod for name, mod in model.named_modules(remove_duplicate=False)}
    targets = []
    for name in block_names:
        mod = modules.get(name) if name else None
        if mod is None:
            raise ValueError(f"the model has no module {name!r}")
        problem = base_layer_problem(name, mod)
        if problem is not None:
            raise ValueError(problem)
        if clean_name(names[id(mod)][0]) != name:
            raise ValueError(f"{name} is the module {clean_name(names[id(mod)][0])} under a second name")
        targets.append((names[id(mod)], mod))
    return targets


def _checked_chains(targets, chains) -> list[tuple[str, list[str]]]:
    by_name = {clean_name(names[0]): mod for names, mod in targets}
    linked: set[str] = set()
    for chain_name, members in chains:
        for member in members:
            if member not in by_name:
                raise ValueError(f"chain {chain_name!r} links {member}, which is not one of the blocks")
            if member in linked:
                raise ValueError(f"{member} is in two chains")
            linked.add(member)
        shapes = {base_features(by_name[m]) for m in members}
        if len(members) < 2 or len(shapes) > 1:
            raise ValueError(f"chain {chain_name!r} needs two or more blocks of one shape, got {members}")
    return [(chain_name, list(members)) for chain_name, members in chains]


def parallel_copies(module_names: Iterable[str]) -> set[str]:
    """The names, among ``module_names`` (every module of a model), that sit under a numbered
    index after the first one whose siblings hold a module at the same path: parallel copies
    such as MoE experts (``layers.0.mlp.experts.3.w1`` beside ``experts.4.w1``). The first index
    is the layer index; a later one with different paths below it (T5's ``block.0.layer.1``:
    self-attention, cross-attention and MLP) is a position, not a copy."""
    split = [name.split(".") for name in module_names]
    numbered = [[i for i, part in enumerate(parts) if part.isdigit()][1:] for parts in split]
    siblings: dict[tuple, set[str]] = defaultdict(set)
    for parts, later in zip(split, numbered):
        for i in later:
            siblings[(i, *parts[:i], "#", *parts[i + 1 :])].add(parts[i])
    return {
        ".".join(parts)
        for parts, later in zip(split, numbered)
        if any(len(siblings[(i, *parts[:i], "#", *parts[i + 1 :])]) > 1 for i in later)
    }


def _chain_key_of(config: ResLoRAConfig, name: str, copies: set[str]) -> tuple[str | None, object]:
    """(chain key or None for no chain, order within the chain) of a block under ``config``'s rule."""
    rule = config.chain_key
    if rule is None:
        return (None if name in copies else chain_key(name)), None
    if isinstance(rule, str):
        return re.sub(rule, "*", name), None
    result = rule(name)
    key, order = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
    if key is not None and not isinstance(key, str):
        raise TypeError(
            f"chain_key({name!r}) returned {result!r}; it must return a key (str), None (no chain) or (key, order)"
        )
    return key, order


def _form_chains(
    config: ResLoRAConfig, blocks: list[tuple[str, nn.Module]], all_names: list[str]
) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The chains of ``blocks`` (name, base module, in model order): one per chain key (see
    :class:`ResLoRAConfig` ``chain_key``), in model order or the rule's order, split where the
    (in, out) shape changes. Returns the chains of two or more blocks and the warnings to give."""
    if config.mode == "none":
        return [], []
    copies = parallel_copies(all_names) if config.chain_key is None else set()
    groups: dict[str, list[tuple[object, str, nn.Module]]] = defaultdict(list)
    alone: list[str] = []
    for name, mod in blocks:
        key, order = _chain_key_of(config, name, copies)
        if key is None:
            alone.append(name)
        else:
            groups[key].append((order, name, mod))
    chains: list[tuple[str, list[str]]] = []
    notes: list[str] = []
    experts = [name for name in alone if name in copies]
    if experts:
        notes.append(
            f"ResLoRA: {len(experts)} target modules are parallel copies under a numbered index (MoE experts, "
            f"which run on different tokens), e.g. {', '.join(experts[:3])}: they form no chain and train as "
            "first blocks. Set ResLoRAConfig.chain_key to chain them otherwise"
        )
    for key, members in groups.items():
        if any(order is not None for order, _, _ in members):
            members = sorted(members, key=lambda member: member[0])
        runs = [[members[0]]]
        for (_, prev_name, prev), (order, name, cur) in zip(members, members[1:]):
            if base_features(cur) != base_features(prev):
                (cur_in, cur_out), (prev_in, prev_out) = base_features(cur), base_features(prev)
                notes.append(
                    f"ResLoRA: {name} ({cur_in}->{cur_out}) differs in shape "
                    f"from {prev_name} ({prev_in}->{prev_out}); a new chain starts at {name}"
                )
                runs.append([])
            runs[-1].append((order, name, cur))
        for i, run in enumerate(runs):
            if len(run) > 1:
                chains.append((key if i == 0 else f"{key}#{i}", [name for _, name, _ in run]))
    if not chains and len(blocks) > 1:
        shown = ", ".join(name for name, _ in blocks[:4]) + (", ..." if len(blocks) > 4 else "")
        notes.append(
            f"ResLoRA: mode {config.mode!r} formed no chain of two or more blocks from {len(blocks)} targets "
            f"({shown}): without a predecessor every block trains as a first block, and the shortcuts do nothing. "
            "Chains group modules whose names agree once numeric parts become '*'; set ResLoRAConfig.chain_key "
            r"(e.g. chain_key=r'(?<=block)\d+' for block1, block2, ...)"
        )
    return chains, notes


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
    of :func:`chain_key`: one chain per target position, in model order, split with a warning where
    the shape changes; MoE experts unchained, with a warning; a warning if no chain forms at all).
    Works on any ``nn.Module``, HuggingFace models included. :func:`reslora_summary` reports what
    was replaced and how it was chained.

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


@dataclass
class ResLoRASummary:
    """What :func:`apply_reslora` did to a model."""

    replaced: list[str]
    chains: dict[str, list[str]] = field(default_factory=dict)
    trainable_params: int = 0
    total_params: int = 0
    #: Block name -> training forwards whose input (is) or z (ms) norm was Inf/NaN and was left
    #: out of the merge statistics (blocks with none are not listed).
    skipped_norms: dict[str, int] = field(default_factory=dict)
    #: Blocks of a shortcut mode (is/bs/ms) that are in no chain of two or more blocks.
    unchained: list[str] = field(default_factory=list)
    #: The target_modules that chose the blocks and where they came from (the config, the
    #: defaults of the model type, all-linear); empty for layers built by hand.
    targets: str = ""

    def __str__(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        lines = [
            f"ResLoRA: {len(self.replaced)} linear layers replaced, {len(self.chains)} chains",
            f"trainable params: {self.trainable_params:,} of {self.total_params:,} ({pct:.4f}%)",
        ]
        if self.targets:
            lines.insert(1, f"targets: {self.targets}")
        for name, members in self.chains.items():
            lines.append(f"  chain {name}: {len(members)} blocks ({members[0]} ... {members[-1]})")
        if self.unchained:
            lines.append(f"  not in a chain (train as first blocks): {', '.join(self.unchained)}")
        if self.skipped_norms:
            total = sum(self.skipped_norms.values())
            lines.append(
                f"non-finite norms left out of the merge statistics: {total} "
                f"({', '.join(f'{name}: {n}' for name, n in self.skipped_norms.items())})"
            )
        return "\n".join(lines)


def reslora_summary(model: nn.Module) -> ResLoRASummary:
    """The replaced layers, the chains (name -> block names in order), the parameter counts and
    the non-finite norms the merge statistics left out. Wrapped models (DDP, FSDP, torch.compile)
    are summarised as the bare model."""
    blocks = reslora_blocks(model)
    names = {id(layer): name for name, layer in blocks}
    chains: dict[str, list[str]] = {}
    for _, layer in blocks:
        chain = layer.chain
        if len(chain) > 1 and chain.name not in chains:
            chains[chain.name] = [names.get(id(b), n) for b, n in zip(chain, chain.block_names)]
    with whole_parameters(model):
        params = list(model.parameters())
        trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    return ResLoRASummary(
        replaced=[name for name, _ in blocks],
        chains=chains,
        trainable_params=trainable,
        total_params=total,
        skipped_norms=skipped_norms(blocks),
        unchained=[name for name, layer in blocks if layer.mode != "none" and len(layer.chain) == 1],
        targets=_describe_targets(unwrap_model(model)),
    )


def _describe_targets(model: nn.Module) -> str:
    config = vars(model).get("reslora_config")
    if config is None:
        return ""
    if config.target_modules == ALL_LINEAR:
        return "all-linear (every linear layer but the output head)"
    if config.target_modules is not None:
        return f"{config.target_modules!r}"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{DEFAULT_TARGET_MODULES.get(model_type)!r} (the default for model_type {model_type!r})"
