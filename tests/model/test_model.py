"""apply_reslora on plain modules and on tiny HuggingFace models, against the oracle."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from helpers import LLAMA_TARGETS, check_against_oracle, randomize_adapters, rel_err, tiny_llama

from reslora_kernels import FusedResLoRALinear, ResLoRAConfig, apply_reslora, reslora_summary

transformers = pytest.importorskip("transformers")


def tiny_bert(dtype=torch.float64, layers=3):
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    return transformers.BertModel(config).to(dtype).eval()


BERT_TARGETS = ["query", "value", "dense"]


@pytest.mark.parametrize("pre_num", [1, -1])
@pytest.mark.parametrize("mode", ["none", "is", "bs", "ms"])
def test_llama_matches_oracle(mode, pre_num):
    check_against_oracle(tiny_llama, LLAMA_TARGETS, mode, pre_num, lambda m: m.model.embed_tokens)


@pytest.mark.parametrize("pre_num", [2])
@pytest.mark.parametrize("mode", ["none", "is", "bs", "ms"])
def test_bert_matches_oracle(mode, pre_num):
    check_against_oracle(tiny_bert, BERT_TARGETS, mode, pre_num, lambda m: m.embeddings.word_embeddings)


def test_apply_reslora_on_llama_replaces_links_and_freezes():
    model = tiny_llama(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    apply_reslora(model, ResLoRAConfig(mode="is", rank=4, target_modules=LLAMA_TARGETS))
    summary = reslora_summary(model)
    assert len(summary.replaced) == 3 * 7
    assert summary.replaced[0] == "model.layers.0.self_attn.q_proj"
    assert set(summary.chains) == {
        f"model.layers.*.{part}.{t}"
        for t in LLAMA_TARGETS
        for part in ["self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"]
    }
    assert summary.chains["model.layers.*.self_attn.q_proj"] == [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
    lora = sum(m.lora_A.numel() + m.lora_B.numel() for m in model.modules() if isinstance(m, FusedResLoRALinear))
    assert summary.trainable_params == lora
    assert summary.total_params == n_params + lora
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert "21 linear layers replaced, 7 chains" in str(summary)


def test_bert_chains_follow_each_position():
    """BERT has three different 'dense' Linears per layer: each position is its own chain."""
    model = tiny_bert()
    apply_reslora(model, ResLoRAConfig(mode="bs", target_modules=["dense"]))
    chains = reslora_summary(model).chains
    assert set(chains) == {
        "encoder.layer.*.attention.output.dense",
        "encoder.layer.*.intermediate.dense",
        "encoder.layer.*.output.dense",
    }
    assert chains["encoder.layer.*.output.dense"] == [f"encoder.layer.{i}.output.dense" for i in range(3)]
    assert isinstance(model.pooler.dense, FusedResLoRALinear)  # replaced, a chain of its own


class Stack(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"proj": nn.Linear(i, o), "other": nn.Linear(o, o)}) for i, o in shapes
        )


def test_shape_change_starts_a_new_chain_with_a_warning():
    model = Stack([(8, 8), (8, 8), (8, 4), (4, 4)])
    with pytest.warns(UserWarning) as record:
        apply_reslora(model, ResLoRAConfig(mode="is", target_modules=["proj"]))
    assert [str(w.message) for w in record] == [
        "ResLoRA: layers.2.proj (8->4) differs in shape from layers.1.proj (8->8); a new chain starts at layers.2.proj",
        "ResLoRA: layers.3.proj (4->4) differs in shape from layers.2.proj (8->4); a new chain starts at layers.3.proj",
    ]
    chains = reslora_summary(model).chains
    assert chains == {"layers.*.proj": ["layers.0.proj", "layers.1.proj"]}  # 8->4 and 4->4 stand alone
    assert len(model.layers[2]["proj"].chain) == 1 and len(model.layers[3]["proj"].chain) == 1


def test_regex_targets_and_no_linking_for_plain_lora():
    model = Stack([(8, 8), (8, 8)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_reslora(model, ResLoRAConfig(mode="none", target_modules=r"layers\.\d+\.other"))
    assert isinstance(model.layers[0]["other"], FusedResLoRALinear)
    assert not isinstance(model.layers[0]["proj"], FusedResLoRALinear)
    assert reslora_summary(model).chains == {}


def test_apply_reslora_errors():
    model = Stack([(8, 8)])
    with pytest.raises(
        ValueError,
        match=r"no linear layer \(nn.Linear or Conv1D\) in the model matches target_modules=\['q_proj'\] "
        r"\(target_modules\); its linear layers are: layers.\*.proj, layers.\*.other",
    ):
        apply_reslora(model, ResLoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(
        ValueError,
        match=r"target_modules is not set and model_type None has no default targets \(defaults exist for bart, "
        r"bert, .*\); the model's linear layers are: layers",
    ):
        apply_reslora(model, ResLoRAConfig())
    with pytest.raises(TypeError, match="ResLoRAConfig"):
        apply_reslora(model, {"target_modules": ["proj"]})
    apply_reslora(model, ResLoRAConfig(target_modules=["proj"]))
    with pytest.raises(ValueError, match="already has ResLoRA layers"):
        apply_reslora(model, ResLoRAConfig(target_modules=["other"]))
    mha = nn.TransformerEncoderLayer(16, 2)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        apply_reslora(mha, ResLoRAConfig(target_modules=["out_proj"]))
    with pytest.raises(ValueError, match="not a valid regex"):
        ResLoRAConfig(target_modules="(")


def test_shared_linear_is_replaced_everywhere():
    shared = nn.Linear(4, 4)
    model = nn.ModuleDict({"a": nn.ModuleDict({"proj": shared}), "b": nn.ModuleDict({"proj": shared})})
    apply_reslora(model, ResLoRAConfig(mode="none", target_modules=["proj"]))
    assert model["a"]["proj"] is model["b"]["proj"]
    assert isinstance(model["b"]["proj"], FusedResLoRALinear)


def _lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["none", "is", "bs", "ms"])
def test_hf_gradient_checkpointing(mode):
    """Non-reentrant checkpointing (transformers' default) recomputes each decoder layer in backward;
    every mode gets the gradients of the run without it (dropout included: the recomputed forward
    redraws the same seeds)."""
    base = tiny_llama(torch.float64)
    config = ResLoRAConfig(mode=mode, target_modules=LLAMA_TARGETS, pre_num=-1 if mode == "ms" else 1, dropout=0.1)
    plain = apply_reslora(copy.deepcopy(base), config)
    randomize_adapters(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 64, (2, 8))
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(3)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    expected, got = _lora_grads(plain), _lora_grads(checkpointed)
    assert set(expected) == set(got) and len(got) == 2 * 7 * 3
    for name, grad in expected.items():
        assert rel_err(got[name], grad) < 1e-12, name


@pytest.mark.parametrize("mode", ["is", "ms"])
def test_hf_reentrant_checkpointing_raises_naming_the_fix(mode):
    model = apply_reslora(tiny_llama(torch.float32), ResLoRAConfig(mode=mode, target_modules=LLAMA_TARGETS))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids = torch.randint(0, 64, (2, 8))
    with pytest.raises(RuntimeError, match=r'"use_reentrant": False'):
        model(input_ids=ids, labels=ids, use_cache=False)
