"""Forward+backward of one layer on CPU: the frozen nn.Linear floor against the reference ResLoRA
path in each mode, in chain context (a real predecessor)."""

import pytest
import torch
import torch.nn as nn
from conftest import DEVICE

from reslora_kernels import FusedResLoRALinear, link_chain

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the CPU suite; GPUs run the GPU suite")

M, K, N, RANK = 512, 256, 256, 16


def make_step(mode):
    """Two blocks; the timed step runs the first forward-only and the second forward+backward, so
    the second block's shortcut inputs are real. The floor runs two frozen nn.Linear the same way."""
    x = torch.randn(M, K, requires_grad=True)
    if mode == "frozen":
        first, second = (nn.Linear(K, N).requires_grad_(False) for _ in range(2))
    else:
        first, second = (FusedResLoRALinear(K, N, rank=RANK, mode=mode) for _ in range(2))
        if mode != "none":
            link_chain([first, second])
        nn.init.normal_(second.lora_B)

    def step():
        with torch.no_grad():
            first(x)
        second(x).sum().backward()

    return step


@pytest.mark.parametrize("mode", ["frozen", "none", "is", "bs", "ms"])
def test_fwd_bwd(benchmark, mode):
    benchmark.group = f"layer fwd+bwd CPU M={M} K={K} N={N} r={RANK}"
    benchmark(make_step(mode))
