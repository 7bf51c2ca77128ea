"""ResLoRA with ``transformers.Trainer``: the tweet-sentiment fine-tuning of ``compare_modes.py``, one mode,
trained by Trainer, the adapters written by ``save_reslora`` from a callback when training ends.

    pip install -e ".[examples]"
    python examples/trainer_recipe.py --mode is --out /tmp/reslora-trainer   # a few minutes on 2 CPU cores
    python examples/trainer_recipe.py --quick --out /tmp/reslora-trainer     # seconds (CI)

The lines a Trainer user adds are marked ``# ResLoRA``. Afterwards the script checks what a user
would rely on: a fresh pretrained model plus the saved adapter (``load_reslora``) gives the trained
model's logits exactly, and the merged model (``merge_and_unload``) is a plain BERT again. It writes
``trainer_recipe.json`` (the Trainer's loss log and the test accuracy before and after the merge).
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
from safetensors.torch import load_file, save_file

from reslora_kernels import ResLoRAConfig, apply_reslora, load_reslora, merge_and_unload, save_reslora

FULL = dict(steps=80, batch_size=16, max_length=64, n_val=400, n_test=1000)
QUICK = dict(steps=3, batch_size=4, max_length=32, n_val=16, n_test=24)
HEAD_FILE = "head.safetensors"


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


def make_save_callback(path: Path):
    """A TrainerCallback that writes the adapters with ``save_reslora`` when training ends, and the
    task head beside them (save_reslora holds the ResLoRA blocks only)."""
    from transformers import TrainerCallback

    class SaveResLoRACallback(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero:
                save_reslora(model, path)
                head = model.get_submodule(tweets.HEAD_MODULE).state_dict()
                save_file({k: v.detach().contiguous() for k, v in head.items()}, str(path / HEAD_FILE))

    return SaveResLoRACallback()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments  # after tweets set HF_HUB_OFFLINE

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
    config = ResLoRAConfig(mode=args.mode, rank=8, alpha=16, target_modules=tweets.TARGET_MODULES)  # ResLoRA
    model = apply_reslora(model, config)  # ResLoRA
    model.classifier.requires_grad_(True)  # ResLoRA: the new task head trains in full

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
        save_strategy="no",  # Trainer's own checkpoints would hold the whole model; the adapter is enough
        report_to="none",
        seed=args.seed,
        use_cpu=True,
        disable_tqdm=False,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[make_save_callback(adapter_dir)],  # ResLoRA: or save_reslora(model, path) after train()
    )
    trainer.train()
    test_accuracy = tweets.accuracy(model, test_ids, test_labels)

    # What a user does later: a fresh pretrained model, the saved adapter and head, then merge.
    fresh = tweets.load_classifier()
    fresh.get_submodule(tweets.HEAD_MODULE).load_state_dict(load_file(str(adapter_dir / HEAD_FILE)))
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
