"""What ResLoRA did to a model: the blocks, their chains, the parameter counts, the non-finite norms
the merge statistics left out."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from .model_utils import reslora_blocks, saved_modules, unwrap_model, whole_parameters
from .statistics import skipped_norms
from .targets import describe_targets

__all__ = ["ResLoRASummary", "reslora_summary"]


@dataclass
class ResLoRASummary:
    """What :func:`reslora_kernels.apply_reslora` did to a model."""

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
    #: The modules trained in full beside the adapters (``modules_to_save``), by name.
    modules_to_save: list[str] = field(default_factory=list)

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
        if self.modules_to_save:
            lines.append(f"  trained in full (modules_to_save): {', '.join(self.modules_to_save)}")
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
        targets=describe_targets(unwrap_model(model)),
        modules_to_save=[name for name, _ in saved_modules(model)],
    )
