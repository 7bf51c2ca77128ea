"""Tables, target ratios and a chart from benchmark results files (written by the suites).

    python benchmarks/report.py benchmarks/results/<device>-<time>.json         # print the tables
    python benchmarks/report.py RESULTS.json --readme benchmarks/README.md --chart out.png  # regenerate both

Several files of one device and commit (e.g. suites run in separate processes) can be given;
their rows are combined, and every ratio still compares numbers measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

README_START = "<!-- benchmark-results:start -->"
README_END = "<!-- benchmark-results:end -->"
#: The page whose generated results section ``--readme`` rewrites.
README = "benchmarks/README.md"

# metric -> (comparison, target): the targets of benchmarks/README.md.
TARGETS = {
    "fused / frozen, fwd+bwd": ("<=", 1.05),
    "PEFT (fp32 adapter) / fused, fwd+bwd": (">=", 1.25),
    "compiled reference / fused, fwd+bwd": (">=", 1.15),
    "fused / frozen, fwd": ("<=", 1.03),
    "auto / faster of fused and composed, fwd+bwd": ("<=", 1.03),
    "PEFT (fp32 adapter) / ours, fwd+bwd": (">=", 1.10),
    "PEFT (fp32 adapter) / ours, fwd+bwd, CPU time": (">=", 1.10),
    "saved bytes ours / PEFT, dropout 0": ("<=", 1.0),
    "saved bytes ours / PEFT, dropout > 0": ("<=", 0.5),
    "fold / device copy, bandwidth": (">=", 0.85),
    "fused / PEFT, training tokens/s": (">=", 1.15),
    "ours / PEFT, training tokens/s": (">", 1.0),
    "ours / PEFT, training tokens/s, CPU time": (">", 1.0),
    "fused / PEFT, peak memory": ("<=", 1.0),
}
#: What a user gets by default: the composed path on CPU, the per-shape choice on CUDA.
OURS = {"cpu": "composed"}


def ours(device: str) -> str:
    return OURS.get(device, "auto")


def _find(rows, **match):
    """The first row matching every field; rows written before the dropout field existed count as
    dropout 0."""
    for row in rows:
        if all(row.get(k, 0.0 if k == "dropout" else None) == v for k, v in match.items()):
            return row
    return None


def _ratio(metric, group, mode, value):
    op, target = TARGETS[metric]
    met = {"<=": value <= target, ">=": value >= target, ">": value > target}[op]
    return {"metric": metric, "group": group, "mode": mode, "value": value, "target": f"{op} {target}", "met": met}


def _groups(rows, suite):
    return {
        g: [r for r in rows if r["suite"] == suite and r["group"] == g]
        for g in dict.fromkeys(r["group"] for r in rows if r["suite"] == suite)
    }


def _layer_ratios(group, layer, device):
    out = []
    me = ours(device)
    floor = _find(layer, variant="frozen", phase="fwd+bwd")
    floor_fwd = _find(layer, variant="frozen", phase="fwd")
    peft = _find(layer, variant="peft_fp32", phase="fwd+bwd", dropout=0.0)
    peft_dropout = next(
        (r for r in layer if r["variant"] == "peft_fp32" and r["phase"] == "fwd+bwd" and r.get("dropout", 0.0) > 0),
        None,
    )
    for mode in ("none", "is", "bs", "ms"):
        fused = _find(layer, variant="fused", mode=mode, phase="fwd+bwd", dropout=0.0)
        composed = _find(layer, variant="composed", mode=mode, phase="fwd+bwd", dropout=0.0)
        mine = _find(layer, variant=me, mode=mode, phase="fwd+bwd", dropout=0.0)
        if fused is not None:
            compiled = _find(layer, variant="compiled", mode=mode, phase="fwd+bwd")
            fused_fwd = _find(layer, variant="fused", mode=mode, phase="fwd", dropout=0.0)
            if floor:
                out.append(_ratio("fused / frozen, fwd+bwd", group, mode, fused["median_ms"] / floor["median_ms"]))
            if peft:
                out.append(
                    _ratio("PEFT (fp32 adapter) / fused, fwd+bwd", group, mode, peft["median_ms"] / fused["median_ms"])
                )
            if compiled:
                out.append(
                    _ratio(
                        "compiled reference / fused, fwd+bwd", group, mode, compiled["median_ms"] / fused["median_ms"]
                    )
                )
            if fused_fwd and floor_fwd:
                out.append(_ratio("fused / frozen, fwd", group, mode, fused_fwd["median_ms"] / floor_fwd["median_ms"]))
            auto = _find(layer, variant="auto", mode=mode, phase="fwd+bwd", dropout=0.0)
            if auto and composed:
                best = min(fused["median_ms"], composed["median_ms"])
                out.append(
                    _ratio("auto / faster of fused and composed, fwd+bwd", group, mode, auto["median_ms"] / best)
                )
        if mine is None:
            continue
        if peft:
            out.append(
                _ratio("PEFT (fp32 adapter) / ours, fwd+bwd", group, mode, peft["median_ms"] / mine["median_ms"])
            )
            if peft.get("cpu_median_ms") and mine.get("cpu_median_ms"):
                value = peft["cpu_median_ms"] / mine["cpu_median_ms"]
                out.append(_ratio("PEFT (fp32 adapter) / ours, fwd+bwd, CPU time", group, mode, value))
        if peft and peft.get("saved_bytes") and mine.get("saved_bytes") is not None:
            out.append(
                _ratio("saved bytes ours / PEFT, dropout 0", group, mode, mine["saved_bytes"] / peft["saved_bytes"])
            )
        if peft_dropout and peft_dropout.get("saved_bytes"):
            mine_dropout = _find(layer, variant=me, mode=mode, phase="fwd+bwd", dropout=peft_dropout["dropout"])
            if mine_dropout and mine_dropout.get("saved_bytes") is not None:
                value = mine_dropout["saved_bytes"] / peft_dropout["saved_bytes"]
                out.append(_ratio("saved bytes ours / PEFT, dropout > 0", group, mode, value))
    return out


def compute_ratios(rows: list[dict], device: str = "") -> list[dict]:
    """The target ratios, each from two rows of the same run (same group)."""
    out = []
    for group, layer in _groups(rows, "layer").items():
        out += _layer_ratios(group, layer, device)
    for group, merge in _groups(rows, "merge").items():
        copy = _find(merge, variant="device copy")
        for row in merge:
            if row["variant"] in ("triton", "cuda extension") and copy:
                out.append(_ratio("fold / device copy, bandwidth", group, row["variant"], row["gbps"] / copy["gbps"]))
    for group, e2e in _groups(rows, "e2e").items():
        peft = _find(e2e, variant="peft_fp32", dropout=0.0)
        if peft is None:
            continue
        for row in e2e:
            if row.get("dropout", 0.0):
                continue
            if row["variant"] == "fused":
                out.append(
                    _ratio(
                        "fused / PEFT, training tokens/s",
                        group,
                        row["mode"],
                        row["tokens_per_s"] / peft["tokens_per_s"],
                    )
                )
                if row.get("peak_mb") and peft.get("peak_mb"):
                    out.append(
                        _ratio("fused / PEFT, peak memory", group, row["mode"], row["peak_mb"] / peft["peak_mb"])
                    )
            if row["variant"] == ours(device):
                out.append(
                    _ratio(
                        "ours / PEFT, training tokens/s", group, row["mode"], row["tokens_per_s"] / peft["tokens_per_s"]
                    )
                )
                if row.get("cpu_median_ms") and peft.get("cpu_median_ms"):
                    value = peft["cpu_median_ms"] / row["cpu_median_ms"]
                    out.append(_ratio("ours / PEFT, training tokens/s, CPU time", group, row["mode"], value))
    return out


def _fmt(value, digits=3):
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _spread(row, unit="ms", digits=3):
    """``median [q10, q90]`` of a row, or ``-``."""
    if not row or row.get(f"median_{unit}") is None:
        return "-"
    text = _fmt(row[f"median_{unit}"], digits)
    if row.get(f"q10_{unit}") is not None:
        text += f" [{_fmt(row[f'q10_{unit}'], digits)}, {_fmt(row[f'q90_{unit}'], digits)}]"
    return text


def _kib(value):
    return "-" if value is None else f"{value / 1024:.0f}"


def _dropout(row):
    p = row.get("dropout", 0.0)
    return f"{p:g}" if p else "0"


def tables(data: dict) -> str:
    """Markdown tables of every suite in ``data`` and of the target ratios."""
    rows, env = data["rows"], data["environment"]
    cpu = env["device"] == "cpu"
    head = (
        f"Measured on **{env['device']}** ({', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}), "
        f"commit `{env['commit'][:12]}`, {env['date']}. Times are medians [10%, 90% quantiles] of rounds in which "
        "every variant of a table runs once, interleaved"
        + (
            ", by the wall clock (CPU; with one torch thread also the thread's CPU time, which leaves out the "
            "time other processes held the core)."
            if cpu
            else ", by CUDA events (L2 flushed before each call)."
        )
    )
    load = env.get("load_average")
    if load:
        head += (
            f" Machine load average (1 min) {load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end"
            + (f", {env['cpu_count']} CPUs, torch threads {env['cpu_threads']}." if env.get("cpu_count") else ".")
        )
    lines = [head]
    for group, layer in _groups(rows, "layer").items():
        floor = {p: _find(layer, variant="frozen", phase=p) for p in ("fwd+bwd", "fwd")}
        lines += [
            "",
            f"**Layer, {group}** (one block in chain context; x floor = time / frozen nn.Linear; saved = bytes "
            "kept for backward beyond the parameters and the block's inputs; peak = the step's extra memory)",
            "",
        ]
        cpu_col = any(r.get("cpu_median_ms") is not None for r in layer)
        lines += [
            "| variant | mode | dropout | fwd+bwd ms | x floor | fwd ms | x floor | saved KiB | peak MB |"
            + (" fwd+bwd CPU ms | x floor |" if cpu_col else ""),
            "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if cpu_col else ""),
        ]
        for key in dict.fromkeys((r["variant"], r["mode"], r.get("dropout", 0.0)) for r in layer):
            cells = []
            for p in ("fwd+bwd", "fwd"):
                row = _find(layer, variant=key[0], mode=key[1], dropout=key[2], phase=p)
                base = floor[p]
                cells += [_spread(row), _fmt(row and base and row["median_ms"] / base["median_ms"], 2)]
            row = _find(layer, variant=key[0], mode=key[1], dropout=key[2], phase="fwd+bwd") or {}
            line = (
                f"| {key[0]} | {key[1]} | {_dropout(row)} | "
                + " | ".join(cells)
                + f" | {_kib(row.get('saved_bytes'))} | {_fmt(row.get('peak_mb'), 1)} |"
            )
            if cpu_col:
                cpu, base = row.get("cpu_median_ms"), (floor["fwd+bwd"] or {}).get("cpu_median_ms")
                line += f" {_fmt(cpu)} | {_fmt(cpu and base and cpu / base, 2)} |"
            lines.append(line)
    for group, overhead in _groups(rows, "overhead").items():
        floor = _find(overhead, variant="nn.Linear (frozen)")
        lines += ["", f"**Host overhead, {group}** (one forward+backward; compute negligible)", ""]
        lines += ["| variant | us per call | x nn.Linear (frozen) | CPU us per call |", "|---|---|---|---|"]
        for row in overhead:
            ratio = row["median_us"] / floor["median_us"] if floor else None
            cpu = _fmt(row.get("cpu_median_us"), 1)
            lines.append(f"| {row['variant']} | {_spread(row, 'us', 1)} | {_fmt(ratio, 2)} | {cpu} |")
    for group, merge in _groups(rows, "merge").items():
        copy = _find(merge, variant="device copy")
        lines += ["", f"**Merge fold, {group}** (bandwidth counts W read + written)", ""]
        lines += ["| implementation | ms | GB/s | x copy |", "|---|---|---|---|"]
        for row in merge:
            ratio = row["gbps"] / copy["gbps"] if copy else None
            lines.append(f"| {row['variant']} | {_spread(row)} | {_fmt(row['gbps'], 1)} | {_fmt(ratio, 2)} |")
    for group, e2e in _groups(rows, "e2e").items():
        peft = _find(e2e, variant="peft_fp32", dropout=0.0)
        lines += ["", f"**Training step, {group}** (saved = bytes kept for backward by one forward of the model)", ""]
        lines += [
            "| variant | mode | dropout | step ms | tokens/s | x PEFT | saved MB | peak MB | step CPU ms |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in e2e:
            ratio = row["tokens_per_s"] / peft["tokens_per_s"] if peft else None
            saved = row.get("saved_bytes")
            lines.append(
                f"| {row['variant']} | {row['mode']} | {_dropout(row)} | {_spread(row, digits=1)} | "
                f"{_fmt(row['tokens_per_s'], 0)} | {_fmt(ratio, 2)} | {_fmt(saved and saved / 2**20, 1)} | "
                f"{_fmt(row.get('peak_mb'), 0)} | {_fmt(row.get('cpu_median_ms'), 1)} |"
            )
    for group, qlora in _groups(rows, "qlora").items():
        peft = _find(qlora, variant="peft_qlora")
        lines += [
            "",
            f"**QLoRA, {group}** (4-bit base; saved = bytes kept for backward by one forward; peak = the "
            "step's extra memory)",
            "",
        ]
        lines += ["| variant | ms | x PEFT QLoRA | saved KiB | peak MB |", "|---|---|---|---|---|"]
        for row in qlora:
            ratio = row["median_ms"] / peft["median_ms"] if peft else None
            lines.append(
                f"| {row['variant']} | {_spread(row, digits=1)} | {_fmt(ratio, 2)} | {_kib(row.get('saved_bytes'))} | "
                f"{_fmt(row.get('peak_mb'), 1)} |"
            )
    ratios = data.get("ratios") or compute_ratios(rows, env["device"])
    if ratios:
        lines += [
            "",
            "**Targets** (ours = " + ours(env["device"]) + ")",
            "",
            "| metric | group | mode | value | target | met |",
            "|---|---|---|---|---|---|",
        ]
        for r in ratios:
            lines.append(
                f"| {r['metric']} | {r['group']} | {r['mode']} | {r['value']:.3f} | {r['target']} | "
                f"{'yes' if r['met'] else 'no'} |"
            )
    return "\n".join(lines)


def chart(data: dict, path: Path) -> bool:
    """Bar chart of fwd+bwd time / frozen floor per variant and mode, one panel per layer shape.
    Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in data["rows"] if r["suite"] == "layer" and r["phase"] == "fwd+bwd"]
    groups = list(dict.fromkeys(r["group"] for r in rows))
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, group in zip(axes[0], groups):
        layer = [r for r in rows if r["group"] == group]
        floor = _find(layer, variant="frozen")
        labels = [f"{r['variant']}\n{r['mode']}" + (f" p={r['dropout']:g}" if r.get("dropout") else "") for r in layer]
        values = [r["median_ms"] / floor["median_ms"] for r in layer]
        palette = {"fused": "tab:green", "composed": "tab:blue", "auto": "tab:purple", "frozen": "black"}
        colors = [palette.get(r["variant"], "tab:gray") for r in layer]
        ax.bar(range(len(values)), values, color=colors)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(values)), labels, rotation=90, fontsize=7)
        ax.set_title(group, fontsize=9)
        ax.set_ylabel("fwd+bwd time / frozen nn.Linear")
    fig.suptitle(f"{data['environment']['device']} ({data['environment']['commit'][:12]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def combine(paths: list[Path]) -> dict:
    datas = [json.loads(Path(p).read_text()) for p in paths]
    first = datas[0]["environment"]
    for data in datas[1:]:
        env = data["environment"]
        if (env["device"], env["commit"]) != (first["device"], first["commit"]):
            raise SystemExit(
                f"cannot combine results of {env['device']}@{env['commit']} with {first['device']}@{first['commit']}"
            )
    rows = [row for data in datas for row in data["rows"]]
    return {"environment": first, "rows": rows, "ratios": compute_ratios(rows, first["device"])}


def update_readme(readme: Path, text: str, source: str) -> None:
    content = readme.read_text()
    if README_START not in content or README_END not in content:
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} section")
    head, rest = content.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    note = f"<!-- generated by benchmarks/report.py from {source}; do not edit by hand -->"
    block = f"{README_START}\n{note}\n\n{text}\n\n{README_END}"
    readme.write_text(head + block + tail)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results JSON file(s) of one device and commit")
    parser.add_argument("--readme", type=Path, help=f"replace the generated section of this page ({README})")
    parser.add_argument("--chart", type=Path, help="write the PNG chart here")
    parser.add_argument("--combined", type=Path, help="write the combined results JSON here")
    args = parser.parse_args(argv)
    data = combine(args.results)
    text = tables(data)
    print(text)
    if args.combined:
        args.combined.write_text(json.dumps(data, indent=2) + "\n")
    if args.readme:
        update_readme(args.readme, text, ", ".join(str(p) for p in args.results))
    if args.chart and not chart(data, args.chart):
        print("no chart: matplotlib missing or no layer results", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
