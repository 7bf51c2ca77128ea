"""apply_reslora on plain modules and on tiny HuggingFace models, against the oracle."""

import copy
import re
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import rel_err
from oracle import block_output

from reslora_kernels import FusedResLoRALinear, ResLoRAConfig, apply_reslora, reslora_summary

transformers = pytest.importorskip("transformers")


def tiny_llama(dtype=torch.float64, layers=3):
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


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


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "value", "dense"]


def randomize_adapters(model):
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, FusedResLoRALinear):
                mod.lora_A.normal_(0.0, 0.2)
                mod.lora_B.normal_(0.0, 0.2)


def oracle_model(base, model, config):
    """``base`` (a plain copy) with forward hooks that compute every target Linear's output from
    the oracle formulas, with leaf copies of ``model``'s adapters. Chains are grouped here by
    replacing layer indices with '*', independently of the package."""
    groups = {}
    for name, mod in model.named_modules():
        if isinstance(mod, FusedResLoRALinear):
            groups.setdefault(re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name), []).append((name, mod))
    leaves = {}
    for members in groups.values():
        params = []
        for name, mod in members:
            A = mod.lora_A.detach().clone().requires_grad_()
            B = mod.lora_B.detach().clone().requires_grad_()
            leaves[name] = (A, B)
            linear = base.get_submodule(name)
            # A Conv1D base (GPT-2) stores its weight [in, out]; the formulas take [out, in].
            weight = linear.weight if isinstance(linear, nn.Linear) else linear.weight.t()
            params.append((weight, linear.bias, A, B))
        state = {"xs": [], "zs": []}
        for n, (name, _) in enumerate(members):

            def hook(mod, args, out, n=n, params=params, state=state):
                if n == 0:
                    state["xs"].clear()
                    state["zs"].clear()
                state["xs"].append(args[0])
                return block_output(
                    n, state["xs"], params, config.alpha / config.rank, config.mode, config.pre_num, zs=state["zs"]
                )

            base.get_submodule(name).register_forward_hook(hook)
    return leaves


def check_against_oracle(build, targets, mode, pre_num, embed):
    base = build()
    model = copy.deepcopy(base)
    config = ResLoRAConfig(mode=mode, rank=4, alpha=8, pre_num=pre_num, target_modules=targets)
    apply_reslora(model, config)
    randomize_adapters(model)
    leaves = oracle_model(base, model, config)

    ids = torch.randint(0, 64, (2, 7))
    emb = embed(model)(ids).detach().requires_grad_()
    emb_ref = emb.detach().clone().requires_grad_()
    # Every tensor output (BERT's pooler output too, so the pooler's adapter gets gradient).
    outs = [t for t in model(inputs_embeds=emb).to_tuple() if isinstance(t, torch.Tensor)]
    outs_ref = [t for t in base(inputs_embeds=emb_ref).to_tuple() if isinstance(t, torch.Tensor)]
    probes = [torch.randn_like(t) for t in outs]
    sum((t * w).sum() for t, w in zip(outs, probes)).backward()
    sum((t * w).sum() for t, w in zip(outs_ref, probes)).backward()

    for out, out_ref in zip(outs, outs_ref, strict=True):
        assert rel_err(out, out_ref) < 1e-10
    assert rel_err(emb.grad, emb_ref.grad) < 1e-10
    for name, (A_ref, B_ref) in leaves.items():
        layer = model.get_submodule(name)
        assert rel_err(layer.lora_A.grad, A_ref.grad) < 1e-10, name
        assert rel_err(layer.lora_B.grad, B_ref.grad) < 1e-10, name


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
