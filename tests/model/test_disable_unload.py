"""disable_adapter: the model computes its base model and touches nothing of its chains, until the
context exits (also by an exception); unload: the base model back, without merging, atomically."""

import copy
import threading

import pytest
import torch
import torch.nn as nn

from reslora_kernels import (
    AdapterDisabled,
    FusedResLoRALinear,
    ResLoRAConfig,
    apply_reslora,
    disable_adapter,
    merge_and_unload,
    reslora_blocks,
    unload,
)
from reslora_kernels.chain import ResLoRAChain


class Net(nn.Module):
    def __init__(self, width=12, layers=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential() for _ in range(layers))
        for layer in self.layers:
            layer.proj = nn.Linear(width, width)
            layer.gate = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer.proj(x)) * torch.sigmoid(layer.gate(x))
        return self.head(x)


def _adapted(mode, **extra):
    torch.manual_seed(0)
    base = Net().double()
    model = apply_reslora(
        copy.deepcopy(base), ResLoRAConfig(mode=mode, rank=3, target_modules=["proj", "gate"], **extra)
    )
    with torch.no_grad():
        for _, block in reslora_blocks(model):
            block.lora_B.normal_(0.0, 0.5)  # a trained adapter: B = 0 would hide a missed disable
    return base, model


MODES = ["none", "is", "bs", "ms"]


@pytest.mark.parametrize("mode", MODES)
def test_inside_the_context_the_model_is_its_base_model_bit_for_bit(mode):
    base, model = _adapted(mode, pre_num=-1)
    x = torch.randn(5, 12, dtype=torch.float64)
    adapted = model(x)
    assert not torch.equal(adapted, base(x))
    with disable_adapter(model) as inside:
        assert inside is model
        assert torch.equal(model(x), base(x))
        model.train()
        assert torch.equal(model(x), base(x))  # train mode too: no dropout, no statistics, no chain
        model.eval()
    assert torch.equal(model(x), adapted)


@pytest.mark.parametrize("mode", ["is", "ms"])
def test_disabled_blocks_read_and_write_nothing_of_their_chain_and_record_no_statistics(mode, monkeypatch):
    _, model = _adapted(mode)
    model.train()
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)  # the base is frozen: a graph through x
    counts = {name: block.statistics.norm_count.clone() for name, block in reslora_blocks(model)}

    def touched(*args, **kwargs):
        raise AssertionError("a disabled block used its chain")

    monkeypatch.setattr(ResLoRAChain, "shortcut_inputs", touched)
    monkeypatch.setattr(ResLoRAChain, "after_forward", touched)
    with disable_adapter(model):
        model(x).sum().backward()
    for name, block in reslora_blocks(model):
        assert torch.equal(block.statistics.norm_count, counts[name]), name
        assert block.lora_A.grad is None and block.lora_B.grad is None  # the adapter took no part
    monkeypatch.undo()
    model(x).sum().backward()  # and the chains work afterwards, as before
    assert all(block.statistics.norm_count == counts[name] + 1 for name, block in reslora_blocks(model))


def test_the_adapter_is_back_after_an_exception_and_nested_contexts_compose():
    base, model = _adapted("is")
    x = torch.randn(2, 12, dtype=torch.float64)
    adapted = model(x)
    with pytest.raises(RuntimeError, match="boom"):
        with disable_adapter(model):
            raise RuntimeError("boom")
    assert torch.equal(model(x), adapted)
    with disable_adapter(model):
        with disable_adapter(model.layers[1]):  # a part of the model: its blocks are disabled twice
            assert torch.equal(model(x), base(x))
        assert torch.equal(model(x), base(x))  # the outer context still holds
    assert torch.equal(model(x), adapted)
    assert all(block._adapter_disabled == 0 for _, block in reslora_blocks(model))


def test_the_switch_is_model_wide_and_balanced_across_threads():
    base, model = _adapted("bs")
    x = torch.randn(2, 12, dtype=torch.float64)
    adapted, expected = model(x), base(x)
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def holder():
        with disable_adapter(model):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    entered.wait(10)
    seen["other thread"] = torch.equal(model(x), expected)  # documented: every thread sees the base model
    release.set()
    thread.join()
    assert seen["other thread"] and torch.equal(model(x), adapted)

    def churn():
        for _ in range(200):
            with disable_adapter(model):
                pass

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(block._adapter_disabled == 0 for _, block in reslora_blocks(model))


def test_compiled_and_wrapped_models():
    base, model = _adapted("is")
    x = torch.randn(3, 12, dtype=torch.float64)
    adapted = model(x)
    compiled = torch.compile(model, backend="eager")
    assert torch.allclose(compiled(x), adapted)
    with disable_adapter(compiled):  # looked through: the flags are the blocks' own
        assert torch.allclose(compiled(x), base(x))
    assert torch.allclose(compiled(x), adapted)
    wrapped = nn.DataParallel(model)  # no GPU: runs the module itself
    with disable_adapter(wrapped):
        assert torch.equal(wrapped(x), base(x))


@pytest.mark.parametrize("fullgraph", [False, True])
def test_entered_inside_a_compiled_function(fullgraph):
    base, model = _adapted("bs")
    x = torch.randn(3, 12, dtype=torch.float64)

    def both(x):
        with disable_adapter(model):
            off = model(x)
        return off, model(x)

    torch._dynamo.reset()
    compiled = torch.compile(both, backend="eager", fullgraph=fullgraph)
    for _ in range(2):  # the first call traces, the second runs what was compiled
        off, on = compiled(x)
        assert torch.allclose(off, base(x)) and torch.allclose(on, model(x)) and not torch.allclose(on, off)
        assert all(block._adapter_disabled == 0 for _, block in reslora_blocks(model))

    def failing(x):
        with disable_adapter(model):
            raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        torch.compile(failing, backend="eager")(x)
    assert all(block._adapter_disabled == 0 for _, block in reslora_blocks(model))


def test_errors():
    with pytest.raises(ValueError, match="the model has no ResLoRA layers"):
        with disable_adapter(Net()):
            pass
    with pytest.raises(TypeError, match="disable_adapter needs an nn.Module, got str"):
        with disable_adapter("model"):
            pass
    with pytest.raises(ValueError, match="the model has no ResLoRA layers"):
        AdapterDisabled(Net())


def test_adapter_disabled_module_shares_everything_and_reads_through():
    base, model = _adapted("ms")
    reference = AdapterDisabled(model)
    x = torch.randn(3, 12, dtype=torch.float64)
    assert list(reference.parameters()) == [] and reference.model is model
    assert torch.equal(reference(x), base(x)) and not torch.equal(model(x), base(x))
    assert reference.layers is model.layers and reference.head is model.head  # attributes read from the model
    reference.eval()
    assert model.training  # not its submodule: the reference's mode is its own


# ----------------------------------------------------------------------------- unload
@pytest.mark.parametrize("mode", MODES)
def test_unload_gives_back_the_original_modules_untouched(mode):
    base, model = _adapted(mode)
    originals = {name: block.base_layer for name, block in reslora_blocks(model)}
    weights = {name: layer.weight.detach().clone() for name, layer in originals.items()}
    x = torch.randn(4, 12, dtype=torch.float64)
    out = unload(model)
    assert out is model and not reslora_blocks(model) and "reslora_config" not in vars(model)
    assert not hasattr(model, "_reslora_pass_tracker") and not model._forward_hooks and not model._forward_pre_hooks
    for name, layer in originals.items():
        assert model.get_submodule(name) is layer and type(layer) is nn.Linear
        assert torch.equal(layer.weight, weights[name])
    assert torch.equal(model(x), base(x))  # not merged: the base model's output
    apply_reslora(model, ResLoRAConfig(mode=mode, rank=3, target_modules=["proj"]))  # and it takes ResLoRA again


def test_unload_a_single_block_and_refusals():
    linear = nn.Linear(4, 4)
    block = FusedResLoRALinear.from_linear(linear, mode="is")
    assert unload(block) is linear
    with pytest.raises(ValueError, match="the model has no ResLoRA layers to unload"):
        unload(Net())


def test_unload_is_atomic(monkeypatch):
    _, model = _adapted("is")
    before = dict(model.named_modules())
    import reslora_kernels.apply as apply_module

    real, calls = apply_module.untrack_passes, []

    def failing(module):  # the last step: the root's hooks are removed, then the next module fails
        calls.append(module)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real(module)

    monkeypatch.setattr(apply_module, "untrack_passes", failing)
    with pytest.raises(RuntimeError, match="injected"):
        unload(model)
    monkeypatch.undo()
    after = dict(model.named_modules())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert "reslora_config" in vars(model) and hasattr(model, "_reslora_pass_tracker")
    x = torch.randn(2, 12, dtype=torch.float64)
    model(x)  # the chains are tracked again: a whole forward runs


def test_merge_and_unload_and_unload_agree_on_the_modules_they_give_back():
    _, merged_model = _adapted("bs")
    _, unloaded_model = _adapted("bs")
    merged = merge_and_unload(merged_model)
    unloaded = unload(unloaded_model)
    assert [type(m) for m in merged.modules()] == [type(m) for m in unloaded.modules()]
