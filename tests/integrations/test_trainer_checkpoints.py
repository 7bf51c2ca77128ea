"""transformers.Trainer with ResLoRATrainerMixin: checkpoints hold the adapter, the modules to save
and the optimizer state, not the base model; resuming from one reproduces the uninterrupted run
bit for bit (CPU, float32)."""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from reslora_kernels import ModuleToSave, ResLoRAConfig, apply_reslora  # noqa: E402
from reslora_kernels.trainer import ResLoRATrainer, ResLoRATrainerMixin, is_adapter_checkpoint  # noqa: E402


def _model(mode):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3
    )
    model = transformers.BertForSequenceClassification(config)  # hidden dropout 0.1: the RNG state matters
    settings = dict(mode=mode, rank=4, alpha=8.0, dropout=0.1, target_modules="all-linear", task_type="SEQ_CLS")
    return apply_reslora(model, ResLoRAConfig(**settings))


def _data(n=24):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (n, 6), generator=generator)
    labels = torch.randint(0, 3, (n,), generator=generator)
    mask = torch.ones(6, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]


def _args(out, **overrides):
    values = dict(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        warmup_steps=1,
        save_strategy="steps",
        save_steps=3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=7,
        disable_tqdm=True,
    )
    values.update(overrides)
    return transformers.TrainingArguments(**values)


def _trainable(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _losses(trainer):
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


@pytest.mark.parametrize("mode", ["is", "ms"])
def test_adapter_only_checkpoints_resume_exactly(tmp_path, mode):
    model = _model(mode)
    trainer = ResLoRATrainer(model=model, args=_args(tmp_path / "full"), train_dataset=_data())
    trainer.train()
    full_losses, full_params = _losses(trainer), _trainable(model)

    checkpoint = tmp_path / "full" / "checkpoint-3"
    files = set(os.listdir(checkpoint))
    assert {"reslora_config.json", "reslora_adapter.safetensors", "optimizer.pt", "scheduler.pt"} <= files
    assert {"trainer_state.json", "rng_state.pth", "training_args.bin"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}  # no base model
    assert is_adapter_checkpoint(checkpoint)
    # The adapter file holds the adapters, statistics and the head's trained copy, nothing of the base.
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "reslora_adapter.safetensors"))
    assert {"classifier.weight", "classifier.bias"} <= set(saved)
    assert not [key for key in saved if "embeddings" in key or "base_layer" in key or "LayerNorm" in key]
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not p.requires_grad)
    assert os.path.getsize(checkpoint / "reslora_adapter.safetensors") < base_bytes / 4
    # The optimizer state covers the trainable parameters only.
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert sum(s["exp_avg"].numel() for s in optimizer_state.values()) == sum(p.numel() for p in full_params.values())

    resumed_model = _model(mode)
    resumed = ResLoRATrainer(model=resumed_model, args=_args(tmp_path / "resumed"), train_dataset=_data())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    # Steps 1-3 come back from the checkpoint's trainer state; 4-6 were computed again, from it.
    resumed_losses = _losses(resumed)
    assert sorted(resumed_losses) == [1, 2, 3, 4, 5, 6] and resumed.state.global_step == 6
    assert resumed_losses == full_losses  # bitwise: the same floats
    resumed_params = _trainable(resumed_model)
    assert resumed_params.keys() == full_params.keys()
    for name, value in full_params.items():
        assert torch.equal(resumed_params[name], value), name
    for name, buffer in model.named_buffers():
        assert torch.equal(dict(resumed_model.named_buffers())[name], buffer), name  # merge statistics too


def test_resume_refuses_an_adapter_the_model_does_not_match(tmp_path):
    model = _model("is")
    ResLoRATrainer(model=model, args=_args(tmp_path / "a", max_steps=3), train_dataset=_data()).train()
    other = apply_reslora(
        transformers.BertForSequenceClassification(model.config),
        ResLoRAConfig(mode="is", rank=2, target_modules="all-linear", task_type="SEQ_CLS"),
    )
    trainer = ResLoRATrainer(model=other, args=_args(tmp_path / "b"), train_dataset=_data())
    with pytest.raises(ValueError, match="has settings"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))


def test_the_mixin_composes_with_any_trainer_and_leaves_other_models_alone(tmp_path):
    class MyTrainer(ResLoRATrainerMixin, transformers.Trainer):
        pass

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=3
    )
    plain = transformers.BertForSequenceClassification(config)
    MyTrainer(model=plain, args=_args(tmp_path / "plain", max_steps=3), train_dataset=_data()).train()
    files = set(os.listdir(tmp_path / "plain" / "checkpoint-3"))
    assert "model.safetensors" in files and "reslora_config.json" not in files  # Trainer's own checkpoint
    assert issubclass(ResLoRATrainer, ResLoRATrainerMixin) and issubclass(ResLoRATrainer, transformers.Trainer)


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    model = _model("bs")
    args = _args(
        tmp_path / "best",
        eval_strategy="steps",
        eval_steps=3,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=False,
    )
    trainer = ResLoRATrainer(model=model, args=args, train_dataset=_data(), eval_dataset=_data(8))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert is_adapter_checkpoint(best)
    reference = apply_reslora(
        transformers.BertForSequenceClassification(model.config),
        ResLoRAConfig(mode="bs", rank=4, alpha=8.0, dropout=0.1, target_modules="all-linear", task_type="SEQ_CLS"),
    )
    from reslora_kernels import load_reslora

    load_reslora(reference, best)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), name
    assert isinstance(model.classifier, ModuleToSave)
