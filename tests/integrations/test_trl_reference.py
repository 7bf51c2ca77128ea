"""TRL's DPOTrainer uses a ResLoRA model with its adapter disabled as the reference model, without
building a second model: ``ref_model=AdapterDisabled(model)``."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from reslora_kernels import AdapterDisabled, ResLoRAConfig, apply_reslora  # noqa: E402

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return transformers.LlamaForCausalLM(config)


def _preferences(n=16):
    rows = [
        {
            # Every word its own token, so that the prompt is a prefix of prompt + completion.
            "prompt": " ".join(f"w{(i * 7 + j) % 61}" for j in range(4)),
            "chosen": f" w{i % 61} w{(i + 1) % 61}",
            "rejected": f" w{(i + 5) % 61} w{(i + 9) % 61}",
        }
        for i in range(n)
    ]
    return datasets.Dataset.from_list(rows)


class _Constructions:
    """Counts what would build a second model: a PreTrainedModel constructed, a module deep-copied,
    TRL's create_model_from_path / create_reference_model called."""

    def __init__(self, monkeypatch):
        self.models, self.copies, self.loads = [], [], []
        init = transformers.PreTrainedModel.__init__
        monkeypatch.setattr(
            transformers.PreTrainedModel,
            "__init__",
            lambda module, *a, **k: (self.models.append(type(module).__name__), init(module, *a, **k))[1],
        )
        deepcopy = copy.deepcopy

        def counting_deepcopy(obj, memo=None, _nil=[]):  # noqa: B006 (copy.deepcopy's own signature)
            if isinstance(obj, torch.nn.Module):
                self.copies.append(type(obj).__name__)
            return deepcopy(obj, memo)

        monkeypatch.setattr(copy, "deepcopy", counting_deepcopy)

        def refuse(*args, **kwargs):
            self.loads.append(args)
            raise AssertionError("TRL builds a second model")

        monkeypatch.setattr(trl.trainer.dpo_trainer, "create_model_from_path", refuse)


def _config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        beta=0.1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,  # float32 on CPU, so that the reference can be compared bit for bit
        seed=0,
    )
    values.update(overrides)
    return trl.DPOConfig(**values)


@pytest.mark.parametrize("mode", ["is", "bs"])
def test_dpo_trainer_takes_the_disabled_adapter_as_reference_without_a_second_model(tmp_path, monkeypatch, mode):
    torch.manual_seed(0)
    model = _llama()
    base = copy.deepcopy(model)  # the base model, for the comparison only (before counting starts)
    apply_reslora(model, ResLoRAConfig(mode=mode, rank=4, target_modules=["q_proj", "v_proj"]))
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(base)
    reference = AdapterDisabled(model)
    seen = []  # (policy differs from base?, reference output == base output?) per reference call
    call = AdapterDisabled.__call__

    def spy(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        with torch.no_grad():
            expected = base(*args, **kwargs)
            policy = self.model(*args, **kwargs)
        seen.append(
            (not torch.equal(policy.log_probs, expected.log_probs), torch.equal(out.log_probs, expected.log_probs))
        )
        return out

    monkeypatch.setattr(AdapterDisabled, "__call__", spy)
    counts = _Constructions(monkeypatch)
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=reference,
        args=_config(tmp_path),
        train_dataset=_preferences(),
        processing_class=_tokenizer(),
    )
    trainer.train()
    assert counts.models == [] and counts.copies == [] and counts.loads == []
    # The reference holds no parameter of its own: everything it runs is the policy's.
    assert list(trainer.ref_model.parameters()) == [] and trainer.ref_model.model is model
    assert len(seen) == 3 and all(same for _, same in seen)  # every step's reference is the base model
    assert seen[-1][0]  # while the policy had moved away from it (the adapter trained)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert not any(block._adapter_disabled for block in model.modules() if hasattr(block, "_adapter_disabled"))


def test_without_a_reference_dpo_trainer_would_load_a_second_model(tmp_path, monkeypatch):
    """What AdapterDisabled avoids: TRL treats a ResLoRA model as a full fine-tune and loads a copy."""
    model = _llama()
    apply_reslora(model, ResLoRAConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    counts = _Constructions(monkeypatch)
    with pytest.raises(AssertionError, match="TRL builds a second model"):
        trl.DPOTrainer(model=model, args=_config(tmp_path), train_dataset=_preferences(), processing_class=_tokenizer())
    assert len(counts.loads) == 1
