"""ResLoRA with ``transformers.Trainer``: the tweet-sentiment fine-tuning of ``compare_modes.py``, one mode,
trained by ``ResLoRATrainer`` (Trainer with checkpoints of the adapter alone), the new classification head
trained in full and saved with the adapter (``task_type="SEQ_CLS"``).

    pip install -e ".[examples]"
    python examples/trainer_recipe.py --mode is --out /tmp/reslora-trainer   # a few minutes on 2 CPU cores
    python examples/trainer_recipe.py --quick --out /tmp/reslora-trainer     # seconds (CI)

The lines a Trainer user adds are marked ``# ResLoRA``. Afterwards the script checks what a user
would rely on: a fresh pretrained model plus the saved adapter (``load_reslora``) gives the trained
model's logits exactly, and the merged model (``merge_and_unload``) is a plain BERT again. It writes
``trainer_recipe.json`` (the Trainer's loss log, the checkpoints' files and the test accuracy before and
after the merge).
Trainer runs in float32 here (no ``bf16=True``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import tweets

from reslora_kernels import ResLoRAConfig, apply_reslora, load_reslora, merge_and_unload, save_reslora
from reslora_kernels.trainer import ResLoRATrainer

FULL = dict(steps=80, batch_size=16, max_length=64, n_val=400, n_test=1000)
QUICK = dict(steps=3, batch_size=4, max_length=32, n_val=16, n_test=24)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="is", choices=["none", "is", "bs", "ms"])
    parser.add_argument("--out", type=Path, required=True, help="output directory (Trainer's, the adapter, the JSON)")
    parser.add_argument("--quick", action="store_true", help="a few seconds: tiny steps and splits (the CI smoke run)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument(
        "--n-val", type=int, help="validation examples kept out of training (the split of compare_modes.py)"
    )
    parser.add_argument("--n-test", type=int)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import DataCollatorWithPadding, TrainingArguments  # after tweets set HF_HUB_OFFLINE

    started = time.perf_counter()
    out = args.out
    adapter_dir = out / "adapter"
    corpus = tweets.load_corpus()
    splits = tweets.stratified_split(corpus.labels, {"test": args.n_test, "val": args.n_val}, seed=tweets.SPLIT_SEED)
    tokenizer = tweets.load_tokenizer()

    def encoded(split):
        ids = tweets.tokenize(tokenizer, [corpus.texts[i] for i in splits[split]], args.max_length)
        return ids, [corpus.labels[i] for i in splits[split]]

    train_ids, train_labels = encoded("train")
    test_ids, test_labels = encoded("test")
    train_dataset = [{"input_ids": ids, "labels": label} for ids, label in zip(train_ids, train_labels)]

    torch.manual_seed(args.seed)
    model = tweets.load_classifier()
    # ResLoRA: SEQ_CLS trains the new head (classifier) in full and saves it with the adapter.
    config = ResLoRAConfig(mode=args.mode, rank=8, alpha=16, target_modules=tweets.TARGET_MODULES, task_type="SEQ_CLS")
    model = apply_reslora(model, config)  # ResLoRA

    training_args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=0.0,
        lr_scheduler_type="linear",
        warmup_steps=round(0.1 * args.steps),
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="steps",  # ResLoRATrainer's checkpoints: the adapter, the head and the optimizer state
        save_steps=max(1, args.steps // 2),
        report_to="none",
        seed=args.seed,
        use_cpu=True,
        disable_tqdm=False,
    )
    trainer = ResLoRATrainer(  # ResLoRA: or mix ResLoRATrainerMixin into your own Trainer class
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    save_reslora(model, adapter_dir)  # ResLoRA: the adapter, its merge statistics and the head
    test_accuracy = tweets.accuracy(model, test_ids, test_labels)

    # What a user does later: a fresh pretrained model, the saved adapter (head included), then merge.
    fresh = tweets.load_classifier()
    load_reslora(fresh, adapter_dir)
    probe = tweets.collate(test_ids[:16])
    model.eval()
    fresh.eval()
    with torch.no_grad():
        if not torch.equal(fresh(**probe).logits, model(**probe).logits):
            raise RuntimeError(f"the model rebuilt from {adapter_dir} does not reproduce the trained model")
    merged = merge_and_unload(fresh)
    merged_accuracy = tweets.accuracy(merged, test_ids, test_labels)

    results = {
        "mode": args.mode,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "quick": args.quick,
        "loss": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "test_examples": len(test_ids),
        "test_accuracy": test_accuracy,
        "merged_auto_test_accuracy": merged_accuracy,
        "adapter_files": sorted(p.name for p in adapter_dir.iterdir()),
        "checkpoints": {
            p.name: sorted(f.name for f in p.iterdir()) for p in sorted((out / "trainer").glob("checkpoint-*"))
        },
        "wall_seconds": time.perf_counter() - started,
    }
    (out / "trainer_recipe.json").write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"{args.mode}: test accuracy {test_accuracy:.4f}, merged {merged_accuracy:.4f}; adapter in {adapter_dir}",
        file=sys.stderr,
    )
    return results


if __name__ == "__main__":
    main()
