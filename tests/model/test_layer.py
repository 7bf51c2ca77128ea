"""FusedResLoRALinear as a drop-in nn.Linear, its chain protocol, statistics and dropout."""

import dataclasses
import gc
import math
import weakref

import pytest
import torch
import torch.nn as nn
from helpers import ToyStack, rel_err

from reslora_kernels import BlockSettings, ChainOrderError, FusedResLoRALinear, ResLoRAConfig, link_chain, reference


def test_constructor_builds_its_base_nn_linear():
    layer = FusedResLoRALinear(10, 6, bias=True, dtype=torch.float64, rank=3, alpha=6, mode="bs", pre_num=2)
    assert type(layer.base_layer) is nn.Linear and (layer.in_features, layer.out_features) == (10, 6)
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    assert layer.weight.shape == (6, 10) and layer.bias.shape == (6,)
    assert layer.lora_A.shape == (3, 10) and layer.lora_B.shape == (6, 3)
    assert layer.weight.dtype == layer.lora_A.dtype == torch.float64
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    # kaiming-uniform with a = sqrt(5): bound = 1 / sqrt(fan_in)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(10)
    assert set(dict(layer.named_parameters())) == {"base_layer.weight", "base_layer.bias", "lora_A", "lora_B"}
    text = repr(layer)
    for piece in ("in_features=10", "out_features=6", "rank=3", "alpha=6", "mode='bs'", "pre_num=2"):
        assert piece in text


def test_from_linear_reuses_parameters_and_matches_at_init():
    linear = nn.Linear(16, 8)
    layer = FusedResLoRALinear.from_linear(linear, rank=4, mode="is")
    assert layer.base_layer is linear and layer.weight is linear.weight and layer.bias is linear.bias
    assert not linear.weight.requires_grad
    x = torch.randn(3, 16)
    # B = 0 at init: the block starts as the base layer (is adds its own input twice, times 0).
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0)
    no_bias = FusedResLoRALinear.from_linear(nn.Linear(16, 8, bias=False))
    assert no_bias.bias is None
    with pytest.raises(TypeError, match="needs an nn.Linear or a transformers Conv1D, got a FusedResLoRALinear"):
        FusedResLoRALinear.from_linear(layer)
    with pytest.raises(TypeError, match="got a Embedding, not an nn.Linear"):
        FusedResLoRALinear.from_linear(nn.Embedding(4, 4))
    quantized = nn.Linear(4, 4)
    quantized.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="its weight is a Parameter of torch.int8, not a floating-point Parameter"):
        FusedResLoRALinear.from_linear(quantized)


def test_one_settings_object_with_one_set_of_defaults():
    """Every way to build a block takes a BlockSettings (or a ResLoRAConfig, which extends it) or
    keywords forwarded to it: one validation, one default per setting (mode 'none')."""
    assert FusedResLoRALinear(4, 4).settings == BlockSettings() == ResLoRAConfig().block_settings()
    assert BlockSettings().mode == "none" and FusedResLoRALinear.from_linear(nn.Linear(4, 4)).mode == "none"
    settings = BlockSettings(mode="ms", rank=2, alpha=4.0, dropout=0.1, pre_num=-1, norm_window=7)
    layer = FusedResLoRALinear(6, 5, settings=settings)
    assert layer.settings is settings and (layer.rank, layer.scaling, layer.pre_num) == (2, 2.0, -1)
    assert layer.statistics.norm_sq_window.shape == (7,)
    config = ResLoRAConfig(mode="is", rank=3, target_modules=["proj"])
    from_config = FusedResLoRALinear.from_linear(nn.Linear(6, 5), config, dropout=0.2)
    assert type(from_config.settings) is BlockSettings  # the config's block settings, not its targets
    assert (from_config.mode, from_config.rank, from_config.dropout) == ("is", 3, 0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.rank = 4
    with pytest.raises(AttributeError):
        layer.rank = 4  # a block's shape-setting values are fixed at construction
    layer.dropout = 0.3  # replaces the settings, validated
    assert layer.settings.dropout == 0.3 and settings.dropout == 0.1
    with pytest.raises(ValueError, match="dropout must be a probability"):
        layer.dropout = 1.5
    with pytest.raises(TypeError, match="settings must be a BlockSettings or a ResLoRAConfig, got dict"):
        FusedResLoRALinear(4, 4, settings={"rank": 2})


@pytest.mark.parametrize("mode", ["none", "is", "bs", "ms"])
def test_single_layer_matches_reference_op(mode):
    layer = FusedResLoRALinear(12, 7, dtype=torch.float64, rank=5, alpha=3.0, mode=mode)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    # A block with no chain is its own first block: is adds x itself, bs/ms only their own term.
    x_prev = x if mode == "is" else None
    expected, _, _ = reference.reslora_linear(
        x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, x_prev=x_prev
    )
    assert rel_err(layer(x), expected) < 1e-14


def test_chain_order_is_enforced():
    model = ToyStack(3, 6, "is")
    x = torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(ChainOrderError, match="blocks.1"):
        model.blocks[1](x)
    model.blocks[0](x)
    with pytest.raises(ChainOrderError, match=r"blocks.2 .*ran after blocks.0"):
        model.blocks[2](x)
    # bs needs no activations from its predecessors, so any order is fine.
    bs = ToyStack(3, 6, "bs")
    bs.blocks[2](x)


def test_stash_keeps_no_activation_alive():
    model = ToyStack(4, 6, "is")
    refs = []
    hooks = [b.register_forward_pre_hook(lambda mod, args: refs.append(weakref.ref(args[0]))) for b in model.blocks]
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    ys = model(x)
    sum(y.sum() for y in ys).backward()
    del ys
    gc.collect()
    assert all(r() is None for r in refs[1:]), "a completed pass left activations in the stash"
    # A pass that stops half way leaves its stash until the next pass starts at block 0.
    refs.clear()
    with torch.no_grad():
        h = torch.tanh(model.blocks[0](x))
        model.blocks[1](h)
        del h
    gc.collect()
    assert refs[1]() is not None
    model(x)
    gc.collect()
    assert refs[1]() is None, "a new pass must drop the previous pass's stash"
    for hook in hooks:
        hook.remove()


def test_link_chain_errors():
    a = FusedResLoRALinear(8, 8, mode="is")
    b = FusedResLoRALinear(8, 4, mode="is")
    with pytest.raises(ValueError, match=r"cannot link q.1 \(in=8, out=4\) after q.0 \(in=8, out=8\)"):
        link_chain([a, b], block_names=["q.0", "q.1"])
    c = FusedResLoRALinear(8, 8, mode="ms")
    with pytest.raises(ValueError, match="mode"):
        link_chain([a, c])
    d = FusedResLoRALinear(8, 8, mode="is", rank=4)
    with pytest.raises(ValueError, match="rank"):
        link_chain([a, d])
    with pytest.raises(ValueError, match="twice"):
        link_chain([a, a])
    with pytest.raises(TypeError, match="not a FusedResLoRALinear"):
        link_chain([a, nn.Linear(8, 8)])
    e = FusedResLoRALinear(8, 8, mode="is")
    chain = link_chain([a, e], name="first")
    with pytest.raises(ValueError, match="already linked into chain 'first'"):
        link_chain([e, FusedResLoRALinear(8, 8, mode="is")])
    chain.unlink()
    assert len(a.chain) == 1 and len(e.chain) == 1
    with pytest.raises(ValueError, match="no shortcuts"):
        link_chain([FusedResLoRALinear(8, 8), FusedResLoRALinear(8, 8)])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rank": 0}, ValueError, "rank must be >= 1"),
        ({"rank": 2.0}, TypeError, "rank must be an int"),
        ({"mode": "xs"}, ValueError, "unknown mode 'xs'"),
        ({"mode": "bs", "pre_num": 0}, ValueError, "pre_num must be >= 1"),
        ({"mode": "ms", "pre_num": -2}, ValueError, "pre_num must be >= 1"),
        ({"dropout": 1.0}, ValueError, "dropout must be a probability"),
        ({"alpha": float("nan")}, ValueError, "alpha must be a finite number"),
        ({"norm_window": 0}, ValueError, "norm_window must be an int >= 1"),
    ],
)
def test_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        FusedResLoRALinear(4, 4, **kwargs)


def test_pre_num_is_ignored_where_meaningless():
    FusedResLoRALinear(4, 4, mode="is", pre_num=0)
    FusedResLoRALinear(4, 4, mode="none", pre_num=-5)


def test_bad_inputs():
    layer = FusedResLoRALinear(8, 4, mode="is")
    with pytest.raises(ValueError, match="input last dim must be in_features=8"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="dtype mismatch: input is torch.float64 but weight is torch.float32"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="device mismatch: input is on meta"):
        layer(torch.randn(3, 8, device="meta"))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 8, dtype=torch.int64))
    # A rejected input leaves the chain's stash untouched.
    assert layer.chain._eager.current is None


def test_norm_statistics_ring_buffer():
    layer = FusedResLoRALinear(6, 6, dtype=torch.float64, mode="is", norm_window=3)
    norms = []
    for step in range(5):
        x = torch.randn(4, 6, dtype=torch.float64) * (step + 1)
        layer(x)
        norms.append(float(x.norm()))
    assert int(layer.statistics.norm_count) == 5
    assert layer.statistics.mean_norm() == pytest.approx(sum(norms[-3:]) / 3, rel=1e-6)
    layer.eval()
    layer(torch.randn(4, 6, dtype=torch.float64))
    assert int(layer.statistics.norm_count) == 5, "eval forwards are not recorded"
    ms = FusedResLoRALinear(6, 6, dtype=torch.float64, mode="ms")
    x = torch.randn(4, 6, dtype=torch.float64)
    ms(x)
    assert ms.statistics.mean_norm() == pytest.approx(float((x @ ms.lora_A.T).detach().norm()), rel=1e-6)
    assert FusedResLoRALinear(6, 6, mode="bs").statistics is None, "bs records no norm statistics"


def test_statistics_stay_float32_when_the_model_is_cast():
    layer = FusedResLoRALinear(8, 8, mode="is").half()
    assert layer.weight.dtype == layer.lora_A.dtype == torch.float16
    assert layer.statistics.norm_sq_window.dtype == torch.float32 and layer.statistics.norm_count.dtype == torch.int64
    x = torch.full((64, 8), 100.0, dtype=torch.float16)  # ||x||^2 = 5.12e6: inf in float16
    layer(x)
    assert layer.statistics.mean_norm() == pytest.approx(float(x.float().norm()), rel=1e-3)


@pytest.mark.parametrize("mode", ["is", "ms"])
def test_recording_never_reads_device_values(mode):
    """On the meta device every value read (.item(), float(t), .tolist(), bool(t)) raises: a
    training forward that records the statistics there cannot be hiding a host sync."""
    model = ToyStack(3, 6, mode, dtype=torch.float32, device="meta").train()
    model(torch.randn(4, 6, device="meta"))
    for block in model.blocks:
        assert block.statistics.norm_count.device.type == "meta"
    with pytest.raises(RuntimeError, match="meta tensors"):
        int(model.blocks[0].statistics.norm_count)  # the guard itself works


def test_dropout_train_eval_and_statistics():
    torch.manual_seed(0)
    features, p = 64, 0.25
    layer = FusedResLoRALinear(
        features, features, bias=False, dtype=torch.float64, rank=features, alpha=features, dropout=p
    )
    with torch.no_grad():  # y = drop(x): base weight 0, A = B = I, scaling 1
        layer.weight.zero_()
        layer.lora_A.copy_(torch.eye(features))
        layer.lora_B.copy_(torch.eye(features))
    x = torch.rand(256, features, dtype=torch.float64) + 0.5
    ratio = layer(x) / x
    dropped = ratio == 0
    kept = ~dropped
    assert torch.allclose(ratio[kept], torch.full_like(ratio[kept], 1 / (1 - p)))
    n = ratio.numel()
    # Binomial(n, p): 6 standard deviations either side.
    assert abs(int(dropped.sum()) - n * p) < 6 * math.sqrt(n * p * (1 - p))
    layer.eval()
    torch.testing.assert_close(layer(x), x, rtol=0, atol=0)


def test_dropout_is_deterministic_under_a_seed():
    layer = FusedResLoRALinear(16, 16, dropout=0.5, mode="is")
    nn.init.normal_(layer.lora_B)
    x = torch.randn(8, 16)
    torch.manual_seed(7)
    first = layer(x)
    torch.manual_seed(7)
    second = layer(x)
    third = layer(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.equal(second, third)


def test_inconsistent_shortcut_input_is_an_error():
    """The chain hands block 1 its predecessor's input: with other leading dims it cannot be added."""
    model = ToyStack(2, 6, "is")
    model.blocks[0](torch.randn(2, 3, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x_prev must have the input's shape \(6, 6\)"):
        model.blocks[1](torch.randn(6, 6, dtype=torch.float64))
