"""A toy ResLoRA model for the tests: L square blocks, x_{n+1} = tanh(y_n)."""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.utils.checkpoint

import reslora_kernels.functional as functional
from reslora_kernels import FusedResLoRALinear, link_chain


class ToyStack(nn.Module):
    def __init__(
        self,
        length,
        features,
        mode,
        pre_num=1,
        rank=4,
        alpha=8.0,
        dropout=0.0,
        bias=True,
        dtype=torch.float64,
        device="cpu",
        norm_window=100,
        checkpoint=None,
    ):
        """``checkpoint``: None, or ``"non-reentrant"`` / ``"reentrant"`` to recompute each block
        (with its tanh) in backward through ``torch.utils.checkpoint``."""
        super().__init__()
        self.checkpoint = checkpoint
        self.blocks = nn.ModuleList(
            FusedResLoRALinear(
                features,
                features,
                bias=bias,
                dtype=dtype,
                device=device,
                rank=rank,
                alpha=alpha,
                dropout=dropout,
                mode=mode,
                pre_num=pre_num,
                norm_window=norm_window,
            )
            for _ in range(length)
        )
        with torch.no_grad():
            for block in self.blocks:  # B = 0 at init would hide every LoRA gradient but dB
                block.lora_B.normal_(0.0, 0.3)
                if block.bias is not None:
                    block.bias.normal_(0.0, 0.1)
        if mode != "none":
            link_chain(list(self.blocks), name="toy", block_names=[f"blocks.{i}" for i in range(length)], model=self)

    def forward(self, x):
        ys = []
        for block in self.blocks:
            if self.checkpoint is None:
                y = block(x)
            else:
                reentrant = self.checkpoint == "reentrant"
                y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=reentrant)
            ys.append(y)
            x = torch.tanh(y)
        return ys


def oracle_params(model: ToyStack):
    """Leaf float64 copies of (W, b, A, B) per block, A and B requiring grad."""
    params = []
    for block in model.blocks:
        bias = None if block.bias is None else block.bias.detach().double().clone()
        params.append(
            (
                block.weight.detach().double().clone(),
                bias,
                block.lora_A.detach().double().clone().requires_grad_(),
                block.lora_B.detach().double().clone().requires_grad_(),
            )
        )
    return params


class SeedRecorder:
    """Replaces functional.draw_dropout_seed with a counter and remembers the seeds it handed out."""

    def __init__(self, monkeypatch, start=1234):
        self.seeds = []
        counter = itertools.count(start)

        def draw(device="cpu"):
            seed = next(counter)
            self.seeds.append(seed)
            return seed

        monkeypatch.setattr(functional, "draw_dropout_seed", draw)
