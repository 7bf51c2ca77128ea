"""What a block over a quantized base becomes when merged: a 16-bit ``nn.Linear`` (the default), or
on request the same bitsandbytes kind again, requantized.

Merging back into 4 bits, as PEFT does, rounds away most of an adapter of typical norm: a merge term
below half a code step of its block vanishes. So the merged weight ``W' = dequantize(W) + c B A``
(folded in float32, rounded once to the compute dtype) goes into an ``nn.Linear`` of the compute
dtype with the base's bias; :func:`requantized_module` quantizes it again with the base's format,
block size and double quantization (bitsandbytes' own quantization) and measures what that lost.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from .quant import dequantize, describe

__all__: list[str] = []  # merge_and_unload(requantize=...) is the user-facing way in


def merged_linear(base: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` of ``weight``'s dtype holding the merged ``weight [out, in]`` and
    ``base``'s bias (cast to that dtype), frozen, on the base's device."""
    out_features, in_features = weight.shape
    bias = base.bias
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(weight.dtype, copy=True), requires_grad=False)
    return linear


def requantized_module(base: nn.Module, weight: torch.Tensor) -> tuple[nn.Module, float]:
    """A new bitsandbytes module of ``base``'s kind and settings holding ``weight`` quantized, and
    the share of the merge term the quantization lost:
    ``||dequantize(new) - W'|| / ||W' - dequantize(base)||`` (``W'`` = ``weight``)."""
    bnb = sys.modules["bitsandbytes"]
    info = describe(base)
    device = info.device
    bias = base.bias
    if info.kind == "Linear4bit":
        new = bnb.nn.Linear4bit(
            info.shape[1], info.shape[0], bias=bias is not None, compute_dtype=info.compute_dtype,
            compress_statistics=info.double_quant, quant_type=info.format, quant_storage=info.storage_dtype,
            device="cpu",
        )  # fmt: skip
        new.weight = bnb.nn.Params4bit(
            weight.detach().to("cpu", info.quant_dtype), requires_grad=False, compress_statistics=info.double_quant,
            quant_type=info.format, blocksize=info.blocksize, quant_storage=info.storage_dtype, module=new,
        )  # fmt: skip
    else:
        new = bnb.nn.Linear8bitLt(
            info.shape[1], info.shape[0], bias=bias is not None, has_fp16_weights=False,
            threshold=getattr(getattr(base, "state", None), "threshold", 0.0), device="cpu",
        )  # fmt: skip
        new.weight = bnb.nn.Int8Params(weight.detach().to("cpu"), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().to("cpu", copy=True), requires_grad=False)
    new = new.to(device)  # bitsandbytes quantizes when the module is moved to a device
    merged = weight.float()
    term = merged - dequantize(base, torch.float32)
    lost = dequantize(new, torch.float32) - merged
    term_norm = float(torch.linalg.vector_norm(term))
    share = float(torch.linalg.vector_norm(lost)) / term_norm if term_norm > 0 else 0.0
    return new, share
