"""Export a trained ResLoRA model as a standard PEFT LoRA adapter."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from .model import _merge_terms, _named_blocks

__all__ = ["export_peft_adapter"]


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

    names = {id(layer): name for name, layer in _named_blocks(model)}
    terms = _merge_terms(model, method, calibration, ridge)
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
