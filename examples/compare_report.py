"""The table, the remarks and the plot of ``examples/compare_modes.py``, made from its results JSON.

    python examples/compare_report.py examples/results/compare_modes.json                     # print the table
    python examples/compare_report.py examples/results/compare_modes.json --readme examples/README.md  # its results
    python examples/compare_report.py examples/results/compare_modes.json --png out.png       # redraw the plot

Nothing here is typed in: every number comes from the JSON, so README and results cannot disagree.
"""

from __future__ import annotations

import argparse
import json
import math
import posixpath
import statistics
from pathlib import Path

README_START = "<!-- example-results:start -->"
README_END = "<!-- example-results:end -->"
IMAGE = "examples/results/compare_modes.png"
#: The page whose results section this writes; the plot is linked relative to it.
README = "examples/README.md"
DIRTY = " with uncommitted changes"
COLORS = {"lora_base": "tab:gray", "lora_best": "black", "is": "tab:blue", "bs": "tab:orange", "ms": "tab:green"}


# ----------------------------------------------------------------------------- numbers
def final_loss(run: dict) -> float:
    """Mean training loss over the last tenth of the run's steps (one step's loss is too noisy)."""
    losses = run["loss"]
    return statistics.fmean(losses[-max(1, len(losses) // 10) :])


def best_plain_lr(runs: list[dict]) -> float:
    """Plain LoRA's learning rate with the best mean validation accuracy over seeds (the smaller on a tie)."""
    by_lr: dict[float, list[float]] = {}
    for run in runs:
        if run["mode"] == "none":
            by_lr.setdefault(run["lr"], []).append(run["val_accuracy"])
    if not by_lr:
        raise ValueError("no plain-LoRA (mode none) run to choose a learning rate from")
    return max(sorted(by_lr), key=lambda lr: statistics.fmean(by_lr[lr]))


def groups(results: dict) -> list[dict]:
    """The configurations compared: plain LoRA at the base and at its best learning rate, then is/bs/ms."""
    base_lr = results["settings"]["lr"]
    best_lr = results["selected"]["plain_lora_best_lr"]
    runs = results["runs"]
    out = [{"key": "lora_base", "label": f"LoRA (none), lr {base_lr:g}", "mode": "none", "lr": base_lr}]
    if best_lr != base_lr:
        out.append({"key": "lora_best", "label": f"LoRA (none), best lr {best_lr:g}", "mode": "none", "lr": best_lr})
    for mode in ("is", "bs", "ms"):
        out.append({"key": mode, "label": f"ResLoRA {mode}, lr {base_lr:g}", "mode": mode, "lr": base_lr})
    for group in out:
        group["runs"] = sorted(
            (r for r in runs if r["mode"] == group["mode"] and r["lr"] == group["lr"]), key=lambda r: r["seed"]
        )
    return [g for g in out if g["runs"]]


def _spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def _diffs(group: dict, reference: dict, value) -> list[float]:
    """Per-seed differences ``value(run) - value(reference run of the same seed)``."""
    ref = {r["seed"]: value(r) for r in reference["runs"]}
    return [value(r) - ref[r["seed"]] for r in group["runs"] if r["seed"] in ref]


def _paired(group: dict, reference: dict, value, scale: float = 100, digits: int = 1) -> str:
    """Mean per-seed difference to ``reference`` and on how many seeds ``group`` is ahead (higher)."""
    diffs = _diffs(group, reference, value)
    if not diffs:
        return "–"
    return f"{statistics.fmean(diffs) * scale:+.{digits}f} ({sum(d > 0 for d in diffs)}/{len(diffs)})"


def _merged(group: dict, method: str) -> str:
    """Mean merged test accuracy and its mean change against the unmerged model."""
    if method == "lstsq" and group["mode"] in ("none", "bs"):
        return "n/a (exact merge)"
    pairs = [(r["merged"][method]["test_accuracy"], r["test_accuracy"]) for r in group["runs"]]
    change = statistics.fmean(m - u for m, u in pairs)
    return f"{statistics.fmean(m for m, _ in pairs) * 100:.1f} ({change * 100:+.1f})"


def _cost(results: dict) -> list[str]:
    if "cpu_seconds" not in results:
        return []
    load = results["load_average"]
    return [
        f"The whole run took {results['wall_seconds'] / 60:.0f} minutes of wall time and "
        f"{results['cpu_seconds'] / 60:.0f} minutes of CPU time (torch on {results['versions']['torch_threads']} "
        f"thread(s)); the machine's 1-minute load average was {load['start']:.1f} at the start and "
        f"{load['end']:.1f} at the end, on {results['versions']['cpu_count']} cores.",
        "",
    ]


def markdown(results: dict) -> str:
    """Settings, the comparison table, the learning-rate sweep and remarks, as Markdown."""
    s = results["settings"]
    found = groups(results)
    base = found[0]
    best = next((g for g in found if g["key"] == "lora_best"), base)
    seeds = len(s["seeds"])
    targets = ", ".join(f"`{name}`" for name in s["target_modules"])
    n_test = sum(results["dataset"]["counts"]["test"].values())
    n_train = sum(results["dataset"]["counts"]["train"].values())
    lines = [
        f"MiniLM-L6 ({s['model_params'] / 1e6:.1f}M parameters), LoRA r = {s['rank']}, alpha {s['alpha']:g} on "
        f"the encoder's linear layers ({targets}), {s['trainable_params']:,} trainable parameters with the head; "
        f"{s['steps']} steps of {s['batch_size']} tweets ({s['steps'] * s['batch_size']:,} of "
        f"{n_train:,} training tweets seen, max {s['max_length']} tokens), AdamW, {s['schedule']}; seeds "
        f"{', '.join(map(str, s['seeds']))}; test split {n_test:,} tweets; CPU "
        f"({results['versions']['cpu_count']} cores, torch {results['versions']['torch']}); commit "
        f"`{(results['git']['commit'] or 'unknown')[:10]}`{DIRTY if results['git']['dirty'] else ''}."
        + (" **Quick smoke run: the numbers mean nothing.**" if s["quick"] else ""),
        "",
        *_cost(results),
        f"Values: mean over the {seeds} seeds (min–max). Differences are paired by seed (same head and `lora_A` "
        "initialisation, same batches), with the number of seeds on which the row is better. Merged columns: test "
        "accuracy of the model rebuilt with `load_reslora` and merged, (change against the unmerged model).",
        "",
        f"| run | final train loss | test accuracy % | vs {base['label']}: points (seeds ahead) | vs best-lr LoRA | "
        "merged `auto` | merged `lstsq` |",
        "|---|---|---|---|---|---|---|",
    ]
    for group in found:
        runs = group["runs"]
        acc = lambda r: r["test_accuracy"]
        lines.append(
            f"| {group['label']} | {_spread([final_loss(r) for r in runs], digits=3)} "
            f"| {_spread([acc(r) for r in runs], scale=100)} "
            f"| {'–' if group is base else _paired(group, base, acc)} "
            f"| {'–' if group is best or best is base else _paired(group, best, acc)} "
            f"| {_merged(group, 'auto')} | {_merged(group, 'lstsq')} |"
        )
    lines += ["", "Plain LoRA's learning-rate sweep (the best by mean validation accuracy is then compared):", ""]
    lines += ["| lr | validation accuracy % | test accuracy % | final train loss |", "|---|---|---|---|"]
    for lr in s["lr_sweep"]:
        runs = [r for r in results["runs"] if r["mode"] == "none" and r["lr"] == lr]
        mark = " (chosen)" if lr == results["selected"]["plain_lora_best_lr"] else ""
        lines.append(
            f"| {lr:g}{mark} | {_spread([r['val_accuracy'] for r in runs], scale=100)} "
            f"| {_spread([r['test_accuracy'] for r in runs], scale=100)} "
            f"| {_spread([final_loss(r) for r in runs], digits=3)} |"
        )
    lines += ["", *remarks(results, found, base, best)]
    return "\n".join(lines) + "\n"


def remarks(results: dict, found: list[dict], base: dict, best: dict) -> list[str]:
    """What the numbers say, generated from them."""
    s = results["settings"]
    out = []
    sweep = sorted(s["lr_sweep"])
    best_lr = results["selected"]["plain_lora_best_lr"]
    if len(sweep) > 1 and best_lr in (sweep[0], sweep[-1]):
        edge = "largest" if best_lr == sweep[-1] else "smallest"
        out.append(
            f"- Plain LoRA's best learning rate, {best_lr:g}, is the {edge} value swept: a wider sweep might find "
            "a better one, so the comparison with it is not yet the strongest possible baseline."
        )
    accuracy = statistics.fmean(r["test_accuracy"] for r in base["runs"])
    n_test = sum(results["dataset"]["counts"]["test"].values())
    stderr = math.sqrt(accuracy * (1 - accuracy) / n_test)
    out.append(
        f"- Scale of the noise: one test tweet is {100 / n_test:.2f} points; the binomial standard error of an "
        f"accuracy near {accuracy * 100:.0f}% on {n_test:,} tweets is {stderr * 100:.1f} points."
    )
    accuracy_of = lambda r: r["test_accuracy"]
    for group in found:
        if group["mode"] == "none":
            continue
        text = (
            f"- `{group['mode']}`: test accuracy {statistics.fmean(_diffs(group, base, accuracy_of)) * 100:+.1f} "
            "points against LoRA at the same learning rate"
        )
        if best is not base:
            text += f", {statistics.fmean(_diffs(group, best, accuracy_of)) * 100:+.1f} against LoRA at {best_lr:g}"
        text += f"; final training loss {statistics.fmean(_diffs(group, base, final_loss)):+.3f}"
        if best is not base:
            text += f" and {statistics.fmean(_diffs(group, best, final_loss)):+.3f}"
        merges = []
        for method in ("auto", "lstsq"):
            if all((r.get("merged") or {}).get(method) for r in group["runs"]):
                change = statistics.fmean(
                    r["merged"][method]["test_accuracy"] - r["test_accuracy"] for r in group["runs"]
                )
                merges.append(f"`{method}` {change * 100:+.1f}")
        text += "; merging changes its test accuracy by " + " and ".join(merges) + " points (means over seeds)."
        out.append(text)
    return out


# ----------------------------------------------------------------------------- plot
def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(results: dict, path: Path) -> None:
    """Training-loss curves, held-out accuracy per configuration (seeds and merges), and the sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["settings"]
    found = groups(results)
    fig, ((ax_loss, ax_diff), (ax_acc, ax_lr)) = plt.subplots(2, 2, figsize=(15, 10))
    window = max(1, s["steps"] // 15)

    for group in found:
        curves = [_smooth(r["loss"], window) for r in group["runs"] if r["loss"]]
        if not curves:
            continue
        length = min(map(len, curves))
        steps = range(1, length + 1)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
        color = COLORS[group["key"]]
        style = "--" if group["key"] == "lora_best" else "-"
        ax_loss.plot(steps, mean, style, color=color, label=group["label"], lw=1.6)
        if len(curves) > 1:
            low = [min(c[i] for c in curves) for i in range(length)]
            high = [max(c[i] for c in curves) for i in range(length)]
            ax_loss.fill_between(steps, low, high, color=color, alpha=0.12, lw=0)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(f"training loss ({window}-step moving mean)")
    ax_loss.set_title("training loss: mean over seeds, band = min–max")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)

    # Seeds differ more from each other than modes do; the same-seed difference shows the modes apart.
    base = found[0]
    base_curves = {r["seed"]: _smooth(r["loss"], window) for r in base["runs"]}
    for group in found[1:]:
        diffs = [
            [a - b for a, b in zip(_smooth(r["loss"], window), base_curves[r["seed"]])]
            for r in group["runs"]
            if r["seed"] in base_curves
        ]
        if not diffs:
            continue
        length = min(map(len, diffs))
        steps = range(1, length + 1)
        color = COLORS[group["key"]]
        style = "--" if group["key"] == "lora_best" else "-"
        ax_diff.plot(
            steps,
            [statistics.fmean(d[i] for d in diffs) for i in range(length)],
            style,
            color=color,
            label=group["label"],
            lw=1.6,
        )
        if len(diffs) > 1:
            low = [min(d[i] for d in diffs) for i in range(length)]
            high = [max(d[i] for d in diffs) for i in range(length)]
            ax_diff.fill_between(steps, low, high, color=color, alpha=0.10, lw=0)
    ax_diff.axhline(0.0, color=COLORS[base["key"]], lw=1)
    ax_diff.set_xlabel("step")
    ax_diff.set_ylabel(f"training loss minus {base['label']}'s, same seed")
    ax_diff.set_title("paired by seed: below 0 = lower loss than plain LoRA (mean, band = min–max)")
    ax_diff.legend(fontsize=8)
    ax_diff.grid(alpha=0.3)

    for x, group in enumerate(found):
        color = COLORS[group["key"]]
        accs = [r["test_accuracy"] * 100 for r in group["runs"]]
        jitter = [(i - (len(accs) - 1) / 2) * 0.05 for i in range(len(accs))]
        ax_acc.scatter([x - 0.15 + j for j in jitter], accs, color=color, s=22, zorder=3)
        ax_acc.hlines(statistics.fmean(accs), x - 0.3, x, color=color, lw=2.5)
        for offset, method, marker in ((0.12, "auto", "x"), (0.27, "lstsq", "^")):
            merged = [
                r["merged"][method]["test_accuracy"] * 100 for r in group["runs"] if (r.get("merged") or {}).get(method)
            ]
            if merged:
                ax_acc.scatter([x + offset] * len(merged), merged, color=color, marker=marker, s=28, zorder=3)
    ax_acc.scatter([], [], color="gray", s=22, label="unmerged (per seed; bar = mean)")
    ax_acc.scatter([], [], color="gray", marker="x", s=28, label="merged, auto")
    ax_acc.scatter([], [], color="gray", marker="^", s=28, label="merged, lstsq (is/ms)")
    ax_acc.set_xticks(range(len(found)))
    ax_acc.set_xticklabels([g["label"].replace(", ", "\n") for g in found], fontsize=8)
    ax_acc.set_ylabel("held-out test accuracy (%)")
    ax_acc.set_title("held-out accuracy per seed, unmerged and merged")
    ax_acc.legend(fontsize=8)
    ax_acc.grid(alpha=0.3, axis="y")

    sweep = sorted(s["lr_sweep"])
    for split, style in (("val_accuracy", "o--"), ("test_accuracy", "o-")):
        means, lows, highs = [], [], []
        for lr in sweep:
            values = [r[split] * 100 for r in results["runs"] if r["mode"] == "none" and r["lr"] == lr]
            means.append(statistics.fmean(values))
            lows.append(means[-1] - min(values))
            highs.append(max(values) - means[-1])
        ax_lr.errorbar(
            sweep, means, yerr=[lows, highs], fmt=style, color="black", capsize=3, label=f"LoRA, {split[:-9]}"
        )
    for i, group in enumerate(g for g in found if g["mode"] != "none"):
        accs = [r["test_accuracy"] * 100 for r in group["runs"]]
        mean = statistics.fmean(accs)
        x = s["lr"] * (1.06 + 0.06 * i)
        ax_lr.errorbar(
            [x],
            [mean],
            yerr=[[mean - min(accs)], [max(accs) - mean]],
            fmt="s",
            color=COLORS[group["key"]],
            capsize=3,
            label=f"{group['mode']}, test",
        )
    ax_lr.set_xscale("log")
    ax_lr.set_xticks(sweep, [f"{lr:g}" for lr in sweep])
    ax_lr.minorticks_off()
    ax_lr.set_xlabel("learning rate")
    ax_lr.set_ylabel("accuracy (%)")
    ax_lr.set_title("plain LoRA's sweep (mean, min–max)")
    ax_lr.legend(fontsize=8)
    ax_lr.grid(alpha=0.3)

    fig.suptitle(
        f"ResLoRA vs LoRA: MiniLM-L6 on tweet sentiment, r = {s['rank']}, {s['steps']} steps x {s['batch_size']}, "
        f"{len(s['seeds'])} seed(s), CPU" + (" — QUICK SMOKE RUN" if s["quick"] else ""),
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- README
def readme_block(results: dict) -> str:
    image = posixpath.relpath(IMAGE, posixpath.dirname(README))
    return f"{README_START}\n![ResLoRA vs LoRA on tweet sentiment]({image})\n\n{markdown(results)}{README_END}"


def update_readme(readme: Path, results: dict) -> None:
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} section to fill")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + readme_block(results) + tail)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--readme", type=Path, help=f"rewrite the example-results section of this page ({README})")
    parser.add_argument("--png", type=Path, help="draw the plot here")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    print(markdown(results))
    if args.readme:
        update_readme(args.readme, results)
    if args.png:
        plot(results, args.png)


if __name__ == "__main__":
    main()
