"""The base layers a ResLoRA block can compose, and how each is read.

A block keeps its base layer as a submodule (``base_layer``) and runs its forward only while the
adapter is disabled: otherwise it reads the base's weight as an ``[out, in]`` tensor and its bias,
and computes ``x W^T + b`` itself beside the LoRA branch. Every kind of base is known here:
``nn.Linear`` (weight ``[out, in]``) and transformers' ``Conv1D`` (GPT-2, weight ``[in, out]``: read
as its transposed view, nothing copied).
A leaf: only torch is imported (transformers is looked up, never imported).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

__all__: list[str] = []  # helpers of the model-level modules; nothing here is user-facing


def is_conv1d(module: object) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layer, weight ``[in, out]``).
    Checked without importing transformers: a model holding one has imported it already."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer ResLoRA can compose: an ``nn.Linear`` or a transformers
    ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def base_features(base: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a linear base layer."""
    if is_conv1d(base):
        return tuple(base.weight.shape)
    return base.in_features, base.out_features


def base_problem(base: object) -> str | None:
    """Why ``base`` cannot be a block's base layer (``None``: it can): the kinds above, with a
    floating-point weight Parameter."""
    if not is_linear(base):
        return f"a {type(base).__name__}, not an nn.Linear or a transformers Conv1D"
    weight = base.weight
    if not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
        dtype = getattr(weight, "dtype", None)
        return f"its weight is a {type(weight).__name__} of {dtype}, not a floating-point Parameter"
    return None


@torch.no_grad()
def reset_base_parameters(base: nn.Module) -> None:
    """Re-initialise the base's weight and bias as its own constructor does (``nn.Linear``:
    kaiming-uniform; ``Conv1D``: normal with std 0.02 and a zero bias)."""
    if is_conv1d(base):
        nn.init.normal_(base.weight, std=0.02)
        nn.init.zeros_(base.bias)
    else:
        base.reset_parameters()
