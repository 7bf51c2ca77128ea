"""docs/training.md runs as written: its snippets, in order, in one namespace, with the data and the
tokenizer the text says are the reader's own."""

import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

DOC = Path(__file__).resolve().parents[2] / "docs" / "training.md"
WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(125)]


def _reader_objects():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (16, 8), generator=generator)
    labels = torch.randint(0, 3, (16,), generator=generator)
    train_dataset = [
        {"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": labels[i]} for i in range(16)
    ]
    preference_dataset = datasets.Dataset.from_list(
        [
            {
                "prompt": " ".join(f"w{(i * 7 + j) % 125}" for j in range(4)),
                "chosen": f" w{i % 125} w{(i + 1) % 125}",
                "rejected": f" w{(i + 5) % 125} w{(i + 9) % 125}",
            }
            for i in range(8)
        ]
    )
    return {"tokenizer": tokenizer, "train_dataset": train_dataset, "preference_dataset": preference_dataset}


def test_training_doc_snippets_run(tmp_path, monkeypatch):
    snippets = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(snippets) == 6
    monkeypatch.chdir(tmp_path)
    namespace = _reader_objects()
    for i, code in enumerate(snippets):
        exec(compile(code, f"docs/training.md snippet {i + 1}", "exec"), namespace)
    from reslora_kernels import AdapterDisabled, ModuleToSave

    assert isinstance(namespace["classifier"].classifier, ModuleToSave)
    saved = {p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir()}
    assert {"optimizer.pt", "reslora_adapter.safetensors"} <= saved and "model.safetensors" not in saved
    assert (tmp_path / "run" / "checkpoint-4" / "reslora_adapter.safetensors").is_file()
    assert isinstance(namespace["trainer"].ref_model, AdapterDisabled)
    assert [g["lr"] for g in namespace["optimizer"].param_groups] == [1e-4, 1.6e-3, 1e-4]
