"""torch.compile: no graph breaks, few compiles over varying sequence lengths, and the eager
model's losses and gradients."""

import copy

import pytest
import torch
from helpers import ToyStack, rel_err

from reslora_kernels import set_backend

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
    set_backend(backend)
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


def _op_args(mode, p, sqnorm, grad=True):
    """The forward op's arguments: (x, weight, bias, lora_A, lora_B, x_prev, z_prev, seed,
    scaling, input_scale, dropout_p, compute_x_sqnorm)."""
    M, K, N, R = 10, 24, 20, 8
    dev = KERNEL_DEVICE

    def t(*shape, grad=grad):
        return torch.randn(*shape, device=dev, requires_grad=grad)

    x_prev = t(M, K) if mode == "is" else None
    z_prev = t(M, R) if mode == "ms" else None
    seed = torch.tensor(7, device=dev) if p > 0 else None
    return (t(M, K), t(N, K, grad=False), t(N, grad=False), t(R, K), t(N, R), x_prev, z_prev, seed, 2.0, 1.0, p, sqnorm)


def _backward_args(mode, p):
    x, weight, _, lora_A, lora_B, x_prev, z_prev, seed, scaling, input_scale, p, _ = _op_args(mode, p, False, False)
    z = torch.randn(x.shape[0], lora_A.shape[0], device=x.device)
    needs = [True, x_prev is not None, False, True, True, True, z_prev is not None]
    grad_y = torch.randn(x.shape[0], weight.shape[0], device=x.device)
    return (grad_y, None, x, x_prev, weight, lora_A, lora_B, z, z_prev, seed, scaling, input_scale, p, needs)


@pytest.mark.parametrize("mode, p, sqnorm", [("none", 0.0, False), ("is", 0.2, True), ("ms", 0.0, False)])
def test_fused_ops_pass_opcheck(mode, p, sqnorm):
    """The registered ops' schemas, fake implementations and traced forms match their bodies (the
    autograd Function owns their gradients, so they are checked on inputs that need none)."""
    torch.library.opcheck(torch.ops.reslora_kernels.fused_forward, _op_args(mode, p, sqnorm, grad=False))
    torch.library.opcheck(torch.ops.reslora_kernels.fused_backward, _backward_args(mode, p))


@pytest.mark.parametrize("mode", ["is", "ms"])
def test_eager_function_runs_the_registered_ops_bodies(mode):
    """One Function for eager and compiled calls: eagerly it runs the op bodies without the
    dispatcher's round trip (no registered op is dispatched), and what it returns, forward and
    backward, equals what the registered ops (what torch.compile's graph calls) return."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x, weight, bias, lora_A, lora_B, x_prev, z_prev, seed, scaling, input_scale, p, sqnorm = _op_args(mode, 0.2, True)
    grad_y = torch.randn(x.shape[0], weight.shape[0], device=x.device)
    with Ops() as ops_seen:
        y, z, x_sqnorm = fused.fused_reslora_linear(
            x, weight, bias, lora_A, lora_B, scaling, x_prev=x_prev, z_prev=z_prev, dropout_p=p, dropout_seed=seed,
            compute_x_sqnorm=sqnorm,
        )  # fmt: skip
        torch.autograd.backward((y, z), (grad_y, 2 * z.detach()))
    assert [name for name in ops_seen.seen if name.startswith("reslora_kernels.")] == []

    detached = [None if t is None else t.detach() for t in (x, weight, bias, lora_A, lora_B, x_prev, z_prev)]
    x_d, weight_d, bias_d, lora_A_d, lora_B_d, x_prev_d, z_prev_d = detached
    op_y, op_z, op_sqnorm = torch.ops.reslora_kernels.fused_forward(
        x_d, weight_d, bias_d, lora_A_d, lora_B_d, x_prev_d, z_prev_d, seed, scaling, input_scale, p, sqnorm
    )
    assert torch.equal(op_y, y) and torch.equal(op_z, z) and torch.equal(op_sqnorm, x_sqnorm)
    needs = [True, x_prev is not None, False, False, True, True, z_prev is not None]
    op_grads = torch.ops.reslora_kernels.fused_backward(
        grad_y, 2 * op_z, x_d, x_prev_d, weight_d, lora_A_d, lora_B_d, op_z, z_prev_d, seed, scaling, input_scale, p,
        needs,
    )  # fmt: skip
    leaves = [t for t, need in zip((x, x_prev, weight, bias, lora_A, lora_B, z_prev), needs) if need]
    assert len(op_grads) == len(leaves)
    for leaf, grad in zip(leaves, op_grads):
        assert torch.equal(leaf.grad, grad)


@pytest.mark.parametrize("mode, p", [("is", 0.1), ("ms", 0.0)])
def test_compiled_fused_training_matches_eager(dynamo, monkeypatch, mode, p):
    set_backend("fused")
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
