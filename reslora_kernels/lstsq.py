"""Calibration of the lstsq merge (docs/design.md section 8): one streaming pass over calibration
batches accumulating, per block, the sums the least-squares map ``P_n`` is solved from."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .base_layers import base_dtype
from .model_utils import run_batch

if TYPE_CHECKING:
    from .layer import FusedResLoRALinear

__all__: list[str] = []  # merge_and_unload(method="lstsq") and merge_report are the user-facing way in

#: The modes whose blocks have a shortcut term for lstsq to fit.
LSTSQ_MODES = ("is", "ms")


class LstsqStatistics:
    """Streaming sums of one block for the lstsq merge, in float32 (float64 for a float64 model) on
    the block's device:
    ``gram = sum_t x_t x_t^T`` ``[in, in]`` and ``cross = sum_t S_t x_t^T`` ``[r, in]``, where ``S_t``
    is the block's shortcut term in rank space (``A_n x_{n-1}`` for is, ``sum_k z_{n-k}`` for ms)."""

    def __init__(self, block: "FusedResLoRALinear") -> None:
        # lora_A sits with the base weight; base_dtype reads a quantized base's without dequantizing it.
        dtype = torch.promote_types(base_dtype(block.base_layer), torch.float32)
        factory = {"device": block.lora_A.device, "dtype": dtype}
        self.gram = torch.zeros((block.in_features, block.in_features), **factory)
        self.cross = torch.zeros((block.rank, block.in_features), **factory)
        self.tokens = 0

    def observe(self, x: torch.Tensor, target: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).to(self.gram.dtype)
        t2 = target.reshape(-1, target.shape[-1]).to(self.gram.dtype)
        self.gram.addmm_(x2.t(), x2)
        self.cross.addmm_(t2.t(), x2)
        self.tokens += x2.shape[0]

    def solve(self, ridge: float) -> torch.Tensor:
        """``P = cross (gram + lam I)^-1`` in float64 with ``lam = ridge * trace(gram) / in``, the
        ridge relative to the mean eigenvalue so that it does not depend on the inputs' scale."""
        gram = self.gram.double()
        lam = ridge * float(gram.diagonal().mean())
        if lam <= 0.0:
            lam = ridge
        gram.diagonal().add_(lam)
        # gram is symmetric positive definite once lam > 0: P^T = gram^-1 cross^T by Cholesky.
        factor = torch.linalg.cholesky(gram)
        return torch.cholesky_solve(self.cross.double().t(), factor).t()


def _observe_shortcut(stats: LstsqStatistics):
    def hook(block, x, x_prev, z_prev):
        # The shortcut term the merged weight must reproduce, in rank space.
        acc = torch.promote_types(x.dtype, torch.float32)
        target = x_prev.to(acc) @ block.lora_A.to(acc).t() if block.mode == "is" else z_prev
        stats.observe(x, target)

    return hook


@torch.no_grad()
def calibrate_lstsq(
    model: nn.Module, blocks: list["FusedResLoRALinear"], batches: Iterable
) -> dict[int, LstsqStatistics]:
    """One streaming pass of ``batches`` through ``model`` (eval mode, no grad) that accumulates
    :class:`LstsqStatistics` for every block of ``blocks`` with a shortcut term (is/ms blocks
    after the first of their chain). Keyed by ``id(block)``; no activation is kept."""
    if batches is None:
        raise ValueError("method 'lstsq' needs calibration=<an iterable of model inputs>")
    stats: dict[int, LstsqStatistics] = {}
    handles = []
    for block in blocks:
        if block.mode in LSTSQ_MODES and block.chain_index > 0:
            stats[id(block)] = LstsqStatistics(block)
            handles.append(block.register_shortcut_hook(_observe_shortcut(stats[id(block)])))
    was_training = model.training
    model.eval()
    count = 0
    try:
        for batch in batches:
            run_batch(model, batch)
            count += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("calibration is empty: lstsq needs at least one batch of model inputs")
    return stats
