"""Put ResLoRA into a model: replace the target linear layers, link their chains, summarise."""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch.nn as nn

from .chain import link_chain
from .config import ResLoRAConfig
from .layer import FusedResLoRALinear

__all__ = ["apply_reslora", "chain_key", "reslora_blocks", "reslora_summary", "ResLoRASummary"]


def chain_key(module_name: str) -> str:
    """The chain a module belongs to: its name with every layer index replaced by ``*``
    (``model.layers.3.self_attn.q_proj`` -> ``model.layers.*.self_attn.q_proj``), so that each
    repeated position of a model (every q_proj, every BERT ``attention.output.dense``) is one chain."""
    return ".".join("*" if part.isdigit() else part for part in module_name.split("."))


def _linear_patterns(model: nn.Module) -> list[str]:
    patterns = dict.fromkeys(chain_key(name) for name, mod in model.named_modules() if isinstance(mod, nn.Linear))
    return list(patterns)


def reslora_blocks(model: nn.Module) -> list[tuple[str, FusedResLoRALinear]]:
    """Every ResLoRA block of ``model`` once, under its first name, in model order."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, FusedResLoRALinear)]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def apply_reslora(model: nn.Module, config: ResLoRAConfig) -> nn.Module:
    """Put ResLoRA into ``model`` in place and return it.

    Every ``nn.Linear`` whose name matches ``config.target_modules`` becomes a
    :class:`FusedResLoRALinear` reusing its weight and bias; every other parameter is frozen.
    For modes is/bs/ms the blocks are linked into one chain per :func:`chain_key` (one per target
    position), in model order; where a block's (in, out) shape differs from its predecessor's a new
    chain starts, with a warning naming both modules. Works on any ``nn.Module``, HuggingFace
    models included. :func:`reslora_summary` reports what was replaced.
    """
    if not isinstance(config, ResLoRAConfig):
        raise TypeError(f"config must be a ResLoRAConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if config.target_modules is None:
        raise ValueError(
            "ResLoRAConfig.target_modules is not set; the model's nn.Linear modules are: "
            + ", ".join(_linear_patterns(model))
        )
    if any(isinstance(mod, FusedResLoRALinear) for mod in model.modules()):
        raise ValueError("the model already has ResLoRA layers; merge_and_unload it first or load into it")
    if isinstance(model, nn.Linear):
        raise TypeError(
            "apply_reslora replaces submodules; wrap a single nn.Linear with FusedResLoRALinear.from_linear"
        )

    # remove_duplicate=False: a Linear reachable under two names must be replaced under both.
    targets: dict[int, list[str]] = {}
    modules: dict[int, nn.Linear] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if name and isinstance(mod, nn.Linear) and config.matches(name):
            if isinstance(mod, nn.modules.linear.NonDynamicallyQuantizableLinear):
                raise ValueError(
                    f"{name} is the output projection of an nn.MultiheadAttention, which reads its weight "
                    "directly and never calls its forward: a LoRA there would be ignored. "
                    "Exclude it from target_modules"
                )
            targets.setdefault(id(mod), []).append(name)
            modules[id(mod)] = mod
    if not targets:
        raise ValueError(
            f"no nn.Linear in the model matches target_modules={config.target_modules!r}; "
            f"its nn.Linear modules are: {', '.join(_linear_patterns(model)) or '(none)'}"
        )

    model.requires_grad_(False)
    ordered: list[tuple[str, FusedResLoRALinear]] = []
    for key, names in targets.items():
        layer = FusedResLoRALinear.from_linear(modules[key], **config.layer_kwargs())
        for name in names:
            set_module(model, name, layer)
        ordered.append((names[0], layer))

    if config.mode != "none":
        groups: dict[str, list[tuple[str, FusedResLoRALinear]]] = defaultdict(list)
        for name, layer in ordered:
            groups[chain_key(name)].append((name, layer))
        for key, members in groups.items():
            runs = [[members[0]]]
            for prev, cur in zip(members, members[1:]):
                prev_layer, cur_layer = prev[1], cur[1]
                if (cur_layer.in_features, cur_layer.out_features) != (prev_layer.in_features, prev_layer.out_features):
                    warnings.warn(
                        f"ResLoRA: {cur[0]} ({cur_layer.in_features}->{cur_layer.out_features}) differs in shape "
                        f"from {prev[0]} ({prev_layer.in_features}->{prev_layer.out_features}); "
                        f"a new chain starts at {cur[0]}",
                        stacklevel=2,
                    )
                    runs.append([])
                runs[-1].append(cur)
            for i, run in enumerate(runs):
                name = key if i == 0 else f"{key}#{i}"
                link_chain([layer for _, layer in run], name=name, block_names=[n for n, _ in run], model=model)
    model.reslora_config = config
    return model


@dataclass
class ResLoRASummary:
    """What :func:`apply_reslora` did to a model."""

    replaced: list[str]
    chains: dict[str, list[str]] = field(default_factory=dict)
    trainable_params: int = 0
    total_params: int = 0

    def __str__(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        lines = [
            f"ResLoRA: {len(self.replaced)} linear layers replaced, {len(self.chains)} chains",
            f"trainable params: {self.trainable_params:,} of {self.total_params:,} ({pct:.4f}%)",
        ]
        for name, members in self.chains.items():
            lines.append(f"  chain {name}: {len(members)} blocks ({members[0]} ... {members[-1]})")
        return "\n".join(lines)


def reslora_summary(model: nn.Module) -> ResLoRASummary:
    """The replaced layers, the chains (name -> block names in order) and the parameter counts."""
    blocks = reslora_blocks(model)
    names = {id(layer): name for name, layer in blocks}
    chains: dict[str, list[str]] = {}
    for _, layer in blocks:
        chain = layer.chain
        if len(chain) > 1 and chain.name not in chains:
            chains[chain.name] = [names.get(id(b), n) for b, n in zip(chain, chain.block_names)]
    params = list(model.parameters())
    return ResLoRASummary(
        replaced=[name for name, _ in blocks],
        chains=chains,
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
    )
