"""The base layers a ResLoRA block can compose, and how each is read.

A block keeps its base layer as a submodule (``base_layer``) and runs its forward only while the
adapter is disabled: otherwise it reads the base's weight as an ``[out, in]`` tensor and its bias,
and computes ``x W^T + b`` itself beside the LoRA branch. Every kind of base is known here
(:func:`base_kind`): ``nn.Linear`` (weight ``[out, in]``), transformers' ``Conv1D`` (GPT-2, weight
``[in, out]``: read as its transposed view, nothing copied), and the quantized bitsandbytes
``Linear4bit`` and ``Linear8bitLt``, whose weight is read by dequantizing it into a reusable buffer
(``reslora_kernels.quant``, per call by the layer: ``reslora_kernels.quantized``).
:func:`adapter_dtype` is the dtype a block's ``lora_A`` / ``lora_B`` get over each kind. Only torch
and ``quant`` are imported (transformers and bitsandbytes are looked up, never imported).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from .quant import dequantize, describe, quantized_kind, quantized_problem

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


def base_kind(module: object) -> str | None:
    """The kind of base layer ``module`` is: ``"Linear"``, ``"Conv1D"``, ``"Linear4bit"`` or
    ``"Linear8bitLt"`` (the quantized kinds, subclasses included), else ``None``."""
    quantized = quantized_kind(module)
    if quantized is not None:
        return quantized
    if is_conv1d(module):
        return "Conv1D"
    return "Linear" if isinstance(module, nn.Linear) else None


def is_quantized(module: object) -> bool:
    """Whether ``module`` is a quantized base (bitsandbytes ``Linear4bit`` or ``Linear8bitLt``)."""
    return quantized_kind(module) is not None


def base_weight(base: nn.Module, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The base's weight as ``[out, in]``: the Parameter (a ``Conv1D``'s transposed view) of a
    float base; a quantized base's weight dequantized into ``out`` (a reusable ``[out, in]`` buffer
    in the compute dtype; a new tensor of the compute dtype without one)."""
    if is_quantized(base):
        return dequantize(base, out=out)
    if out is not None:
        raise ValueError(f"a {type(base).__name__} is read in place: out= is for quantized bases")
    return base.weight.t() if is_conv1d(base) else base.weight


def base_dtype(base: nn.Module) -> torch.dtype:
    """The floating dtype of the base's weight: the Parameter's, or for a quantized base the dtype
    it computes in (``Linear4bit.compute_dtype``, else the dtype it was quantized from, the bias's,
    or float32)."""
    if not is_quantized(base):
        return base.weight.dtype
    info = describe(base)
    if info.compute_dtype is not None:
        return info.compute_dtype
    if info.quant_dtype is not None:
        return info.quant_dtype
    bias = getattr(base, "bias", None)
    return bias.dtype if bias is not None and bias.is_floating_point() else torch.float32


#: Base dtypes whose adapters are kept in float32 by default (PEFT's ``autocast_adapter_dtype``).
LOW_PRECISION = (torch.float16, torch.bfloat16)


def adapter_dtype(base: nn.Module, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype of a block's ``lora_A`` / ``lora_B`` over ``base``: float32 over a 16-bit or a
    quantized base when ``autocast_adapter_dtype`` (the default: bf16 optimizer steps round small
    updates of small weights away), else the base's dtype (:func:`base_dtype`)."""
    dtype = base_dtype(base)
    if autocast_adapter_dtype and (dtype in LOW_PRECISION or is_quantized(base)):
        return torch.float32
    return dtype


def base_features(base: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a linear base layer."""
    if is_conv1d(base):
        return tuple(base.weight.shape)
    return base.in_features, base.out_features


def base_problem(base: object) -> str | None:
    """Why ``base`` cannot be a block's base layer (``None``: it can): the float kinds above, with a
    floating-point weight Parameter, or a quantized base whose weight can be read."""
    if is_quantized(base):
        problem = quantized_problem(base)
        if problem is not None:
            return f"a {type(base).__name__} that cannot be read: {problem}"
        return None
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
    kaiming-uniform; ``Conv1D``: normal with std 0.02 and a zero bias). A quantized base has no
    float weight to re-initialise."""
    if is_quantized(base):
        raise TypeError(f"a quantized {type(base).__name__} cannot be re-initialised")
    if is_conv1d(base):
        nn.init.normal_(base.weight, std=0.02)
        nn.init.zeros_(base.bias)
    else:
        base.reset_parameters()
