"""Optimizer parameter groups for a ResLoRA model: LoRA+ (Hayou et al., 2024, arXiv 2402.12354)."""

from __future__ import annotations

import math

import torch.nn as nn

from .model_utils import reslora_blocks

__all__ = ["loraplus_param_groups"]


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups for LoRA+: ``lora_B`` of every block at ``lr * ratio``, ``lora_A`` at ``lr``.

    ``lr_B / lr_A = ratio`` (the paper's lambda; 16 is its suggestion, with ``lr`` about half plain
    LoRA's). Every other trainable parameter (the modules to save: a head trained in full, or
    anything unfrozen by hand) is no LoRA factor and trains at ``lr``. PEFT's
    ``create_loraplus_optimizer`` also works on a ResLoRA model and gives the same ``lora_A`` /
    ``lora_B`` groups; it differs in putting every one-dimensional trainable parameter (a head's
    bias) at ``lr * ratio`` as well.

    Returns a list of groups (``{"name", "params", "lr", "weight_decay"}``, empty groups left out)
    for any ``torch.optim`` optimizer: ``torch.optim.AdamW(loraplus_param_groups(model, 1e-4))``.
    Every trainable parameter is in exactly one group; frozen ones in none.
    """
    for value, what in ((lr, "lr"), (ratio, "ratio")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{what} must be a positive number, got {value!r}")
    blocks = reslora_blocks(model)
    if not blocks:
        raise ValueError("the model has no ResLoRA layers: LoRA+ groups the lora_A and lora_B of its blocks")
    lora_A = {id(block.lora_A) for _, block in blocks}
    lora_B = {id(block.lora_B) for _, block in blocks}
    groups = {"lora_A": [], "lora_B": [], "other": []}
    for param in model.parameters():  # each Parameter once, in model order
        if not param.requires_grad:
            continue
        key = "lora_A" if id(param) in lora_A else "lora_B" if id(param) in lora_B else "other"
        groups[key].append(param)
    rates = {"lora_A": lr, "lora_B": lr * ratio, "other": lr}
    return [
        {"name": key, "params": params, "lr": rates[key], "weight_decay": weight_decay}
        for key, params in groups.items()
        if params
    ]
