"""The table, the remarks and the plot of ``examples/compare_modes.py``, made from its results JSON.

    python examples/compare_report.py examples/results/compare_modes.json                     # print the table
    python examples/compare_report.py examples/results/compare_modes.json --readme examples/README.md \
        --earlier examples/results/second_run_lora_lr_only.json --earlier examples/results/first_run_100_steps.json
    python examples/compare_report.py examples/results/compare_modes.json --png out.png       # redraw the plot

Nothing here is typed in: every number comes from the JSON, so README and results cannot disagree. The
choice of each mode's learning rate (:func:`best_lr`) and the grid's extension (:func:`grid_extension`)
are defined here, from the runs alone, and ``compare_modes.py`` runs by them.
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
BENCHMARKS = "benchmarks/README.md"  # the method and the timings, linked from the findings
DIRTY = " with uncommitted changes"
COLORS = {"none": "black", "is": "tab:blue", "bs": "tab:orange", "ms": "tab:green"}


# ----------------------------------------------------------------------------- numbers
MODE_ORDER = ("none", "is", "bs", "ms")


def final_loss(run: dict) -> float:
    """Mean training loss over the last tenth of the run's steps (one step's loss is too noisy)."""
    losses = run["loss"]
    return statistics.fmean(losses[-max(1, len(losses) // 10) :]) if losses else math.nan


def modes_of(runs: list[dict]) -> list[str]:
    """The modes that have runs, plain LoRA first."""
    present = {run["mode"] for run in runs}
    return [mode for mode in MODE_ORDER if mode in present]


def swept_lrs(runs: list[dict], mode: str) -> list[float]:
    """The learning rates ``mode`` ran at, ascending."""
    return sorted({run["lr"] for run in runs if run["mode"] == mode})


def mean_val_accuracy(runs: list[dict], mode: str, lr: float) -> float:
    return statistics.fmean(r["val_accuracy"] for r in runs if r["mode"] == mode and r["lr"] == lr)


def best_lr(runs: list[dict], mode: str) -> float:
    """The learning rate of ``mode`` with the best mean validation accuracy over seeds (the smaller
    on a tie). The test split plays no part."""
    lrs = swept_lrs(runs, mode)
    if not lrs:
        raise ValueError(f"no run of mode {mode!r} to choose a learning rate from")
    return max(lrs, key=lambda lr: mean_val_accuracy(runs, mode, lr))


def best_lrs(runs: list[dict]) -> dict[str, float]:
    """Every mode's own best learning rate (:func:`best_lr`)."""
    return {mode: best_lr(runs, mode) for mode in modes_of(runs)}


def edge(runs: list[dict], mode: str) -> str | None:
    """Where ``mode``'s best learning rate sits in what it was swept over: ``None`` strictly inside,
    else ``"smallest"``, ``"largest"`` or ``"only"`` (a single learning rate)."""
    lrs, best = swept_lrs(runs, mode), best_lr(runs, mode)
    if len(lrs) == 1:
        return "only"
    return "smallest" if best == lrs[0] else "largest" if best == lrs[-1] else None


def grid_extension(runs: list[dict], factor: float) -> list[float]:
    """The learning rates to add to the grid so that every best can lie inside it: beyond the
    largest (``x factor``) for a mode whose best is its largest, beyond the smallest (``/ factor``)
    for a mode whose best is its smallest, both for a mode swept at one learning rate. Rounded to six
    significant digits; empty when every mode's best is already inside."""
    new: set[float] = set()
    for mode in modes_of(runs):
        lrs, where = swept_lrs(runs, mode), edge(runs, mode)
        if where in ("largest", "only"):
            new.add(float(f"{lrs[-1] * factor:.6g}"))
        if where in ("smallest", "only"):
            new.add(float(f"{lrs[0] / factor:.6g}"))
    return sorted(new)


def groups(results: dict) -> list[dict]:
    """The configurations compared: every mode at its own best learning rate, plain LoRA first."""
    runs = results["runs"]
    out = []
    for mode, lr in best_lrs(runs).items():
        name = "LoRA (none)" if mode == "none" else f"ResLoRA {mode}"
        group = {"key": mode, "label": f"{name}, lr {lr:g}", "mode": mode, "lr": lr}
        group["runs"] = sorted((r for r in runs if r["mode"] == mode and r["lr"] == lr), key=lambda r: r["seed"])
        out.append(group)
    return out


def same_lr_lora(results: dict, group: dict) -> dict | None:
    """Plain LoRA at ``group``'s learning rate, if it ran there (the same-step-size comparison)."""
    runs = sorted(
        (r for r in results["runs"] if r["mode"] == "none" and r["lr"] == group["lr"]), key=lambda r: r["seed"]
    )
    return {"key": "none", "label": f"LoRA (none), lr {group['lr']:g}", "runs": runs} if runs else None


def _spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def _diffs(group: dict, reference: dict, value) -> list[float]:
    """Per-seed differences ``value(run) - value(reference run of the same seed)``."""
    ref = {r["seed"]: value(r) for r in reference["runs"]}
    return [value(r) - ref[r["seed"]] for r in group["runs"] if r["seed"] in ref]


def _paired(group: dict, reference: dict | None, value, scale: float = 100, digits: int = 1) -> str:
    """Mean per-seed difference to ``reference`` and on how many seeds ``group`` is ahead (higher)."""
    diffs = _diffs(group, reference, value) if reference is not None else []
    if not diffs:
        return "–"
    return f"{statistics.fmean(diffs) * scale:+.{digits}f} ({sum(d > 0 for d in diffs)}/{len(diffs)})"


def _merged(group: dict, method: str) -> str:
    """Mean merged test accuracy and its mean change against the unmerged model."""
    if method == "lstsq" and group["mode"] in ("none", "bs"):
        return "n/a (exact merge)"
    pairs = [(r["merged"][method]["test_accuracy"], r["test_accuracy"]) for r in group["runs"] if r.get("merged")]
    if not pairs:
        return "–"
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


def _sweep_rounds(results: dict) -> list[str]:
    sweep = results.get("sweep")
    if not sweep:
        return []
    rounds = sweep["rounds"]
    text = f"Learning-rate grid: started at {', '.join(f'{lr:g}' for lr in rounds[0])}"
    for i, added in enumerate(rounds[1:], 1):
        text += f"; extension {i} added {', '.join(f'{lr:g}' for lr in added)}"
    if len(rounds) == 1:
        text += " (no extension was needed)"
    text += (
        f" (factor {sweep['factor']:g} beyond an edge where a mode's best lay, every mode run at every point, "
        f"at most {sweep['max_extensions']} extensions)."
    )
    return [text, ""]


def markdown(results: dict) -> str:
    """Settings, the comparison table, the learning-rate sweep and remarks, as Markdown."""
    s = results["settings"]
    runs = results["runs"]
    found = groups(results)
    lora = next((g for g in found if g["mode"] == "none"), None)
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
        *_sweep_rounds(results),
        f"Each mode at its own best learning rate (best mean validation accuracy over the {seeds} seeds). Values: "
        f"mean over the seeds (min–max). Differences are paired by seed (same head and `lora_A` initialisation, "
        "same batches), with the number of seeds on which the row is better. Merged columns: test accuracy of the "
        "model rebuilt with `load_reslora` and merged, (change against the unmerged model).",
        "",
        "| run | validation accuracy % | test accuracy % | final train loss | vs LoRA at its best lr: points "
        "(seeds ahead) | vs LoRA at the same lr | merged `auto` | merged `lstsq` |",
        "|---|---|---|---|---|---|---|---|",
    ]
    acc = lambda r: r["test_accuracy"]
    for group in found:
        group_runs = group["runs"]
        same = same_lr_lora(results, group)
        lines.append(
            f"| {group['label']} | {_spread([r['val_accuracy'] for r in group_runs], scale=100)} "
            f"| {_spread([acc(r) for r in group_runs], scale=100)} "
            f"| {_spread([final_loss(r) for r in group_runs], digits=3)} "
            f"| {'–' if group is lora else _paired(group, lora, acc)} "
            f"| {'–' if group['mode'] == 'none' else _paired(group, same, acc)} "
            f"| {_merged(group, 'auto')} | {_merged(group, 'lstsq')} |"
        )
    modes = modes_of(runs)
    best = best_lrs(runs)
    lines += [
        "",
        "The sweep: validation accuracy % / test accuracy %, mean over seeds; **bold**: the learning rate "
        "chosen for the mode (on validation accuracy only).",
        "",
        "| lr | " + " | ".join("LoRA (none)" if m == "none" else f"ResLoRA {m}" for m in modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    for lr in sorted({r["lr"] for r in runs}):
        cells = []
        for mode in modes:
            cell_runs = [r for r in runs if r["mode"] == mode and r["lr"] == lr]
            if not cell_runs:
                cells.append("–")
                continue
            val = statistics.fmean(r["val_accuracy"] for r in cell_runs) * 100
            test = statistics.fmean(r["test_accuracy"] for r in cell_runs) * 100
            cell = f"{val:.1f} / {test:.1f}"
            cells.append(f"**{cell}**" if best[mode] == lr else cell)
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    lines += ["", *remarks(results, found, lora)]
    return "\n".join(lines) + "\n"


def remarks(results: dict, found: list[dict], lora: dict | None) -> list[str]:
    """What the numbers say, generated from them."""
    runs = results["runs"]
    out = []
    for group in found:
        where = edge(runs, group["mode"])
        if where is None:
            continue
        name = "Plain LoRA" if group["mode"] == "none" else f"`{group['mode']}`"
        swept = "the only learning rate it ran at" if where == "only" else f"the {where} value it was swept over"
        sweep = results.get("sweep")
        capped = (
            f" after the {sweep['max_extensions']} extensions allowed"
            if sweep and len(sweep["rounds"]) > sweep["max_extensions"]
            else ""
        )
        out.append(
            f"- {name}'s best learning rate, {group['lr']:g}, is {swept}{capped}: a wider sweep might find a better "
            "one, so its row is not yet its strongest possible result."
        )
    inside = [g for g in found if edge(runs, g["mode"]) is None]
    if len(inside) == len(found):
        out.append("- Every mode's best learning rate lies inside the grid (a smaller and a larger one were swept).")
    base = lora if lora is not None else found[0]
    accuracy = statistics.fmean(r["test_accuracy"] for r in base["runs"])
    n_test = sum(results["dataset"]["counts"]["test"].values())
    stderr = math.sqrt(accuracy * (1 - accuracy) / n_test)
    out.append(
        f"- Scale of the noise: one test tweet is {100 / n_test:.2f} points; the binomial standard error of an "
        f"accuracy near {accuracy * 100:.0f}% on {n_test:,} tweets is {stderr * 100:.1f} points."
    )
    accuracy_of = lambda r: r["test_accuracy"]
    for group in found:
        if group["mode"] == "none" or lora is None:
            continue
        diffs = _diffs(group, lora, accuracy_of)
        text = (
            f"- `{group['mode']}` at lr {group['lr']:g}: test accuracy {statistics.fmean(diffs) * 100:+.1f} points "
            f"against plain LoRA at its best lr {lora['lr']:g} (ahead on {sum(d > 0 for d in diffs)} of "
            f"{len(diffs)} seeds); final training loss {statistics.fmean(_diffs(group, lora, final_loss)):+.3f}"
        )
        merges = []
        for method in ("auto", "lstsq"):
            if all((r.get("merged") or {}).get(method) for r in group["runs"]):
                change = statistics.fmean(
                    r["merged"][method]["test_accuracy"] - r["test_accuracy"] for r in group["runs"]
                )
                merges.append(f"`{method}` {change * 100:+.1f}")
        if merges:
            text += "; merging changes its test accuracy by " + " and ".join(merges) + " points (means over seeds)"
        out.append(text + ".")
    return out


def _seed_spread(group: dict) -> tuple[float, float]:
    accuracies = [r["test_accuracy"] * 100 for r in group["runs"]]
    return min(accuracies), max(accuracies)


def _failed_lrs(results: dict) -> list[str]:
    """Learning rates at which most runs score exactly the largest class's share of the test split
    (the model predicts one class: training failed)."""
    counts = results["dataset"]["counts"]["test"]
    share = max(counts.values()) / sum(counts.values())
    out = []
    for lr in sorted({r["lr"] for r in results["runs"]}):
        at = [r for r in results["runs"] if r["lr"] == lr]
        stuck = sum(math.isclose(r["test_accuracy"], share, abs_tol=1e-9) for r in at)
        if 2 * stuck > len(at):
            out.append(
                f"at {lr:g} training fails ({stuck} of the {len(at)} runs score exactly the largest class's share "
                f"of the test split, {share * 100:.1f}%)"
            )
    return out


def _shared_runs(results: dict, earlier: dict) -> str:
    """How the runs two results share (mode, learning rate, seed) agree."""
    key = lambda r: (r["mode"], r["lr"], r["seed"])
    now, then = {key(r): r for r in results["runs"]}, {key(r): r for r in earlier["runs"]}
    shared = sorted(set(now) & set(then))
    if not shared or earlier["settings"]["steps"] != results["settings"]["steps"]:
        return "it shares no run with this one"
    accuracy = max(
        abs(now[k][field] - then[k][field]) for k in shared for field in ("val_accuracy", "test_accuracy")
    )
    loss = max(abs(a - b) for k in shared for a, b in zip(now[k]["loss"], then[k]["loss"]))
    configurations = len({k[:2] for k in shared})
    agree = (
        "the same validation and test accuracies" if accuracy == 0 else f"accuracies within {accuracy * 100:.1f} points"
    )
    return (
        f"the {len(shared)} runs ({configurations} configurations, every seed) it shares with this one give {agree} "
        f"here (training losses within {loss:.0e})"
    )


def findings(results: dict, earlier: dict[str, dict] | None = None) -> list[str]:
    """What the comparison shows and what it does not, generated from the results (and from earlier
    runs, ``{file name: results}``), so that no number in it is typed."""
    s = results["settings"]
    runs = results["runs"]
    found = groups(results)
    lora = next((g for g in found if g["mode"] == "none"), None)
    if lora is None or len(found) < 2:
        return []
    others = [g for g in found if g is not lora]
    n_test = sum(results["dataset"]["counts"]["test"].values())
    n_val = sum(results["dataset"]["counts"]["val"].values())
    n_train = sum(results["dataset"]["counts"]["train"].values())
    accuracy = statistics.fmean(r["test_accuracy"] for r in lora["runs"])
    stderr = math.sqrt(accuracy * (1 - accuracy) / n_test) * 100
    test_diff = {g["mode"]: statistics.fmean(_diffs(g, lora, lambda r: r["test_accuracy"])) * 100 for g in others}
    ahead = {g["mode"]: sum(d > 0 for d in _diffs(g, lora, lambda r: r["test_accuracy"])) for g in others}
    seeds = len(s["seeds"])
    low, high = _seed_spread(lora)
    sweep = results.get("sweep") or {}
    inside = all(edge(runs, g["mode"]) is None for g in found)
    extensions = len(sweep.get("rounds", [None])) - 1
    bests = ", ".join(f"{g['lr']:g} for {'plain LoRA' if g is lora else '`' + g['mode'] + '`'}" for g in found)
    where = (
        f"The sweep found every mode's best learning rate inside the grid after {extensions} extension(s): {bests}"
        if inside
        else f"Not every mode's best learning rate lies inside the grid (above): {bests}"
    )
    failed = _failed_lrs(results)
    sides = "; ".join(
        f"`{mode}` {diff:+.1f} points against plain LoRA (ahead on {ahead[mode]} of {seeds} seeds)"
        for mode, diff in test_diff.items()
    )
    per_seed = {g["mode"]: _diffs(g, lora, lambda r: r["test_accuracy"]) for g in others}
    steady = [m for m, d in per_seed.items() if d and (all(x > 0 for x in d) or all(x < 0 for x in d))]
    beyond = [m for m, d in test_diff.items() if abs(d) >= stderr]
    every = [x * 100 for d in per_seed.values() for x in d]
    against_error = (
        "; ".join(
            f"`{m}`'s mean difference, {test_diff[m]:+.1f}, is as large as the binomial standard error of one test "
            f"accuracy ({stderr:.1f} points)"
            for m in beyond
        )
        if beyond
        else f"every mean difference is below the binomial standard error of one test accuracy ({stderr:.1f} points)"
    )
    if not steady:
        verdict = (
            f"No mode is ahead of plain LoRA, or behind it, on every seed (the per-seed differences span "
            f"{min(every):+.1f} to {max(every):+.1f} points; plain LoRA alone spans {low:.1f} to {high:.1f} across "
            f"seeds), and {against_error}: this run does not show that any shortcut helps or hurts in this setting."
        )
    else:
        verdict = (
            f"{', '.join(f'`{m}`' for m in steady)} differs from plain LoRA in the same direction on every one of the "
            f"{seeds} seeds ({against_error}; plain LoRA alone spans {low:.1f} to {high:.1f} across seeds): a signal "
            f"worth a larger run, not a result on {seeds} seeds."
        )
    by_val = max(found, key=lambda g: statistics.fmean(r["val_accuracy"] for r in g["runs"]))
    by_test = max(found, key=lambda g: statistics.fmean(r["test_accuracy"] for r in g["runs"]))
    name = lambda g: "plain LoRA" if g is lora else f"`{g['mode']}`"
    order = (
        f" The validation split orders the modes differently ({name(by_val)} first on validation, "
        f"{name(by_test)} on test)."
        if by_val is not by_test
        else f" Validation and test put {name(by_val)} first."
    )
    out = [
        f"- **Each mode at its own best learning rate.** {where}"
        + (f"; {'; '.join(failed)}" if failed else "")
        + f". At those rates: {sides}. {verdict}{order}"
    ]
    second = {k: v for k, v in (earlier or {}).items() if v.get("selected", {}).get("plain_lora_best_lr")}
    for file, then in second.items():
        then_lora = then["selected"]["plain_lora_best_lr"]
        then_lr = then["settings"]["lr"]
        then_found = {
            mode: [r for r in then["runs"] if r["mode"] == mode and r["lr"] == (then_lr, then_lora)[mode == "none"]]
            for mode in modes_of(then["runs"])
        }
        if then["settings"]["steps"] != s["steps"] or not then_found.get("none"):
            continue
        accuracy_of = lambda r: r["test_accuracy"]
        then_gaps = {
            mode: statistics.fmean(_diffs({"runs": rs}, {"runs": then_found["none"]}, accuracy_of)) * 100
            for mode, rs in then_found.items()
            if mode != "none"
        }
        gaps = ", ".join(f"`{mode}` {gap:+.1f}" for mode, gap in then_gaps.items())
        smaller = max(abs(d) for d in test_diff.values()) < min(abs(d) for d in then_gaps.values())
        out.append(
            f"- **The earlier comparison at one learning rate** (`{file}`: ResLoRA at {then_lr:g} only, plain LoRA at "
            f"its best {then_lora:g}) gave {gaps} points against plain LoRA; "
            + (
                "at each mode's own best learning rate every difference is smaller than the smallest of those: "
                "that comparison measured step sizes, not methods."
                if smaller
                else "at each mode's own best learning rate the differences are those above."
            )
        )
        break
    loss_diff = {g["mode"]: statistics.fmean(_diffs(g, lora, final_loss)) for g in others}
    crossings = {}
    for g in others:
        paired = {r["seed"]: r["loss"] for r in lora["runs"]}
        per_step = [
            statistics.fmean(r["loss"][i] - paired[r["seed"]][i] for r in g["runs"] if r["seed"] in paired)
            for i in range(s["steps"])
        ]
        crossings[g["mode"]] = sum((a > 0) != (b > 0) for a, b in zip(per_step, per_step[1:]))
    out.append(
        "- **Training loss** at the end (mean of the last tenth of the steps), against plain LoRA: "
        + ", ".join(f"`{m}` {d:+.3f}" for m, d in loss_diff.items())
        + "; the mean paired per-step difference changes sign "
        + ", ".join(f"{crossings[m]} times (`{m}`)" for m in crossings)
        + f" over the {s['steps']} steps."
    )
    merges = []
    for g in others:
        for method in ("auto", "lstsq"):
            if all((r.get("merged") or {}).get(method) for r in g["runs"]):
                change = statistics.fmean(r["merged"][method]["test_accuracy"] - r["test_accuracy"] for r in g["runs"])
                merges.append(f"`{method}` {change * 100:+.1f} for `{g['mode']}`")
    exact = [
        g["mode"]
        for g in found
        if g["mode"] in ("none", "bs")
        and all(r.get("merged") and r["merged"]["auto"]["test_accuracy"] == r["test_accuracy"] for r in g["runs"])
    ]
    out.append(
        "- **Merging** changes the test accuracy (points, mean over seeds) by "
        + ", ".join(merges)
        + " (`auto` is the paper's `input_norm` for `is` and `ms`)"
        + (f"; {' and '.join(f'`{m}`' for m in exact)} merge exactly (the same accuracy on every seed)" * bool(exact))
        + "."
    )
    lora_val = sorted(
        (mean_val_accuracy(runs, "none", lr) * 100 for lr in swept_lrs(runs, "none")), reverse=True
    )
    out.append(
        f"- **What is chosen on what**: the learning rates on the validation split only ({n_val:,} tweets, mean over "
        f"the {seeds} seeds); the test split is read only to report. The validation split is small, so the choice "
        "itself is noisy"
        + (
            f": plain LoRA's two best validation means differ by {lora_val[0] - lora_val[1]:.1f} points."
            if len(lora_val) > 1
            else "."
        )
    )
    labels = len(results["dataset"]["counts"]["test"])
    cost = (
        f" ({results['wall_seconds'] / 60:.0f} minutes of wall time for {len(runs)} training runs)"
        if "wall_seconds" in results
        else ""
    )
    load = results.get("load_average") or {}
    busy = max(load.values(), default=0.0) > results["versions"].get("torch_threads", 1) + 0.5
    shared = " other jobs were using" if busy else ""
    out.append(
        f"- **Scale**: one {s['model_params'] / 1e6:.1f}M-parameter encoder, one {labels}-class task with noisy "
        f"crowd labels, {s['steps']} steps of {s['batch_size']} tweets "
        f"({s['steps'] * s['batch_size'] / n_train * 100:.0f}% of one epoch), {seeds} seeds, r = {s['rank']}, CPU "
        f"only, on a {results['versions']['cpu_count']}-core machine{shared}{cost}: nothing here speaks "
        "for larger models, longer training or the paper's tasks, and no timing in it means anything for speed "
        f"([benchmarks/README.md]({posixpath.relpath(BENCHMARKS, posixpath.dirname(README))}))."
    )
    for file, then in (earlier or {}).items():
        lrs = then["settings"].get("lr_sweep") or []
        n_then_val = sum(then["dataset"]["counts"]["val"].values())
        commit = (then["git"]["commit"] or "unknown")[:7] + (DIRTY if then["git"]["dirty"] else "")
        out.append(
            f"- **Earlier run** `{file}` ({then['settings']['steps']} steps, a {n_then_val:,}-tweet validation split, "
            f"commit {commit}): swept plain LoRA's learning rate over {', '.join(f'{lr:g}' for lr in lrs)} (best "
            f"{then['selected']['plain_lora_best_lr']:g}) and ran ResLoRA at {then['settings']['lr']:g} only; "
            f"{_shared_runs(results, then)}."
        )
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
    """Training-loss curves and held-out accuracy of every mode at its best learning rate, and the sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["settings"]
    runs = results["runs"]
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
        ax_loss.plot(steps, mean, color=color, label=group["label"], lw=1.6)
        if len(curves) > 1:
            low = [min(c[i] for c in curves) for i in range(length)]
            high = [max(c[i] for c in curves) for i in range(length)]
            ax_loss.fill_between(steps, low, high, color=color, alpha=0.12, lw=0)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(f"training loss ({window}-step moving mean)")
    ax_loss.set_title("training loss at each mode's best lr: mean over seeds, band = min–max")
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
        diffs = [d for d in diffs if d]
        if not diffs:
            continue
        length = min(map(len, diffs))
        steps = range(1, length + 1)
        color = COLORS[group["key"]]
        ax_diff.plot(
            steps, [statistics.fmean(d[i] for d in diffs) for i in range(length)], color=color, label=group["label"]
        )
        if len(diffs) > 1:
            low = [min(d[i] for d in diffs) for i in range(length)]
            high = [max(d[i] for d in diffs) for i in range(length)]
            ax_diff.fill_between(steps, low, high, color=color, alpha=0.10, lw=0)
    ax_diff.axhline(0.0, color=COLORS[base["key"]], lw=1)
    ax_diff.set_xlabel("step")
    ax_diff.set_ylabel(f"training loss minus {base['label']}'s, same seed")
    ax_diff.set_title("paired by seed: below 0 = lower loss than plain LoRA at its best lr (band = min–max)")
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
    ax_acc.set_title("held-out accuracy per seed at each mode's best lr, unmerged and merged")
    ax_acc.legend(fontsize=8)
    ax_acc.grid(alpha=0.3, axis="y")

    best = best_lrs(runs)
    all_lrs = sorted({r["lr"] for r in runs})
    for mode in modes_of(runs):
        lrs = swept_lrs(runs, mode)
        color = COLORS[mode]
        # Modes side by side at each learning rate, so that their error bars do not hide each other.
        shift = 1.0 + 0.04 * (MODE_ORDER.index(mode) - 1.5)
        for split, style in (("val_accuracy", "o-"), ("test_accuracy", "s:")):
            means, lows, highs = [], [], []
            for lr in lrs:
                values = [r[split] * 100 for r in runs if r["mode"] == mode and r["lr"] == lr]
                means.append(statistics.fmean(values))
                lows.append(means[-1] - min(values))
                highs.append(max(values) - means[-1])
            label = f"{'LoRA' if mode == 'none' else mode}, {split[:-9]}"
            ax_lr.errorbar(
                [lr * shift for lr in lrs], means, yerr=[lows, highs], fmt=style, color=color, capsize=2,
                lw=1.2 if split == "val_accuracy" else 0.8, ms=4, label=label,
            )
        val_best = mean_val_accuracy(runs, mode, best[mode]) * 100
        ax_lr.scatter([best[mode] * shift], [val_best], s=160, facecolors="none", edgecolors=color, lw=1.5, zorder=4)
    ax_lr.scatter([], [], s=160, facecolors="none", edgecolors="gray", label="chosen (best validation)")
    ax_lr.set_xscale("log")
    ax_lr.set_xticks(all_lrs, [f"{lr:g}" for lr in all_lrs])
    ax_lr.minorticks_off()
    ax_lr.set_xlabel("learning rate")
    ax_lr.set_ylabel("accuracy (%)")
    ax_lr.set_title("the shared sweep: mean over seeds, min–max")
    ax_lr.legend(fontsize=7, ncol=2)
    ax_lr.grid(alpha=0.3)

    fig.suptitle(
        f"ResLoRA vs LoRA, each at its best learning rate: MiniLM-L6 on tweet sentiment, r = {s['rank']}, "
        f"{s['steps']} steps x {s['batch_size']}, {len(s['seeds'])} seed(s), CPU"
        + (" — QUICK SMOKE RUN" if s["quick"] else ""),
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- README
def readme_block(results: dict, earlier: dict[str, dict] | None = None) -> str:
    """The results section: the plot, :func:`markdown` and :func:`findings` (``earlier``: ``{file
    name: results}`` of earlier runs kept beside this one)."""
    image = posixpath.relpath(IMAGE, posixpath.dirname(README))
    shows = findings(results, earlier)
    text = f"{README_START}\n![ResLoRA vs LoRA on tweet sentiment]({image})\n\n{markdown(results)}"
    if shows:
        text += "\n### What this shows, and what it does not\n\n" + "\n".join(shows) + "\n"
    return text + README_END


def update_readme(readme: Path, results: dict, earlier: dict[str, dict] | None = None) -> None:
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} section to fill")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + readme_block(results, earlier) + tail)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--readme", type=Path, help=f"rewrite the example-results section of this page ({README})")
    parser.add_argument("--png", type=Path, help="draw the plot here")
    parser.add_argument(
        "--earlier", type=Path, action="append", default=[], help="an earlier run's results, compared in the README"
    )
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    earlier = {path.name: json.loads(path.read_text()) for path in args.earlier}
    print(markdown(results))
    if args.readme:
        update_readme(args.readme, results, earlier)
    if args.png:
        plot(results, args.png)


if __name__ == "__main__":
    main()
