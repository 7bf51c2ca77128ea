"""Adapter files with modules to save and rsLoRA: saved and loaded bit-exactly, files from before
these settings still load, and the PEFT export reproduces the merged model with PEFT's own
modules_to_save and use_rslora."""

import copy
import json
import math

import pytest
import torch
from helpers import rel_err

transformers = pytest.importorskip("transformers")

from reslora_kernels import (  # noqa: E402
    FusedResLoRALinear,
    ModuleToSave,
    ResLoRAConfig,
    apply_reslora,
    export_peft_adapter,
    load_reslora,
    merge_and_unload,
    save_reslora,
)
from reslora_kernels import io as reslora_io  # noqa: E402


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    return transformers.BertForSequenceClassification(config).eval()


def trained(model, mode, **extra):
    config = ResLoRAConfig(mode=mode, rank=4, alpha=8.0, target_modules="all-linear", task_type="SEQ_CLS", **extra)
    apply_reslora(model, config)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, FusedResLoRALinear):
                mod.lora_A.normal_(0.0, 0.3)
                mod.lora_B.normal_(0.0, 0.1)
        model.classifier.trained_module.weight.normal_()
        model.classifier.trained_module.bias.normal_()
        model.train()
        for _ in range(3):  # norm statistics for input_norm
            model(input_ids=torch.randint(1, 50, (2, 6)))
    return model.eval()


IDS = torch.randint(1, 50, (3, 7))


@pytest.mark.parametrize("mode", ["is", "bs"])
def test_round_trip_with_modules_to_save_and_rslora(tmp_path, mode):
    base = tiny_bert()
    model = trained(copy.deepcopy(base), mode, use_rslora=True)
    save_reslora(model, tmp_path)
    meta = json.loads((tmp_path / "reslora_config.json").read_text())
    assert meta["modules_to_save"] == ["classifier"] and meta["config"]["use_rslora"] is True
    assert all(record["use_rslora"] for record in meta["blocks"]) and meta["config"]["task_type"] == "SEQ_CLS"
    fresh = load_reslora(copy.deepcopy(base), tmp_path)
    assert isinstance(fresh.classifier, ModuleToSave)
    assert torch.equal(fresh.classifier.trained_module.weight, model.classifier.trained_module.weight)
    assert torch.equal(fresh.classifier.original_module.weight, base.classifier.weight)  # the base's own head
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=IDS).logits, model(input_ids=IDS).logits)
    # Into a model that has the blocks already: the same modules to save are required.
    load_reslora(fresh, tmp_path)
    settings = dict(mode=mode, rank=4, alpha=8.0, target_modules="all-linear", task_type="SEQ_CLS")
    other_config = ResLoRAConfig(**settings, use_rslora=True, modules_to_save=["embeddings.LayerNorm"])
    other = apply_reslora(copy.deepcopy(base), other_config)
    with pytest.raises(ValueError, match=r"modules to save \['bert.embeddings.LayerNorm', 'classifier'\] differ"):
        load_reslora(other, tmp_path)
    plain = apply_reslora(copy.deepcopy(base), ResLoRAConfig(**settings))
    with pytest.raises(ValueError, match="'use_rslora': False"):
        load_reslora(plain, tmp_path)


def _rewrite(path, edit):
    meta = json.loads((path / "reslora_config.json").read_text())
    edit(meta)
    meta["sha256"]["config"] = reslora_io._meta_sha256(meta)
    (path / "reslora_config.json").write_text(json.dumps(meta))


def test_files_from_before_rslora_and_modules_to_save_load(tmp_path):
    base = tiny_bert()
    model = apply_reslora(copy.deepcopy(base), ResLoRAConfig(mode="is", rank=4, target_modules=["query", "value"]))
    save_reslora(model, tmp_path)

    def strip(meta):  # what a file written before these settings holds
        for record in meta["blocks"]:
            del record["use_rslora"]
        del meta["modules_to_save"]
        del meta["config"]["use_rslora"], meta["config"]["modules_to_save"], meta["config"]["task_type"]

    _rewrite(tmp_path, strip)
    fresh = load_reslora(copy.deepcopy(base), tmp_path)
    load_reslora(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_a_damaged_head_is_refused_before_anything_changes(tmp_path):
    from safetensors.torch import load_file, save_file

    base = tiny_bert()
    save_reslora(trained(copy.deepcopy(base), "ms"), tmp_path)
    tensors = load_file(str(tmp_path / "reslora_adapter.safetensors"))
    tensors["classifier.weight"] = tensors["classifier.weight"][:2]
    save_file(tensors, str(tmp_path / "reslora_adapter.safetensors"), metadata={"format": "pt"})
    _rewrite(tmp_path, lambda meta: meta["sha256"].update(
        weights=reslora_io._sha256((tmp_path / "reslora_adapter.safetensors").read_bytes())
    ))
    target = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"classifier.weight is \(2, 16\), the model's is \(3, 16\)"):
        load_reslora(target, tmp_path)
    assert type(target.classifier) is torch.nn.Linear


@pytest.mark.parametrize(
    "mode, method, rslora", [("is", "input_norm", True), ("bs", "exact", True), ("ms", "auto", False)]
)
def test_peft_export_reproduces_the_merged_model_with_its_head(tmp_path, mode, method, rslora):
    peft = pytest.importorskip("peft")
    base = tiny_bert()
    model = trained(copy.deepcopy(base), mode, use_rslora=rslora, pre_num=-1)
    export_peft_adapter(model, tmp_path, method)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_rslora"] is rslora and config["modules_to_save"] == ["classifier"]
    assert config["task_type"] == "SEQ_CLS"
    assert config["lora_alpha"] == (math.sqrt(config["r"]) if rslora else config["r"])
    if mode == "bs":
        assert config["alpha_pattern"] and all(
            alpha == (math.sqrt(config["rank_pattern"][key]) if rslora else config["rank_pattern"][key])
            for key, alpha in config["alpha_pattern"].items()
        )
    merged = merge_and_unload(copy.deepcopy(model), method)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        expected = merged(input_ids=IDS).logits
        got = loaded(input_ids=IDS).logits
    assert rel_err(got, expected) < 1e-5
    assert not torch.allclose(base(input_ids=IDS).logits, expected)  # the head and adapters did change it
