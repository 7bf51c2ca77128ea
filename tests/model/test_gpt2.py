"""GPT-2's Conv1D layers (weight [in, out]) in every mode, merged back, saved, exported to PEFT;
target_modules="all-linear" and the default targets per model type."""

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
from helpers import LLAMA_TARGETS, check_against_oracle, randomize_adapters, rel_err, tiny_llama

from reslora_kernels import (
    DEFAULT_TARGET_MODULES,
    MODES,
    FusedResLoRALinear,
    ResLoRAConfig,
    apply_reslora,
    export_peft_adapter,
    load_reslora,
    merge_and_unload,
    reslora_summary,
    save_reslora,
    set_backend,
)

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_gpt2(dtype=torch.float64, layers=3, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=64,
        n_embd=32,
        n_layer=layers,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    config._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


@pytest.mark.parametrize("mode", MODES)
def test_gpt2_matches_oracle(mode):
    """Forward and every gradient against the formulas, Conv1D weights transposed for them."""
    check_against_oracle(tiny_gpt2, GPT2_TARGETS, mode, -1, lambda m: m.transformer.wte)


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("mode", ["is", "ms"])
def test_conv1d_block_equals_the_linear_block(monkeypatch, backend, mode):
    """The [out, in] view of the [in, out] weight goes to the op as is (strides), on both backends."""
    set_backend(backend)
    torch.manual_seed(0)
    conv = Conv1D(24, 16)
    block = FusedResLoRALinear.from_linear(conv, rank=4, alpha=8, mode=mode)
    linear = FusedResLoRALinear(16, 24, rank=4, alpha=8, mode=mode)
    with torch.no_grad():
        nn.init.normal_(block.lora_B)
        nn.init.normal_(conv.bias)
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
        linear.lora_A.copy_(block.lora_A)
        linear.lora_B.copy_(block.lora_B)
    assert block.weight.shape == (24, 16) and block.weight.data_ptr() == conv.weight.data_ptr()
    x = torch.randn(2, 5, 16)
    probe = torch.randn(2, 5, 24)
    (block(x) * probe).sum().backward()
    (linear(x) * probe).sum().backward()
    torch.testing.assert_close(block(x), linear(x), rtol=1e-5, atol=1e-6)
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(block, name).grad, getattr(linear, name).grad, rtol=1e-5, atol=1e-6)
    assert int(block.statistics.norm_count) == int(linear.statistics.norm_count) == 2


def test_gpt2_merges_back_to_its_conv1d_modules():
    model = tiny_gpt2()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    originals = {name: mod for name, mod in model.named_modules() if isinstance(mod, Conv1D)}
    apply_reslora(model, ResLoRAConfig(mode="bs", pre_num=-1, target_modules=GPT2_TARGETS))
    assert all(model.get_submodule(name).base_layer is mod for name, mod in originals.items())
    assert model.transformer.h[0].attn.c_attn.state_dict()["base_layer.weight"].shape == (32, 96)  # Conv1D's layout
    randomize_adapters(model)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        merge_and_unload(model)
        after = model(ids).logits
    assert rel_err(after, before) < 1e-10
    assert all(model.get_submodule(name) is mod and type(mod) is Conv1D for name, mod in originals.items())
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def test_a_conv1d_block_merges_back_to_its_conv1d():
    conv = Conv1D(6, 8).double()
    block = FusedResLoRALinear.from_linear(conv, mode="none")
    nn.init.normal_(block.lora_B)
    assert block.fan_in_fan_out and block.base_layer.weight.shape == (8, 6) and block.weight.shape == (6, 8)
    assert (block.in_features, block.out_features) == (8, 6)
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = block(x).detach()
    merged = merge_and_unload(block)
    assert merged is conv and type(merged) is Conv1D and not conv.weight.requires_grad
    assert rel_err(conv(x), expected) < 1e-12
    block = FusedResLoRALinear.from_linear(Conv1D(64, 32))
    with torch.no_grad():
        block.bias.fill_(1.0)
    block.reset_parameters()  # as Conv1D's constructor: normal(std 0.02) weight, zero bias
    assert not block.bias.any() and 0.01 < float(block.weight.std()) < 0.03
    with pytest.raises(TypeError, match="from_linear needs an nn.Linear or a transformers Conv1D: got a Embedding"):
        FusedResLoRALinear.from_linear(nn.Embedding(4, 4))


def test_gpt2_save_load_round_trip(tmp_path):
    model = tiny_gpt2(torch.float32)
    apply_reslora(model, ResLoRAConfig(mode="is", rank=4, target_modules=GPT2_TARGETS))
    randomize_adapters(model)
    model.train()
    ids = torch.randint(0, 64, (2, 8))
    for _ in range(2):
        model(ids)
    save_reslora(model, tmp_path)
    fresh = load_reslora(tiny_gpt2(torch.float32), tmp_path)
    assert type(fresh.transformer.h[2].mlp.c_proj.base_layer) is Conv1D
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("mode, method", [("is", "input_norm"), ("bs", "exact"), ("ms", "lstsq")])
def test_gpt2_peft_export_with_fan_in_fan_out(tmp_path, mode, method):
    peft = pytest.importorskip("peft")
    base = tiny_gpt2(torch.float32)
    model = copy.deepcopy(base)
    apply_reslora(model, ResLoRAConfig(mode=mode, rank=4, alpha=8, target_modules=GPT2_TARGETS))
    randomize_adapters(model)
    model.train()
    for _ in range(3):
        model(torch.randint(0, 64, (2, 8)))
    calibration = [torch.randint(0, 64, (2, 8)) for _ in range(3)] if method == "lstsq" else None
    export_peft_adapter(model, tmp_path, method, calibration=calibration)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    merged = merge_and_unload(copy.deepcopy(model), method, calibration=calibration)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert isinstance(peft_model.base_model.model.transformer.h[0].attn.c_attn.base_layer, Conv1D)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert rel_err(peft_model(ids).logits, merged.eval()(ids).logits) < 1e-5


# ---------------------------------------------------------------------------- which modules
def test_all_linear_takes_every_linear_layer_but_the_output_head():
    llama = apply_reslora(tiny_llama(torch.float32), ResLoRAConfig(mode="is", target_modules="all-linear"))
    replaced = reslora_summary(llama).replaced
    assert len(replaced) == 21 and {name.rsplit(".", 1)[-1] for name in replaced} == set(LLAMA_TARGETS)
    assert type(llama.lm_head) is nn.Linear
    gpt2 = apply_reslora(tiny_gpt2(), ResLoRAConfig(mode="ms", target_modules="all-linear"))
    assert len(reslora_summary(gpt2).replaced) == 12 and type(gpt2.lm_head) is nn.Linear
    assert "targets: all-linear (every linear layer but the output head)" in str(reslora_summary(gpt2))
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))  # no output head to tell apart
    apply_reslora(plain, ResLoRAConfig(mode="none", target_modules="all-linear"))
    assert isinstance(plain[0], FusedResLoRALinear) and isinstance(plain[2], FusedResLoRALinear)


def test_all_linear_leaves_out_what_it_cannot_adapt_and_says_so():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    with pytest.warns(UserWarning, match=r"all-linear leaves out: self_attn.out_proj is the output projection"):
        apply_reslora(layer, ResLoRAConfig(mode="none", target_modules="all-linear"))
    assert isinstance(layer.linear1, FusedResLoRALinear) and not isinstance(
        layer.self_attn.out_proj, FusedResLoRALinear
    )


def _tiny(kind):
    small = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2}
    heads = {"num_attention_heads": 2, "num_key_value_heads": 2}
    configs = {
        "llama": lambda: transformers.LlamaConfig(**small, **heads),
        "mistral": lambda: transformers.MistralConfig(**small, **heads),
        "qwen2": lambda: transformers.Qwen2Config(**small, **heads),
        "gemma": lambda: transformers.GemmaConfig(**small, **heads, head_dim=8),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2),
        "bert": lambda: transformers.BertConfig(**small, num_attention_heads=2),
        "roberta": lambda: transformers.RobertaConfig(**small, num_attention_heads=2),
        "t5": lambda: transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2),
        "bart": lambda: transformers.BartConfig(
            vocab_size=64,
            d_model=16,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=24,
            decoder_ffn_dim=24,
        ),
    }
    return transformers.AutoModel.from_config(configs[kind]())


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gemma", "gpt2", "bert", "roberta", "t5", "bart"])
def test_default_targets_per_model_type(kind):
    model = _tiny(kind)
    assert model.config.model_type == kind
    apply_reslora(model, ResLoRAConfig(mode="bs"))  # target_modules omitted
    summary = reslora_summary(model)
    wanted = DEFAULT_TARGET_MODULES[kind]
    assert summary.replaced and all(name.rsplit(".", 1)[-1] in wanted for name in summary.replaced)
    assert {name.rsplit(".", 1)[-1] for name in summary.replaced} == set(wanted)
    assert f"(the default for model_type {kind!r})" in str(summary)


def test_defaults_agree_with_peft():
    """Our defaults are PEFT's LoRA defaults for the same families (peft/utils/constants.py)."""
    constants = pytest.importorskip("peft.utils.constants")
    peft_defaults = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    assert {kind: peft_defaults[kind] for kind in DEFAULT_TARGET_MODULES} == DEFAULT_TARGET_MODULES
