"""torch.compile: no graph breaks, few compiles over varying sequence lengths, and the eager
model's losses and gradients."""

import copy

import pytest
import torch
from helpers import ToyStack, rel_err

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
    "backend, mode, pre_num, p",
    [
        ("composed", "none", 1, 0.1),
        ("composed", "is", 1, 0.0),
        ("composed", "is", 1, 0.1),
        ("composed", "bs", 2, 0.1),
        ("composed", "ms", -1, 0.1),
        ("reference", "is", 1, 0.1),
        ("reference", "ms", -1, 0.1),
    ],
)
def test_compiled_training_matches_eager(dynamo, monkeypatch, backend, mode, pre_num, p):
    monkeypatch.setenv("RESLORA_BACKEND", backend)
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


# ---------------------------------------------------------------------------- the fused custom ops
triton = pytest.importorskip("triton")
from helpers import KERNEL_DEVICE  # noqa: E402

from reslora_kernels import fused  # noqa: E402


def _op_args(mode, p, sqnorm):
    M, K, N, R = 10, 24, 20, 8
    dev = KERNEL_DEVICE

    def t(*shape, grad=True):
        return torch.randn(*shape, device=dev, requires_grad=grad)

    x_prev = t(M, K) if mode == "is" else None
    z_prev = t(M, R) if mode == "ms" else None
    seed = torch.tensor(7, device=dev) if p > 0 else None
    return (t(M, K), t(N, K, grad=False), t(N, grad=False), t(R, K), t(N, R), x_prev, z_prev, seed, 2.0, 1.0, p, sqnorm)


@pytest.mark.parametrize("mode, p, sqnorm", [("none", 0.0, False), ("is", 0.2, True), ("ms", 0.0, False)])
def test_fused_custom_ops_pass_opcheck(mode, p, sqnorm):
    torch.library.opcheck(torch.ops.reslora_kernels.fused_forward, _op_args(mode, p, sqnorm))


@pytest.mark.parametrize("mode", ["is", "ms"])
def test_fused_op_and_eager_function_agree(mode):
    args = _op_args(mode, 0.2, True)
    eager = fused.FusedResLoRAFunction.apply(*args)
    op = torch.ops.reslora_kernels.fused_forward(*args)
    for a, b in zip(eager, op):
        assert torch.equal(a, b)
    grads = []
    for outputs in (eager, op):
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        grads.append(torch.autograd.grad(outputs[0].sum() + outputs[1].square().sum(), leaves))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode, p", [("is", 0.1), ("ms", 0.0)])
def test_compiled_fused_training_matches_eager(dynamo, monkeypatch, mode, p):
    monkeypatch.setenv("RESLORA_BACKEND", "triton")
    eager = ToyStack(3, 16, mode, dropout=p, dtype=torch.float32, device=KERNEL_DEVICE).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    for step, length in enumerate([5, 7, 9]):
        x = torch.randn(2, length, 16, device=KERNEL_DEVICE)
        losses = []
        for model in (eager, compiled):
            torch.manual_seed(step)
            losses.append(sum((y * (n + 1)).sum() for n, y in enumerate(model(x))))
            losses[-1].backward()
        assert rel_err(losses[1], losses[0]) < 1e-5
    for a, b in zip(eager.blocks, compiled_model.blocks):
        assert rel_err(b.lora_A.grad, a.lora_A.grad) < 1e-5 and rel_err(b.lora_B.grad, a.lora_B.grad) < 1e-5
    assert not dynamo["graph_break"], dict(dynamo["graph_break"])
    assert dynamo["stats"]["unique_graphs"] <= 2
