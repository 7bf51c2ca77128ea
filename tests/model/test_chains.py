"""Chain forming is explicit: the default rule, its warnings, the user's override, MoE experts."""

import warnings

import pytest
import torch
import torch.nn as nn

from reslora_kernels import (
    FusedResLoRALinear,
    ResLoRAConfig,
    apply_reslora,
    load_reslora,
    reslora_summary,
    save_reslora,
)
from reslora_kernels.chaining import parallel_copies


class Numbered(nn.Module):
    """Layers named block1, block2, ...: no numeric name part, so the default rule chains nothing."""

    def __init__(self, layers=3, features=6):
        super().__init__()
        for i in range(1, layers + 1):
            self.add_module(f"block{i}", nn.ModuleDict({"proj": nn.Linear(features, features)}))

    def forward(self, x):
        for block in self.children():
            x = torch.tanh(block["proj"](x))
        return x


class MoELayer(nn.Module):
    def __init__(self, features=6, experts=3):
        super().__init__()
        self.attn = nn.Linear(features, features)
        self.router = nn.Linear(features, experts)
        self.experts = nn.ModuleList(nn.ModuleDict({"w1": nn.Linear(features, features)}) for _ in range(experts))
        self.shared_expert = nn.ModuleDict({"w1": nn.Linear(features, features)})

    def forward(self, x):
        x = self.attn(x)
        choice = self.router(x).argmax(-1)
        out = self.shared_expert["w1"](x)
        for e, expert in enumerate(self.experts):
            rows = choice == e  # each expert runs on its own tokens
            if rows.any():
                out = out.index_add(0, rows.nonzero().flatten(), expert["w1"](x[rows]))
        return out


class MoE(nn.Module):
    def __init__(self, layers=3):
        super().__init__()
        self.layers = nn.ModuleList(MoELayer() for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def chains(model):
    return reslora_summary(model).chains


@pytest.mark.parametrize("mode", ["is", "bs", "ms"])
def test_names_without_layer_index_warn_that_no_chain_forms(mode):
    model = Numbered()
    with pytest.warns(UserWarning, match=rf"mode '{mode}' formed no chain of two or more blocks from 3 targets"):
        apply_reslora(model, ResLoRAConfig(mode=mode, target_modules=["proj"]))
    assert chains(model) == {}
    assert reslora_summary(model).unchained == ["block1.proj", "block2.proj", "block3.proj"]
    assert "not in a chain (train as first blocks): block1.proj" in str(reslora_summary(model))


def test_plain_lora_and_a_single_target_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_reslora(Numbered(), ResLoRAConfig(mode="none", target_modules=["proj"]))
        apply_reslora(Numbered(layers=1), ResLoRAConfig(mode="is", target_modules=["proj"]))


def test_regex_chain_key_chains_them_and_is_saved(tmp_path):
    config = ResLoRAConfig(mode="ms", target_modules=["proj"], chain_key=r"(?<=block)\d+")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = apply_reslora(Numbered(), config)
    assert chains(model) == {"block*.proj": ["block1.proj", "block2.proj", "block3.proj"]}
    model.train()(torch.randn(2, 6))  # the chain runs in model order
    save_reslora(model, tmp_path)
    fresh = load_reslora(Numbered(), tmp_path)
    assert fresh.reslora_config.chain_key == r"(?<=block)\d+"
    assert chains(fresh) == chains(model)


def test_function_chain_key_with_order_and_exclusions(tmp_path):
    def key(name):
        if name == "layers.1.other":
            return None  # stays out of any chain
        layer, _, rest = name.partition(".")[2].partition(".")
        return f"all.{rest}", -int(layer)  # chained last layer first

    model = nn.Module()
    model.layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(4, 4), "other": nn.Linear(4, 4)}) for _ in range(3))
    apply_reslora(model, ResLoRAConfig(mode="bs", target_modules=["proj", "other"], chain_key=key))
    assert chains(model) == {
        "all.proj": ["layers.2.proj", "layers.1.proj", "layers.0.proj"],
        "all.other": ["layers.2.other", "layers.0.other"],
    }
    assert reslora_summary(model).unchained == ["layers.1.other"]
    save_reslora(model, tmp_path)  # the function is not saved; the chains it formed are
    fresh = nn.Module()
    fresh.layers = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(4, 4), "other": nn.Linear(4, 4)}) for _ in range(3))
    load_reslora(fresh, tmp_path)
    assert fresh.reslora_config.chain_key is None and chains(fresh) == chains(model)


def test_chain_key_errors():
    with pytest.raises(ValueError, match="chain_key '\\(' is not a valid regex"):
        ResLoRAConfig(chain_key="(")
    with pytest.raises(ValueError, match=r"chain_key '\\\\d\*' matches the empty string"):
        ResLoRAConfig(chain_key=r"\d*")
    with pytest.raises(TypeError, match="chain_key must be a regex string, a function or None, got int"):
        ResLoRAConfig(chain_key=3)
    model = Numbered()
    before = list(model.named_modules())
    with pytest.raises(TypeError, match=r"chain_key\('block1.proj'\) returned 7; it must return a key"):
        apply_reslora(model, ResLoRAConfig(mode="is", target_modules=["proj"], chain_key=lambda name: 7))
    assert list(model.named_modules()) == before  # refused before anything changed


def test_moe_experts_form_no_chain_with_a_warning():
    model = MoE()
    with pytest.warns(UserWarning, match=r"9 target modules are parallel copies .*layers.0.experts.0.w1"):
        apply_reslora(model, ResLoRAConfig(mode="is", target_modules=["w1", "attn"]))
    assert chains(model) == {
        "layers.*.attn": [f"layers.{i}.attn" for i in range(3)],
        "layers.*.shared_expert.w1": [f"layers.{i}.shared_expert.w1" for i in range(3)],
    }
    assert all(len(expert["w1"].chain) == 1 for layer in model.layers for expert in layer.experts)
    model.train()
    for _ in range(3):  # routing differs per pass: unchained experts train whatever it is
        model(torch.randn(16, 6)).sum().backward()
    assert model.layers[1].experts[0]["w1"].lora_B.grad is not None


def test_parallel_copies_tells_experts_from_positions():
    t5 = [
        f"encoder.block.{b}.layer.{i}.{part}"
        for b in range(2)
        for i, part in enumerate(["SelfAttention.q", "DenseReluDense.wi"])
    ]
    moe = [f"layers.{b}.mlp.experts.{e}.w1" for b in range(2) for e in range(4)]
    assert parallel_copies(t5 + moe + ["layers.0.mlp.gate"]) == set(moe)


def test_t5_chains_every_position():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=32, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2
    )
    model = transformers.T5Model(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        apply_reslora(model, ResLoRAConfig(mode="is", target_modules=["q", "v"]))
    assert set(chains(model)) == {
        f"{stack}.block.*.layer.*.{attn}.{p}"
        for stack, attn in [("encoder", "SelfAttention"), ("decoder", "SelfAttention"), ("decoder", "EncDecAttention")]
        for p in ("q", "v")
    }


def test_alpha_zero_warns_once_where_it_is_set():
    with pytest.warns(UserWarning, match=r"alpha=0 makes the scaling alpha / rank zero.*nothing trains") as record:
        config = ResLoRAConfig(mode="is", alpha=0, target_modules=["proj"])
    assert len(record) == 1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        apply_reslora(nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(4, 4)}) for _ in range(3)]), config)
    assert not [w for w in record if "alpha=0" in str(w.message)]  # the config said it already
    with pytest.warns(UserWarning, match="alpha=0"):
        FusedResLoRALinear(4, 4, alpha=0)
    with pytest.warns(UserWarning, match="alpha=0"):
        FusedResLoRALinear.from_linear(nn.Linear(4, 4), alpha=0.0)


def test_a_block_can_say_where_it_is_for_error_messages():
    model = MoE()
    with pytest.warns(UserWarning, match="parallel copies"):
        apply_reslora(model, ResLoRAConfig(mode="is", target_modules=["w1", "attn"]))
    assert model.layers[2].attn._where() == "layers.2.attn (block 2 of chain 'layers.*.attn')"
    assert model.layers[0].experts[1]["w1"]._where() == "layers.0.experts.1.w1"  # unchained, still named
    assert FusedResLoRALinear(4, 4)._where() == "block 0"
