"""A ResLoRA adapter as a standard PEFT LoRA adapter: what any serving stack loads."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from .io import _check_finite, _write_atomically
from .merge_methods import merge_terms
from .model_utils import refuse_sharded, reslora_blocks, saved_modules, unwrap_model

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
    module has scaling 1, the ResLoRA scaling being folded into ``lora_B``: ``lora_alpha`` equal to
    its rank, or, for a model trained with rsLoRA (``use_rslora``, which the config then says too),
    to the square root of its rank. Weights are saved in float32. Every module to save
    (``modules_to_save``) is written as PEFT writes one (``base_model.model.<module>.<key>``, its
    trained values in its dtype) and listed in ``modules_to_save``; ``task_type`` is the model's
    config's. ``method``, ``calibration`` and ``ridge`` are those of
    :func:`reslora_kernels.merge_and_unload`; the model is not changed. A merge term holding
    Inf/NaN is an error naming the block, raised before anything is written.
    """
    from safetensors.torch import save

    refuse_sharded(model, "export_peft_adapter")
    model = unwrap_model(model)
    names = {id(layer): name for name, layer in reslora_blocks(model)}
    if "" in names.values():
        raise ValueError(
            "export_peft_adapter needs the model a layer sits in: a bare FusedResLoRALinear has no module name "
            "for PEFT's target_modules. Put it in a module (e.g. nn.Sequential(layer)) and export that"
        )
    terms = merge_terms(model, method, calibration, ridge)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    fan_in_fan_out = False
    for block, term in terms:
        fan_in_fan_out |= block.fan_in_fan_out
        name = names[id(block)]
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = term.lora_A.float().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = (term.coef * term.lora_B.float()).cpu().contiguous()
        for key in (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"):
            _check_finite(f"cannot export {name}: its merged {key.rsplit('.', 2)[-2]}", tensors[key])
        ranks[name] = term.lora_A.shape[0]
    saved = saved_modules(model)
    for name, wrapper in saved:
        for key, tensor in wrapper.trained_module.state_dict().items():
            _check_finite(f"cannot export {name}.{key} (modules_to_save)", tensor)
            tensors[f"base_model.model.{name}.{key}"] = tensor.detach().cpu().contiguous()
    rank = Counter(ranks.values()).most_common(1)[0][0]
    # With every scaling folded into lora_B, PEFT's scaling must be 1: alpha / r, or alpha / sqrt(r).
    rslora = all(block.use_rslora for block, _ in terms)
    alpha = (lambda r: math.sqrt(r)) if rslora else (lambda r: r)
    # PEFT reads pattern keys as regular expressions: escape the module names.
    pattern = {re.escape(name): r for name, r in ranks.items() if r != rank}
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    reslora_config = vars(model).get("reslora_config")
    config = {
        "peft_type": "LORA",
        "task_type": reslora_config.task_type if reslora_config is not None else None,
        "base_model_name_or_path": base,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha(rank),
        "rank_pattern": pattern,
        "alpha_pattern": {key: alpha(r) for key, r in pattern.items()},
        "lora_dropout": 0.0,
        "target_modules": list(ranks),
        "bias": "none",
        # PEFT's flag for Conv1D bases ([in, out] weights); PEFT sets it per module where a model
        # mixes Linear and Conv1D targets (with a warning). The LoRA factors are the same either way.
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": [name for name, _ in saved] or None,
    }
    weights = save(tensors, metadata={"format": "pt"})
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomically(
        {
            out / "adapter_model.safetensors": weights,
            out / "adapter_config.json": (json.dumps(config, indent=2) + "\n").encode(),
        }
    )
