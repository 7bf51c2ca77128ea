"""LoRA+ on a ResLoRA model: lora_B at lr * ratio, lora_A at lr, everything else trainable at lr
(our helper); PEFT's create_loraplus_optimizer works on the model too, with its own grouping."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from reslora_kernels import ResLoRAConfig, apply_reslora, loraplus_param_groups, reslora_blocks  # noqa: E402


def model_with_head():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    model = transformers.BertForSequenceClassification(config)
    apply_reslora(model, ResLoRAConfig(mode="bs", rank=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    model.bert.embeddings.LayerNorm.weight.requires_grad_(True)  # something else unfrozen by hand
    return model


def _lr_of(optimizer):
    return {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}


def test_loraplus_groups():
    model = model_with_head()
    groups = loraplus_param_groups(model, lr=1e-4, ratio=16.0, weight_decay=0.01)
    optimizer = torch.optim.AdamW(groups)
    lr = _lr_of(optimizer)
    blocks = [block for _, block in reslora_blocks(model)]
    assert len(blocks) == 4
    for block in blocks:
        assert lr[id(block.lora_A)] == 1e-4 and lr[id(block.lora_B)] == 1e-4 * 16.0
    head = model.classifier.trained_module
    for param in (head.weight, head.bias, model.bert.embeddings.LayerNorm.weight):
        assert lr[id(param)] == 1e-4  # not a LoRA factor: the base rate
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(map(id, trainable)) == sorted(lr)  # every trainable parameter once, no frozen one
    assert [g["name"] for g in optimizer.param_groups] == ["lora_A", "lora_B", "other"]
    assert all(g["weight_decay"] == 0.01 for g in optimizer.param_groups)
    model(input_ids=torch.randint(1, 50, (2, 5)), labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()  # the groups are a working optimizer


def test_loraplus_errors():
    with pytest.raises(ValueError, match="ratio must be a positive number, got 0"):
        loraplus_param_groups(model_with_head(), lr=1e-4, ratio=0)
    with pytest.raises(ValueError, match="the model has no ResLoRA layers"):
        loraplus_param_groups(torch.nn.Linear(2, 2), lr=1e-4)


def test_peft_create_loraplus_optimizer_on_a_reslora_model():
    pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    model = model_with_head()
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=8.0)
    lr = _lr_of(optimizer)
    for _, block in reslora_blocks(model):
        assert lr[id(block.lora_A)] == 1e-4 and lr[id(block.lora_B)] == 8e-4
    # PEFT's rule: every one-dimensional trainable parameter joins lora_B's rate, a head's weight lora_A's.
    assert lr[id(model.classifier.trained_module.weight)] == 1e-4
    assert lr[id(model.classifier.trained_module.bias)] == 8e-4
