"""torch.compile: no graph breaks, few compiles over varying sequence lengths, and the eager
model's losses and gradients."""

import copy

import pytest
import torch
from conftest import rel_err
from toy import ToyStack

torch_dynamo = pytest.importorskip("torch._dynamo")


@pytest.fixture
def dynamo():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # Inductor draws random numbers its own way by default; eager's stream makes losses comparable.
    with torch._inductor.config.patch(fallback_random=True):
        yield counters
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "mode, pre_num, p", [("none", 1, 0.1), ("is", 1, 0.0), ("is", 1, 0.1), ("bs", 2, 0.1), ("ms", -1, 0.1)]
)
def test_compiled_training_matches_eager(dynamo, mode, pre_num, p):
    eager = ToyStack(3, 16, mode, pre_num, dropout=p, dtype=torch.float32).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    for step, length in enumerate([5, 7, 9]):
        x = torch.randn(2, length, 16)
        losses = []
        for model in (eager, compiled):
            torch.manual_seed(step)
            losses.append(sum((y * (n + 1)).sum() for n, y in enumerate(model(x))))
            losses[-1].backward()
        assert rel_err(losses[1], losses[0]) < 1e-5
    for a, b in zip(eager.blocks, compiled_model.blocks):
        assert rel_err(b.lora_A.grad, a.lora_A.grad) < 1e-5 and rel_err(b.lora_B.grad, a.lora_B.grad) < 1e-5
    assert not dynamo["graph_break"], dict(dynamo["graph_break"])
    # One static graph for the first length, one dynamic-shape graph for all the others.
    assert dynamo["stats"]["unique_graphs"] <= 2
