"""use_rslora: the LoRA branch is scaled by alpha / sqrt(r), r the rank of one block's adapter in every
mode (bs too: its blocks sum adapters of rank r each, not one adapter of the concatenated rank)."""

import math

import pytest
import torch
import torch.nn as nn
from oracle import toy_stack

from reslora_kernels import BlockSettings, FusedResLoRALinear, ResLoRAConfig, link_chain, merge_and_unload


def test_scaling_and_validation():
    assert BlockSettings(rank=16, alpha=8.0, use_rslora=True).scaling == 8.0 / 4.0
    assert BlockSettings(rank=16, alpha=8.0).scaling == 0.5
    assert ResLoRAConfig(rank=9, alpha=3.0, use_rslora=True).block_settings().scaling == 1.0
    with pytest.raises(TypeError, match="use_rslora must be a bool, got int"):
        BlockSettings(use_rslora=1)
    block = FusedResLoRALinear(4, 4, rank=4, alpha=2.0, use_rslora=True)
    assert block.use_rslora and block.scaling == 1.0


class Stack(nn.Module):
    def __init__(self, mode, rank, alpha, pre_num, use_rslora, length=4, width=10):
        super().__init__()
        self.blocks = nn.ModuleList(
            FusedResLoRALinear(
                width, width, dtype=torch.float64, mode=mode, rank=rank, alpha=alpha, pre_num=pre_num,
                use_rslora=use_rslora,
            )
            for _ in range(length)
        )
        with torch.no_grad():
            for block in self.blocks:
                block.lora_B.normal_(0.0, 0.3)
        if mode != "none":
            link_chain(list(self.blocks), name="stack", block_names=[f"blocks.{i}" for i in range(length)], model=self)

    def forward(self, x):
        ys = []
        for block in self.blocks:
            ys.append(block(x))
            x = torch.tanh(ys[-1])
        return ys


@pytest.mark.parametrize("mode, pre_num", [("none", 1), ("is", 1), ("bs", 1), ("bs", -1), ("ms", 2)])
def test_every_block_scales_by_alpha_over_sqrt_of_its_own_rank(mode, pre_num):
    torch.manual_seed(0)
    rank, alpha = 4, 6.0
    model = Stack(mode, rank, alpha, pre_num, use_rslora=True)
    x = torch.randn(5, 10, dtype=torch.float64)
    params = [(b.weight.detach(), b.bias.detach(), b.lora_A.detach(), b.lora_B.detach()) for b in model.blocks]
    expected = toy_stack(x, params, alpha / math.sqrt(rank), mode, pre_num)
    for got, want in zip(model(x), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Not the scaling of the concatenated rank: block 3 of a bs chain (pre_num -1) sums 4 adapters.
    assert all(block.scaling == alpha / 2.0 for block in model.blocks)
    plain = toy_stack(x, params, alpha / rank, mode, pre_num)
    assert not torch.allclose(model(x)[-1], plain[-1])


@pytest.mark.parametrize("mode", ["none", "bs"])
def test_exact_merge_uses_the_rslora_scaling(mode):
    torch.manual_seed(0)
    model = Stack(mode, 4, 6.0, -1, use_rslora=True).eval()
    x = torch.randn(3, 10, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        merged = merge_and_unload(model)
        after = merged(x)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
