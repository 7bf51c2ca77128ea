"""Pass identity of chains: what an is/ms block reads was written in the same pass by its direct
predecessor, or it raises; gradient checkpointing in every mode; threads; nothing kept alive."""

import copy
import gc
import random
import threading
import weakref

import pytest
import torch
from helpers import ToyStack, oracle_params, rel_err
from oracle import toy_stack

from reslora_kernels import ChainOrderError, FusedResLoRALinear, backend, link_chain, set_backend

MODES = ["none", "is", "bs", "ms"]


def grads(model):
    return [(b.lora_A.grad, b.lora_B.grad) for b in model.blocks]


def train_step(model, x, seed=5):
    """Forward (seeded: dropout draws the same seeds) and backward of sum(y)."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    ys = model(x)
    sum((y * (n + 1)).sum() for n, y in enumerate(ys)).backward()
    return ys, x.grad


# ---------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("pre_num", [1, 2, -1])
@pytest.mark.parametrize("mode", MODES)
def test_non_reentrant_checkpointing_gives_the_same_gradients(mode, pre_num, p):
    plain = ToyStack(4, 6, mode, pre_num, dropout=p).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpoint = "non-reentrant"
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    ys, gx = train_step(plain, x)
    ys_ckpt, gx_ckpt = train_step(checkpointed, x)
    for y, y_ckpt in zip(ys, ys_ckpt):
        assert rel_err(y_ckpt, y) < 1e-14
    assert rel_err(gx_ckpt, gx) < 1e-14
    for (dA, dB), (dA_ckpt, dB_ckpt) in zip(grads(plain), grads(checkpointed)):
        assert rel_err(dA_ckpt, dA) < 1e-14 and rel_err(dB_ckpt, dB) < 1e-14


@pytest.mark.parametrize("mode", MODES)
def test_reentrant_checkpointing(mode):
    """Reentrant checkpointing cannot carry a gradient into x_{n-1} / z_{n-1} across segments: is
    and ms raise at the first checkpointed call; none and bs read no activation and work."""
    plain = ToyStack(3, 6, mode).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpoint = "reentrant"
    x = torch.randn(4, 6, dtype=torch.float64)
    if mode in ("is", "ms"):
        with pytest.raises(RuntimeError, match=r"reentrant.*use_reentrant=False"):
            checkpointed(x.clone().requires_grad_())
        return
    _, gx = train_step(plain, x)
    _, gx_ckpt = train_step(checkpointed, x)
    assert rel_err(gx_ckpt, gx) < 1e-14
    for (dA, _), (dA_ckpt, _) in zip(grads(plain), grads(checkpointed)):
        assert rel_err(dA_ckpt, dA) < 1e-14


@pytest.mark.parametrize("mode", ["is", "ms"])
def test_a_pass_is_released_once_backward_has_passed_it(mode):
    model = ToyStack(3, 6, mode, checkpoint="non-reentrant").train()
    chain = model.blocks[0].chain
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    ys = model(x)
    loss = sum(y.sum() for y in ys)
    (pending,) = list(chain._recomputed.awaiting)
    assert pending.records and not pending.released
    loss.backward()
    # The loss (and so the graph) is still referenced, but nothing of the pass is.
    assert pending.released and not pending.records
    del ys, loss, pending
    gc.collect()
    assert not list(chain._recomputed.awaiting)


@pytest.mark.parametrize("mode", ["is", "ms"])
def test_two_checkpointed_passes_in_one_backward_raise(mode):
    model = ToyStack(3, 6, mode, checkpoint="non-reentrant").train()
    a, b = (torch.randn(4, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    loss = sum(y.sum() for y in model(a)) + sum(y.sum() for y in model(b))
    with pytest.raises(ChainOrderError, match="cannot tell which one"):
        loss.backward()


@pytest.mark.parametrize("mode", MODES)
def test_two_passes_in_one_backward_without_checkpointing(mode):
    model = ToyStack(3, 6, mode).train()
    separate = copy.deepcopy(model)
    a, b = (torch.randn(4, 6, dtype=torch.float64) for _ in range(2))
    (sum(y.sum() for y in model(a)) + sum(y.sum() for y in model(b))).backward()
    sum(y.sum() for y in separate(a)).backward()
    sum(y.sum() for y in separate(b)).backward()
    for (dA, dB), (dA2, dB2) in zip(grads(model), grads(separate)):
        assert rel_err(dA, dA2) < 1e-13 and rel_err(dB, dB2) < 1e-13


# ---------------------------------------------------------------------------- skipped blocks
class LayerDropStack(ToyStack):
    """The toy stack with LayerDrop: each block is skipped with probability ``drop``."""

    def __init__(self, *args, drop=0.3, seed=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.drop, self.rng, self.ran = drop, random.Random(seed), []

    def forward(self, x):
        self.ran, ys = [], []
        for n, block in enumerate(self.blocks):
            if self.rng.random() < self.drop:
                continue
            self.ran.append(n)
            y = block(x)
            ys.append(y)
            x = torch.tanh(y)
        return ys


@pytest.mark.parametrize("pre_num", [1, -1])
@pytest.mark.parametrize("mode", ["is", "ms"])
def test_layerdrop_never_gives_a_silent_result(mode, pre_num):
    model = LayerDropStack(4, 6, mode, pre_num).train()
    params = oracle_params(model)
    raised = completed = 0
    for _ in range(60):
        x = torch.randn(3, 6, dtype=torch.float64)
        try:
            ys = model(x)
        except ChainOrderError as err:
            # Raised exactly when a block ran whose predecessor had been skipped in this call.
            culprit = next(n for i, n in enumerate(model.ran) if n != i)
            assert f"blocks.{culprit}" in str(err)
            raised += 1
            continue
        # No error: the blocks that ran are a prefix of the chain, so the result is the oracle's.
        assert model.ran == list(range(len(model.ran)))
        expected = toy_stack(x, params[: len(model.ran)], model.blocks[0].scaling, mode, pre_num)
        assert all(rel_err(y, e) < 1e-13 for y, e in zip(ys, expected))
        completed += 1
    assert raised and completed


def test_skipped_first_block_in_the_next_call_raises():
    """The smallest stale read: block 0 runs on a in one call, the next call skips block 0 and
    runs block 1 on b. Block 1 must not read a."""
    model = LayerDropStack(3, 6, "is", drop=0.5)
    a, b = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    model.rng = type("Fixed", (), {"random": iter([0.9, 0.0, 0.0]).__next__})()  # run block 0 only
    model(a)
    model.rng = type("Fixed", (), {"random": iter([0.0, 0.9, 0.9]).__next__})()  # skip block 0
    with pytest.raises(ChainOrderError, match=r"blocks.1 .*its predecessor blocks.0 did not run"):
        model(b)


def test_blocks_out_of_order_name_both_modules():
    model = ToyStack(3, 6, "is")
    x = torch.randn(2, 6, dtype=torch.float64)
    model.blocks[0](x)
    with pytest.raises(ChainOrderError, match=r"blocks.2 .*ran after blocks.0.*predecessor is blocks.1"):
        model.blocks[2](x)


def test_hand_linked_chain_without_a_model_warns():
    blocks = [FusedResLoRALinear(4, 4, mode="is") for _ in range(2)]
    with pytest.warns(UserWarning, match="model="):
        link_chain(blocks)


# ---------------------------------------------------------------------------- nothing kept alive
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("mode", ["is", "ms"])
def test_an_interrupted_forward_keeps_nothing(mode, grad):
    model = ToyStack(3, 6, mode).train()
    refs = []
    for block in model.blocks[:2]:
        block.register_forward_pre_hook(lambda mod, args: refs.append(weakref.ref(args[0])))

    def fail(mod, args):
        raise RuntimeError("stop")

    handle = model.blocks[2].register_forward_pre_hook(fail)
    with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match="stop"):
        model(torch.randn(3, 6, dtype=torch.float64, requires_grad=grad))
    gc.collect()
    assert all(r() is None for r in refs), "an interrupted pass left an activation referenced"
    handle.remove()
    model(torch.randn(3, 6, dtype=torch.float64))  # and the next call starts cleanly


@pytest.mark.parametrize("mode", ["is", "ms"])
def test_a_completed_pass_keeps_nothing(mode):
    model = ToyStack(4, 6, mode).train()
    refs = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda mod, args: refs.append(weakref.ref(args[0])))
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    ys = model(x)
    sum(y.sum() for y in ys).backward()
    del ys
    gc.collect()
    assert all(r() is None for r in refs[1:])
    refs.clear()
    with torch.no_grad():
        model(x)
    gc.collect()
    assert all(r() is None for r in refs[1:])


# ---------------------------------------------------------------------------- threads
@pytest.mark.parametrize("pre_num", [1, -1])
@pytest.mark.parametrize("mode", MODES)
def test_concurrent_passes_from_threads(mode, pre_num):
    model = ToyStack(4, 16, mode, pre_num).eval()
    inputs = [torch.randn(5, 16, dtype=torch.float64) for _ in range(8 * 50)]
    with torch.no_grad():
        expected = [model(x)[-1] for x in inputs]
    results: dict[int, torch.Tensor] = {}
    errors = []

    def work(start):
        try:
            with torch.no_grad():
                for i in range(start, len(inputs), 8):
                    results[i] = model(inputs[i])[-1]
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert len(results) == len(inputs)
    assert all(torch.equal(results[i], expected[i]) for i in range(len(inputs)))


@pytest.mark.parametrize("pre_num", [1, 2, -1])
@pytest.mark.parametrize("mode", ["is", "ms"])
def test_what_a_checkpointed_pass_keeps(mode, pre_num):
    """The extra memory of checkpointing, exactly: is keeps the input of every block but the last
    (by reference: the tensor the layer received), ms one [M, r] tensor per block but the last."""
    length, features, rank, rows = 4, 6, 3, 5
    model = ToyStack(length, features, mode, pre_num, rank=rank, checkpoint="non-reentrant").train()
    inputs = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
    ys = model(torch.randn(rows, features, dtype=torch.float64, requires_grad=True))
    (pending,) = list(model.blocks[0].chain._recomputed.awaiting)
    assert sorted(pending.records) == list(range(length - 1))
    for n, kept in pending.records.items():
        if mode == "is":
            assert kept is inputs[n]
        else:
            assert kept.shape == (rows, rank)
    sum(y.sum() for y in ys).backward()
    assert not pending.records


def test_merge_removes_the_pass_hooks():
    from reslora_kernels import ResLoRAConfig, apply_reslora, merge_and_unload

    model = torch.nn.Sequential(*(torch.nn.Linear(6, 6) for _ in range(3)))
    apply_reslora(model, ResLoRAConfig(mode="is", target_modules=r"\d+"))
    assert model._forward_pre_hooks and model._forward_hooks
    merge_and_unload(model)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert "_reslora_pass_tracker" not in vars(model)


def test_a_shortcut_of_the_wrong_shape_names_both_blocks():
    model = ToyStack(2, 6, "is")
    model.blocks[0](torch.randn(4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"blocks.1 .*x_prev must have the input's shape.*predecessor blocks.0"):
        model.blocks[1](torch.randn(3, 6, dtype=torch.float64))


def test_a_bad_backend_setting_raises_before_the_pass_changes(monkeypatch):
    model = ToyStack(2, 6, "is")
    x = torch.randn(2, 6, dtype=torch.float64)
    model.blocks[0](x)
    pending = model.blocks[0].chain._eager.current
    # RESLORA_BACKEND=bogus in the environment the package was imported in:
    monkeypatch.setattr(backend, "_DEFAULT", backend._environment_default("bogus"))
    with pytest.raises(ValueError, match="RESLORA_BACKEND='bogus'"):
        model.blocks[0](x)
    assert model.blocks[0].chain._eager.current is pending
    # A backend that cannot run the input (the fused kernels have no float64).
    set_backend("fused")
    with pytest.raises(TypeError, match="the fused backend supports float16, bfloat16 and float32 inputs"):
        model.blocks[0](x)
    assert model.blocks[0].chain._eager.current is pending
