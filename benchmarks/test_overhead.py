"""Host overhead: one block's forward+backward at a tiny shape, where the compute is negligible and
what is left is the per-call Python and dispatch cost (what dominates small batches and
decoding). Per backend, against nn.Linear and PEFT, and our layer split into its parts: the
module, the functional op (checks + backend choice), the autograd Function alone.

Two more fused rows price the eager path's design (docs/design.md section 6): one block's forward
and backward bodies without autograd, called directly (what the eager Function runs) and through
the registered ops ``torch.ops.reslora_kernels.fused_forward`` / ``fused_backward`` (what
torch.compile's graph calls). Their difference is what routing every eager call through the
dispatcher would add per block.

The fused backend's rows marked "launches captured" plan every launch for an H100 (the TMA
kernels, their descriptors) and record it instead of running it (``_target.capture``): what is timed
is the host's work up to the launch, on any machine, GPU or not. Triton's own launch path
(autotuner lookup, argument binding, the driver call) comes on top on a GPU and is not in them.
"""

import contextlib

import pytest
import torch
import torch.nn as nn
from bench_lib import DEVICE, FULL, IS_CUDA, Interleaved, peft, run_rounds, synchronize

from reslora_kernels import FusedResLoRALinear, backend, functional, set_backend
from reslora_kernels.composed import composed_reslora_linear

try:
    from reslora_kernels import fused, ops
    from reslora_kernels.ops import _target
except ImportError:  # no Triton: the fused rows are left out
    fused = ops = _target = None

M, K, N, RANK = 4, 64, 64, 8
DTYPE = torch.bfloat16 if IS_CUDA else torch.float32
# Calls per timed sample (the per-call time is the sample / CALLS) and rounds; fewer in the
# reduced CPU sweep (RESLORA_BENCH_FULL unset).
CALLS, ROUNDS = (50, 15) if FULL else (20, 7)
GROUP = f"M={M} {K}->{N} r={RANK} {str(DTYPE).replace('torch.', '')}"


class Batch:
    """``CALLS`` forward+backward calls of ``fn`` (backward with a fixed ``grad_out``) as one timed
    step, one synchronisation at the end on CUDA; ``prepare`` sets the backend, untimed."""

    def __init__(self, fn, leaves, backend=None):
        self.fn, self.leaves, self.backend = fn, leaves, backend
        self.grad_out = torch.ones(M, N, device=DEVICE, dtype=DTYPE)

    def prepare(self):
        if self.backend is not None:
            set_backend(self.backend)
        for t in self.leaves:
            t.grad = None

    def step(self):
        for _ in range(CALLS):
            self.fn().backward(self.grad_out)
        synchronize()


@contextlib.contextmanager
def _fused_selectable():
    """On a machine without a GPU the fused backend needs Triton's interpreter; with every launch
    captured nothing runs, so it may be selected without it for the duration."""
    if IS_CUDA or _target.INTERPRETED:
        yield
        return
    original = backend.fused_unavailable
    backend.fused_unavailable = lambda x: None
    try:
        yield
    finally:
        backend.fused_unavailable = original


class CapturedBatch(Batch):
    """:class:`Batch` with every launch planned for an H100 and captured instead of run."""

    def step(self):
        with _target.simulate(_target.H100), _target.capture(), _fused_selectable():
            for _ in range(CALLS):
                self.fn().backward(self.grad_out)
        synchronize()


class LaunchersOnly(Batch):
    """The five launchers of one block's forward and backward, without autograd, captured."""

    def __init__(self, x, layer):
        super().__init__(None, [])
        self.x = x.detach()
        self.weight, self.bias = layer.weight.detach(), layer.bias.detach()
        self.lora_A, self.lora_B = layer.lora_A.detach(), layer.lora_B.detach()
        self.g = torch.ones(M, RANK, device=DEVICE, dtype=torch.float32)

    def step(self):
        x, weight, lora_A, lora_B, grad_out = self.x, self.weight, self.lora_A, self.lora_B, self.grad_out
        with _target.simulate(_target.H100), _target.capture():
            for _ in range(CALLS):
                z, _ = ops.lora_down(x, lora_A)
                ops.linear_lora_fwd(x, weight, self.bias, z, lora_B, 2.0)
                g, _ = ops.lora_grad_out(grad_out, lora_B, z, 2.0)
                ops.linear_lora_dx(grad_out, weight, self.g, lora_A)
                ops.lora_grad_A(self.g, x)
        synchronize()


class OpBodiesOnly(Batch):
    """One block's forward and backward bodies without autograd, captured: called directly, or
    through the registered ops (``registered``)."""

    #: The gradients the Function asks for here: x, lora_A, lora_B (the base layer is frozen).
    NEEDS = [True, False, False, False, True, True, False]

    def __init__(self, x, layer, registered):
        super().__init__(None, [])
        self.x = x.detach()
        self.weight, self.bias = layer.weight.detach(), layer.bias.detach()
        self.lora_A, self.lora_B = layer.lora_A.detach(), layer.lora_B.detach()
        self.scaling = layer.scaling
        if registered:
            self.forward, self.backward = fused._fused_forward, fused._fused_backward
        else:
            self.forward, self.backward = fused._forward, fused._backward

    def step(self):
        x, weight, bias, lora_A, lora_B, s = self.x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling
        forward, backward, grad_out, needs = self.forward, self.backward, self.grad_out, self.NEEDS
        with _target.simulate(_target.H100), _target.capture():
            for _ in range(CALLS):
                _, z, _ = forward(x, weight, bias, lora_A, lora_B, None, None, None, s, 1.0, 0.0, False)
                backward(grad_out, None, x, None, weight, lora_A, lora_B, z, None, None, s, 1.0, 0.0, needs)
        synchronize()


def variants():
    factory = {"device": DEVICE, "dtype": DTYPE}
    x = torch.randn(M, K, **factory, requires_grad=True)
    out = {}
    frozen = nn.Linear(K, N, **factory).requires_grad_(False)
    out["nn.Linear (frozen)"] = Batch(lambda: frozen(x), [x])
    trainable = nn.Linear(K, N, **factory)
    out["nn.Linear (trainable)"] = Batch(lambda: trainable(x), [x, *trainable.parameters()])
    if peft is not None:
        from bench_lib import _Wrap

        model = peft.get_peft_model(_Wrap(nn.Linear(K, N, **factory)), peft.LoraConfig(r=RANK, target_modules=["proj"]))
        out["PEFT LoRA"] = Batch(lambda: model(x), [x, *(p for p in model.parameters() if p.requires_grad)])
    layer = FusedResLoRALinear(K, N, **factory, rank=RANK, alpha=2 * RANK)
    params = [layer.lora_A, layer.lora_B]
    backends = ["reference", "composed"] + (["fused", "auto"] if IS_CUDA else [])
    for name in backends:
        out[f"layer, {name}"] = Batch(lambda: layer(x), [x, *params], name)
    args = (layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    out["functional, composed"] = Batch(lambda: functional.reslora_linear(x, *args)[0], [x, *params], "composed")
    out["Function only, composed"] = Batch(lambda: composed_reslora_linear(x, *args)[0], [x, *params])
    if ops is not None:
        captured = "H100 plan, launches captured"
        out[f"layer, fused ({captured})"] = CapturedBatch(lambda: layer(x), [x, *params], "fused")
        out[f"Function only, fused ({captured})"] = CapturedBatch(
            lambda: fused.fused_reslora_linear(x, *args)[0], [x, *params]
        )
        out[f"op bodies only, fused ({captured})"] = OpBodiesOnly(x, layer, registered=False)
        out[f"registered ops only, fused ({captured})"] = OpBodiesOnly(x, layer, registered=True)
        out[f"launchers only, fused ({captured})"] = LaunchersOnly(x, layer)
    return out


def test_host_overhead(benchmark, results):
    if DEVICE == "cpu" and torch.get_num_threads() < 1:
        pytest.skip("no CPU threads")
    cases = variants()
    runner = Interleaved(cases)
    runner.warm_up(2)
    benchmark.group = f"host overhead {GROUP} (one round = {CALLS} calls of every variant)"
    run_rounds(benchmark, runner, ROUNDS)
    for name, stats in runner.stats().items():
        per_call = {k.replace("_ms", "_us"): v * 1e3 / CALLS for k, v in stats.items() if k.endswith("_ms")}
        results.add("overhead", GROUP, name, rounds=stats["rounds"], calls_per_round=CALLS, **per_call)
