"""Which blocks form a chain, and in what order: the default rule (one chain per target position,
numeric name parts as ``*``, MoE experts unchained), the user's ``chain_key`` rule, the split where
the shape changes, and the check of chains read from an adapter file."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

import torch.nn as nn

from .base_layers import base_features
from .config import ResLoRAConfig

__all__ = ["chain_key", "parallel_copies"]

#: (chain name, the names of its blocks in chain order).
Chains = list[tuple[str, list[str]]]


def chain_key(module_name: str) -> str:
    """The default chain key of a module: its name with every numeric part (layer index) replaced
    by ``*`` (``model.layers.3.self_attn.q_proj`` -> ``model.layers.*.self_attn.q_proj``), so that
    each repeated position of a model (every q_proj, every BERT ``attention.output.dense``) is one
    chain.

    The default rule of :func:`reslora_kernels.apply_reslora` (``ResLoRAConfig.chain_key=None``) in full: the
    targets with one key form one chain, in model order (the order of ``model.named_modules()``,
    which is the layer order of a ``ModuleList``); a chain splits, with a warning, where the
    (in, out) shape changes; a module under a numbered index after the first whose siblings hold a
    module at the same path (MoE experts, which run on different tokens: :func:`parallel_copies`)
    forms no chain, with a warning, unless that index is a child of an ``nn.Sequential`` (stages run
    in turn; a target that is itself such a child keeps its index: ``layers.*.mlp.2``); if no chain of two or more blocks forms at all, a warning says
    so. ``ResLoRAConfig.chain_key`` replaces the rule (a regex or a function)."""
    return ".".join("*" if part.isdigit() else part for part in module_name.split("."))


def sequential_children(model: nn.Module) -> set[str]:
    """The names of the modules that are children of an ``nn.Sequential``: stages that run one
    after another on the same tokens, never parallel copies."""
    return {
        f"{name}.{child}" if name else child
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Sequential)
        for child, _ in mod.named_children()
    }


def _later_indices(parts: list[str]) -> list[int]:
    """Where the numbered parts after the first (the layer index) are."""
    return [i for i, part in enumerate(parts) if part.isdigit()][1:]


def parallel_copies(module_names: Iterable[str], sequential: Iterable[str] = ()) -> set[str]:
    """The names, among ``module_names`` (every module of a model), that sit under a numbered
    index after the first one whose siblings hold a module at the same path: parallel copies
    such as MoE experts (``layers.0.mlp.experts.3.w1`` beside ``experts.4.w1``). The first index
    is the layer index; a later one with different paths below it (T5's ``block.0.layer.1``:
    self-attention, cross-attention and MLP) is a position, not a copy, and so is the index of a
    child of an ``nn.Sequential`` (``sequential``, the names of such children: an MLP's
    ``mlp.0`` and ``mlp.2`` run one after the other)."""
    sequential = set(sequential)
    split = [name.split(".") for name in module_names]
    numbered = [
        [i for i in _later_indices(parts) if ".".join(parts[: i + 1]) not in sequential] for parts in split
    ]
    siblings: dict[tuple, set[str]] = defaultdict(set)
    for parts, later in zip(split, numbered):
        for i in later:
            siblings[(i, *parts[:i], "#", *parts[i + 1 :])].add(parts[i])
    return {
        ".".join(parts)
        for parts, later in zip(split, numbered)
        if any(len(siblings[(i, *parts[:i], "#", *parts[i + 1 :])]) > 1 for i in later)
    }


def positional_chain_key(module_name: str, sequential: Iterable[str] = ()) -> str:
    """:func:`chain_key`, except that a module that is itself a later-indexed child of an
    ``nn.Sequential`` (``layers.3.mlp.2``: a stage of an MLP, not a layer) keeps its index, so that
    each stage chains with the same stage of the other layers (``layers.*.mlp.2``)."""
    parts = module_name.split(".")
    later = _later_indices(parts)
    if later and later[-1] == len(parts) - 1 and module_name in set(sequential):
        return chain_key(".".join(parts[:-1])) + "." + parts[-1]
    return chain_key(module_name)


def chain_key_of(
    config: ResLoRAConfig, name: str, copies: set[str], sequential: set[str] = frozenset()
) -> tuple[str | None, object]:
    """(chain key or None for no chain, order within the chain) of a block under ``config``'s rule."""
    rule = config.chain_key
    if rule is None:
        return (None if name in copies else positional_chain_key(name, sequential)), None
    if isinstance(rule, str):
        return re.sub(rule, "*", name), None
    result = rule(name)
    key, order = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
    if key is not None and not isinstance(key, str):
        raise TypeError(
            f"chain_key({name!r}) returned {result!r}; it must return a key (str), None (no chain) or (key, order)"
        )
    return key, order


def form_chains(
    config: ResLoRAConfig,
    blocks: list[tuple[str, nn.Module]],
    all_names: list[str],
    sequential: set[str] = frozenset(),
) -> tuple[Chains, list[str]]:
    """The chains of ``blocks`` (name, base module, in model order): one per chain key (see
    :class:`ResLoRAConfig` ``chain_key``), in model order or the rule's order, split where the
    (in, out) shape changes. ``all_names``: every module of the model; ``sequential``: those that
    are children of an ``nn.Sequential`` (:func:`sequential_children`). Returns the chains of two
    or more blocks and the warnings to give."""
    if config.mode == "none":
        return [], []
    copies = parallel_copies(all_names, sequential) if config.chain_key is None else set()
    groups: dict[str, list[tuple[object, str, nn.Module]]] = defaultdict(list)
    alone: list[str] = []
    for name, mod in blocks:
        key, order = chain_key_of(config, name, copies, sequential)
        if key is None:
            alone.append(name)
        else:
            groups[key].append((order, name, mod))
    chains: Chains = []
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


def checked_chains(blocks: dict[str, nn.Module], chains: Chains) -> Chains:
    """``chains`` (as an adapter file lists them) checked against ``blocks`` (name -> base module):
    every member one of the blocks, in one chain only, two or more blocks of one shape per chain."""
    linked: set[str] = set()
    for chain_name, members in chains:
        for member in members:
            if member not in blocks:
                raise ValueError(f"chain {chain_name!r} links {member}, which is not one of the blocks")
            if member in linked:
                raise ValueError(f"{member} is in two chains")
            linked.add(member)
        shapes = {base_features(blocks[m]) for m in members}
        if len(members) < 2 or len(shapes) > 1:
            raise ValueError(f"chain {chain_name!r} needs two or more blocks of one shape, got {members}")
    return [(chain_name, list(members)) for chain_name, members in chains]
