"""M = 0 (an empty batch): empty outputs and zero gradients in every mode, on every backend."""

import pytest
import torch
from helpers import ToyStack

from reslora_kernels import set_backend

BACKENDS = ["reference", "composed", "fused"]


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("mode", ["none", "is", "bs", "ms"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_every_mode(monkeypatch, backend, mode, p):
    if backend == "fused":
        pytest.importorskip("triton")
    set_backend(backend)
    model = ToyStack(3, 8, mode, pre_num=-1, dropout=p, dtype=torch.float32).train()
    x = torch.randn(2, 0, 8, requires_grad=True)
    ys = model(x)
    assert all(y.shape == (2, 0, 8) for y in ys)
    sum(y.sum() for y in ys).backward()
    assert x.grad.shape == (2, 0, 8)
    for block in model.blocks:
        assert torch.count_nonzero(block.lora_A.grad) == 0 and torch.count_nonzero(block.lora_B.grad) == 0
