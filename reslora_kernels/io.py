"""Adapters on disk: save and load ResLoRA adapters, export them as a standard PEFT LoRA adapter."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from .apply import apply_reslora, reslora_blocks
from .config import ResLoRAConfig
from .layer import FusedResLoRALinear
from .merging import chains_of, merge_terms

__all__ = ["save_reslora", "load_reslora", "export_peft_adapter", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "reslora_config.json"
WEIGHTS_NAME = "reslora_adapter.safetensors"
_FORMAT_VERSION = 1


def _block_record(name: str, layer: FusedResLoRALinear) -> dict:
    return {
        "name": name,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "rank": layer.rank,
        "alpha": layer.alpha,
        "dropout": layer.dropout,
        "mode": layer.mode,
        "pre_num": layer.pre_num,
        "norm_window": layer.norm_window,
    }


def _chain_records(blocks: list[tuple[str, FusedResLoRALinear]]) -> list[dict]:
    names = {id(layer): name for name, layer in blocks}
    return [
        {"name": chain.name, "blocks": [names.get(id(b), "<outside the model>") for b in chain]}
        for chain in chains_of(blocks)
        if len(chain) > 1
    ]


def save_reslora(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter (``lora_A``, ``lora_B`` and the merge statistics of every block) to
    ``path/reslora_adapter.safetensors`` and the config, block list and chains to
    ``path/reslora_config.json``. :func:`load_reslora` reads them back bit-exactly."""
    from safetensors.torch import save_file

    blocks = reslora_blocks(model)
    if not blocks:
        raise ValueError("the model has no ResLoRA layers to save")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in blocks:
        for key, tensor in layer.state_dict().items():
            if key not in ("weight", "bias"):
                tensors[f"{name}.{key}"] = tensor.detach().cpu().contiguous()
    config = getattr(model, "reslora_config", None)
    meta = {
        "format_version": _FORMAT_VERSION,
        "config": config.to_dict() if config is not None else None,
        "blocks": [_block_record(name, layer) for name, layer in blocks],
        "chains": _chain_records(blocks),
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")


@torch.no_grad()
def load_reslora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter written by :func:`save_reslora` into ``model`` and return it.

    A model without ResLoRA layers first gets :func:`apply_reslora` with the saved config; a model
    that has them (built or linked by hand) must have the same blocks, settings and chains.
    Any difference is an error naming it.
    """
    from safetensors.torch import load_file

    src = Path(path)
    if not (src / CONFIG_NAME).is_file() or not (src / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{src} does not hold {CONFIG_NAME} and {WEIGHTS_NAME}")
    meta = json.loads((src / CONFIG_NAME).read_text())
    if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"{src / CONFIG_NAME} has format_version {meta.get('format_version')!r}, expected {_FORMAT_VERSION}"
        )
    if not reslora_blocks(model):
        if meta["config"] is None:
            raise ValueError(
                f"{src} was saved from layers built by hand (no ResLoRAConfig); build and link them, then load"
            )
        apply_reslora(model, ResLoRAConfig.from_dict(meta["config"]))
    blocks = reslora_blocks(model)
    saved = {record["name"]: record for record in meta["blocks"]}
    have = {name for name, _ in blocks}
    missing, unexpected = sorted(set(saved) - have), sorted(have - set(saved))
    if missing or unexpected:
        raise ValueError(
            f"ResLoRA blocks differ from {src}: missing in the model {missing}, not in the adapter {unexpected}"
        )
    for name, layer in blocks:
        if _block_record(name, layer) != saved[name]:
            raise ValueError(f"{name} has settings {_block_record(name, layer)} but the adapter has {saved[name]}")
    chains = sorted(map(json.dumps, _chain_records(blocks)))
    if chains != sorted(map(json.dumps, meta["chains"])):
        raise ValueError(f"the model's ResLoRA chains differ from those saved in {src}")
    tensors = load_file(str(src / WEIGHTS_NAME))
    for name, layer in blocks:
        for key, target in layer.state_dict(keep_vars=True).items():
            if key in ("weight", "bias"):
                continue
            source = tensors.pop(f"{name}.{key}", None)
            if source is None or source.shape != target.shape:
                raise ValueError(f"{src / WEIGHTS_NAME}: {name}.{key} is missing or has the wrong shape")
            target.copy_(source)
    if tensors:
        raise ValueError(f"{src / WEIGHTS_NAME} holds unexpected tensors: {sorted(tensors)}")
    return model


@torch.no_grad()
def export_peft_adapter(
    model: nn.Module, path: str | os.PathLike, method: str = "auto", *, calibration=None, ridge: float = 1e-3
) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's LoRA format, such
    that ``PeftModel.from_pretrained(base_model, path)`` on the model's base (the same model
    without ResLoRA) outputs what ``merge_and_unload(model, method)`` would.

    Each block becomes one LoRA module of the rank its merge term has: ``r`` for none, is and ms
    (``(1 + a_n)`` or the lstsq correction folded in), the concatenated rank ``r * (min(m, n) + 1)``
    for bs (exact). Ranks that differ from the most common one go to ``rank_pattern``; every
    module has scaling 1 (``lora_alpha`` equal to its rank), the ResLoRA scaling being folded into
    ``lora_B``. Weights are saved in float32. ``method``, ``calibration`` and ``ridge`` are those of
    :func:`reslora_kernels.merge_and_unload`; the model is not changed.
    """
    from safetensors.torch import save_file

    names = {id(layer): name for name, layer in reslora_blocks(model)}
    terms = merge_terms(model, method, calibration, ridge)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for block, term in terms:
        name = names[id(block)]
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = term.lora_A.float().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = (term.coef * term.lora_B.float()).cpu().contiguous()
        ranks[name] = term.lora_A.shape[0]
    rank = Counter(ranks.values()).most_common(1)[0][0]
    # PEFT reads pattern keys as regular expressions: escape the module names.
    pattern = {re.escape(name): r for name, r in ranks.items() if r != rank}
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "lora_dropout": 0.0,
        "target_modules": list(ranks),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
