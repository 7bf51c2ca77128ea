"""modules_to_save and task_type: heads trained in full beside the adapters, as PEFT 0.21 chooses
them; all-linear leaves a classification head out exactly where PEFT does."""

import warnings

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from reslora_kernels import (  # noqa: E402
    FusedResLoRALinear,
    ModuleToSave,
    ResLoRAConfig,
    apply_reslora,
    disable_adapter,
    merge_and_unload,
    reslora_blocks,
    reslora_summary,
    unload,
)


def tiny_bert(cls=None, **extra):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    return (cls or transformers.BertForSequenceClassification)(config).eval()


def tiny_llama(cls):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_labels=3,
        pad_token_id=0,
    )
    return cls(config).eval()


def _blocks(model):
    return sorted(name for name, _ in reslora_blocks(model))


def _saved(model):
    return sorted(name for name, mod in model.named_modules() if isinstance(mod, ModuleToSave))


def _peft(model, **config):
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear", **config))
    lora = sorted(
        name.removeprefix("base_model.model.")
        for name, mod in wrapped.named_modules()
        if isinstance(mod, peft.tuners.lora.LoraLayer)
    )
    saved = sorted(
        name.removeprefix("base_model.model.")
        for name, mod in wrapped.named_modules()
        if isinstance(mod, peft.utils.other.ModulesToSaveWrapper)
    )
    return lora, saved


@pytest.mark.parametrize(
    "build, task_type",
    [
        (lambda: tiny_bert(), "SEQ_CLS"),
        (lambda: tiny_bert(), None),
        (lambda: tiny_llama(transformers.LlamaForSequenceClassification), "SEQ_CLS"),
        (lambda: tiny_llama(transformers.LlamaForSequenceClassification), None),
        (lambda: tiny_llama(transformers.LlamaForCausalLM), "CAUSAL_LM"),
        (lambda: tiny_llama(transformers.LlamaForCausalLM), None),
    ],
    ids=["bert-seqcls", "bert-none", "llama-seqcls", "llama-none", "llama-causal", "llama-causal-none"],
)
def test_all_linear_and_the_heads_to_save_match_peft(build, task_type):
    peft_lora, peft_saved = _peft(build(), task_type=task_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = apply_reslora(build(), ResLoRAConfig(rank=2, target_modules="all-linear", task_type=task_type))
    assert _blocks(model) == peft_lora
    assert _saved(model) == peft_saved


def test_seq_cls_head_trains_in_full_and_the_adapter_off_gives_the_original():
    base = tiny_bert()
    config = ResLoRAConfig(mode="is", rank=2, target_modules="all-linear", task_type="SEQ_CLS")
    model = apply_reslora(tiny_bert(), config)
    head = model.classifier
    assert isinstance(head, ModuleToSave) and not isinstance(head.trained_module, FusedResLoRALinear)
    assert all(p.requires_grad for p in head.trained_module.parameters())
    assert not any(p.requires_grad for p in head.original_module.parameters())
    assert head.weight is head.trained_module.weight  # attributes read from the module that runs
    assert "trained in full (modules_to_save): classifier" in str(reslora_summary(model))
    ids = torch.randint(1, 50, (2, 5))
    loss = model(input_ids=ids, labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert head.trained_module.weight.grad is not None and head.original_module.weight.grad is None
    with torch.no_grad():
        head.trained_module.weight.add_(1.0)
        trained = model(input_ids=ids).logits
        with disable_adapter(model):
            assert head.weight is head.original_module.weight
            assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    assert not torch.equal(trained, base(input_ids=ids).logits)


def test_modules_to_save_by_name_keep_blocks_out_of_them():
    model = apply_reslora(
        tiny_bert(), ResLoRAConfig(rank=2, target_modules=["query", "dense"], modules_to_save=["layer.1.output"])
    )
    assert _saved(model) == ["bert.encoder.layer.1.output"]
    # No block inside a module to save (PEFT's rule): layer 1's output.dense stays a plain Linear there.
    assert "bert.encoder.layer.1.output.dense" not in _blocks(model)
    assert isinstance(model.bert.encoder.layer[1].output.trained_module.dense, nn.Linear)
    assert "bert.encoder.layer.0.output.dense" in _blocks(model)


def test_merge_and_unload_put_the_trained_copy_in_place():
    for finish in (merge_and_unload, unload):
        model = apply_reslora(tiny_bert(), ResLoRAConfig(rank=2, target_modules=["query"], task_type="SEQ_CLS"))
        trained = model.classifier.trained_module
        with torch.no_grad():
            trained.weight.normal_()
        ids = torch.randint(1, 50, (2, 5))
        before = model(input_ids=ids).logits
        out = finish(model)
        assert out.classifier is trained and not _saved(out)
        assert torch.allclose(out(input_ids=ids).logits, before, atol=1e-6)


def test_errors_and_warnings():
    with pytest.raises(ValueError, match=r"modules_to_save \['nowhere'\] match no module of the model"):
        apply_reslora(tiny_bert(), ResLoRAConfig(target_modules=["query"], modules_to_save=["nowhere"]))
    with pytest.raises(ValueError, match="modules_to_save must be a list of module names"):
        ResLoRAConfig(modules_to_save="classifier")
    with pytest.raises(ValueError, match="unknown task_type 'SEQ'"):
        ResLoRAConfig(task_type="SEQ")
    with pytest.raises(ValueError, match=r"outside modules_to_save \['classifier'\]"):
        apply_reslora(tiny_bert(), ResLoRAConfig(target_modules=["classifier"], task_type="SEQ_CLS"))
    with pytest.warns(UserWarning, match="all-linear puts a LoRA on the classification head 'classifier'"):
        apply_reslora(tiny_bert(), ResLoRAConfig(target_modules="all-linear"))
    llama = tiny_llama(transformers.LlamaForCausalLM)
    llama.lm_head.weight = llama.model.embed_tokens.weight  # tied
    with pytest.warns(UserWarning, match="lm_head \\(modules_to_save\\) shares parameters with model.embed_tokens"):
        apply_reslora(llama, ResLoRAConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    model = apply_reslora(tiny_bert(), ResLoRAConfig(target_modules=["query"], task_type="SEQ_CLS"))
    with pytest.raises(TypeError, match="the module is a ModuleToSave already"):
        ModuleToSave(model.classifier)
