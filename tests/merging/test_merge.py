"""merge_and_unload: exact methods reproduce the model, the paper's methods give the weights of docs/design.md
section 8."""

import copy

import pytest
import torch
import torch.nn as nn
from helpers import ToyStack, oracle_params, rel_err
from oracle import depth, merged_weight

from reslora_kernels import FusedResLoRALinear, ResLoRAConfig, apply_reslora, merge_and_unload, merge_report


def no_reslora_left(model):
    return not any(isinstance(m, FusedResLoRALinear) for m in model.modules()) and not hasattr(model, "reslora_config")


@pytest.mark.parametrize("pre_num", [1, 2, -1])
@pytest.mark.parametrize("mode", ["none", "bs"])
def test_exact_merge_reproduces_outputs(mode, pre_num):
    model = ToyStack(5, 10, mode, pre_num)
    with torch.no_grad():
        for block in model.blocks:
            block.lora_A.normal_()
    x = torch.randn(6, 10, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    method = "exact" if pre_num == 1 else "auto"
    merge_and_unload(model, method=method)
    assert all(type(b) is nn.Linear for b in model.blocks)
    assert no_reslora_left(model)
    with torch.no_grad():
        after = model(x)
    for y0, y1 in zip(before, after):
        assert rel_err(y1, y0) < 1e-10


def train_forwards(model, steps, features, window_inputs):
    """Training forwards with inputs of varied scale; records each block's input per step."""
    model.train()
    hooks = [
        b.register_forward_pre_hook(lambda mod, args, n=n: window_inputs[n].append(args[0].detach().clone()))
        for n, b in enumerate(model.blocks)
    ]
    for step in range(steps):
        model(torch.randn(3, features, dtype=torch.float64) * (0.5 + step % 4))
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("pre_num", [1, 2, -1])
@pytest.mark.parametrize("mode", ["is", "ms"])
def test_input_norm_merge_weights(mode, pre_num):
    features, length, window, steps = 8, 5, 4, 7  # more steps than the window: only the last 4 count
    model = ToyStack(length, features, mode, pre_num, norm_window=window)
    inputs = [[] for _ in range(length)]
    train_forwards(model, steps, features, inputs)
    params = oracle_params(model)
    scaling = model.blocks[0].scaling

    # Independent statistics: mean norm of x_n (is) or z_n = x_n A_n^T (ms) over the last `window` steps.
    def mean_norm(n):
        tensors = inputs[n][-window:]
        if mode == "ms":
            tensors = [x @ params[n][2].detach().T for x in tensors]
        return sum(float(t.norm()) for t in tensors) / window

    stats = [mean_norm(n) for n in range(length)]
    if mode == "is":
        a = [1.0] + [stats[n - 1] / stats[n] for n in range(1, length)]
    else:
        a = [sum(stats[n - k] / stats[n] for k in range(1, depth(n, pre_num) + 1)) for n in range(length)]
    merge_and_unload(model, method="input_norm")
    assert no_reslora_left(model)
    for n, block in enumerate(model.blocks):
        expected = merged_weight(n, params, scaling, mode, pre_num, a=a[n])
        assert rel_err(block.weight, expected) < 1e-6, f"block {n}"  # statistics are kept in float32


def test_weight_norm_merge_weights():
    model = ToyStack(5, 8, "is")
    params = oracle_params(model)
    scaling = model.blocks[0].scaling
    f = [float(torch.linalg.matrix_norm(W + scaling * B.detach() @ A.detach())) for W, _, A, B in params]
    a = [1.0, 1.0] + [f[n - 2] / f[n - 1] for n in range(2, 5)]
    merge_and_unload(model, method="weight_norm")
    for n, block in enumerate(model.blocks):
        assert rel_err(block.weight, merged_weight(n, params, scaling, "is", 1, a=a[n])) < 1e-12


def test_auto_picks_input_norm_for_is_and_warns_without_statistics():
    model = ToyStack(3, 8, "is")
    params = oracle_params(model)
    scaling = model.blocks[0].scaling
    with pytest.warns(
        UserWarning, match="no training forward recorded norm statistics for blocks.0, blocks.1, blocks.2"
    ):
        merge_and_unload(model)
    # No statistics: every ratio falls back to 1, so a_n = 1 for all n.
    for n, block in enumerate(model.blocks):
        assert rel_err(block.weight, merged_weight(n, params, scaling, "is", 1, a=1.0)) < 1e-12


def test_zero_statistics_count_as_one():
    model = ToyStack(3, 8, "ms", pre_num=-1)
    model.train()
    with torch.no_grad():
        model.blocks[1].lora_A.zero_()  # z_1 = 0: its norm statistic is zero
    model(torch.randn(4, 8, dtype=torch.float64))
    params = oracle_params(model)
    nu = [model.blocks[n].statistics.mean_norm() for n in range(3)]
    assert nu[1] == 0.0 and nu[0] > 0 and nu[2] > 0
    # a_1 = nu_0 / nu_1 has a zero denominator: 1. a_2 = nu_0 / nu_2 + nu_1 / nu_2 = nu_0 / nu_2 + 1.
    a = [0.0, 1.0, nu[0] / nu[2] + 1.0]
    scaling = model.blocks[0].scaling
    merge_and_unload(model, method="input_norm")
    for n, block in enumerate(model.blocks):
        assert rel_err(block.weight, merged_weight(n, params, scaling, "ms", -1, a=a[n])) < 1e-12


@pytest.mark.parametrize(
    "mode, method, match",
    [
        ("is", "exact", "merge method 'exact' does not apply to mode 'is'.*use input_norm or weight_norm"),
        ("bs", "input_norm", "merge method 'input_norm' does not apply to mode 'bs'.*use exact"),
        ("ms", "weight_norm", "merge method 'weight_norm' does not apply to mode 'ms'.*use input_norm"),
        ("none", "nearest", "unknown merge method 'nearest'"),
    ],
)
def test_unsupported_method_is_an_error_and_changes_nothing(mode, method, match):
    model = ToyStack(3, 8, mode)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        merge_and_unload(model, method=method)
    assert all(isinstance(b, FusedResLoRALinear) for b in model.blocks)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_merge_single_layer_and_errors():
    layer = FusedResLoRALinear(6, 4, dtype=torch.float64, mode="none")
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 6, dtype=torch.float64)
    expected = layer(x).detach()
    linear = merge_and_unload(layer)
    assert type(linear) is nn.Linear and linear.weight is layer.weight
    assert rel_err(linear(x), expected) < 1e-12
    with pytest.raises(ValueError, match="no ResLoRA layers to merge"):
        merge_and_unload(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="no ResLoRA layers to merge"):
        merge_report(nn.Sequential(nn.Linear(3, 3)), [torch.randn(2, 3)])
    with pytest.raises(ValueError, match="no merge method to report"):
        merge_report(nn.Sequential(FusedResLoRALinear(6, 4, mode="none")), [torch.randn(2, 6)], methods=[])


def test_tied_weight_refuses_to_merge():
    model = nn.ModuleDict({"embed": nn.Embedding(6, 4), "head": nn.Linear(4, 6, bias=False)})
    model["head"].weight = model["embed"].weight
    apply_reslora(model, ResLoRAConfig(mode="none", target_modules=["head"]))
    with pytest.raises(ValueError, match=r"head.base_layer.weight is tied to embed.weight"):
        merge_and_unload(model)


def test_llama_block_shortcut_exact_merge():
    from helpers import LLAMA_TARGETS, randomize_adapters, tiny_llama

    model = tiny_llama()
    apply_reslora(model, ResLoRAConfig(mode="bs", pre_num=-1, target_modules=LLAMA_TARGETS))
    randomize_adapters(model)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        merge_and_unload(model)
        after = model(ids).logits
    assert no_reslora_left(model)
    assert rel_err(after, before) < 1e-10
