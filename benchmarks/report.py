"""Tables, target ratios and a chart from benchmark results files (written by the suites).

    python benchmarks/report.py benchmarks/results/<gpu>-<date>.json            # print the tables
    python benchmarks/report.py RESULTS.json --readme README.md --chart out.png  # regenerate both

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

# (metric, numerator, denominator, comparison, target) of DESIGN.md / issue targets.
TARGETS = {
    "fused / frozen, fwd+bwd": ("<=", 1.05),
    "PEFT (fp32 adapter) / fused, fwd+bwd": (">=", 1.25),
    "compiled reference / fused, fwd+bwd": (">=", 1.15),
    "fused / frozen, fwd": ("<=", 1.03),
    "fold / device copy, bandwidth": (">=", 0.85),
    "fused / PEFT, training tokens/s": (">=", 1.15),
    "fused / PEFT, peak memory": ("<=", 1.0),
}


def _find(rows, **match):
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _ratio(metric, group, mode, value):
    op, target = TARGETS[metric]
    met = value <= target if op == "<=" else value >= target
    return {"metric": metric, "group": group, "mode": mode, "value": value, "target": f"{op} {target}", "met": met}


def compute_ratios(rows: list[dict], device: str = "") -> list[dict]:
    """The target ratios of issue 6 (Hopper GPUs), from rows of one run; none for a CPU run."""
    out = []
    if device == "cpu":
        return out
    for group in dict.fromkeys(r["group"] for r in rows if r["suite"] == "layer"):
        layer = [r for r in rows if r["suite"] == "layer" and r["group"] == group]
        for mode in ("none", "is", "bs", "ms"):
            fused = _find(layer, variant="fused", mode=mode, phase="fwd+bwd")
            if fused is None:
                continue
            floor = _find(layer, variant="frozen", phase="fwd+bwd")
            peft = _find(layer, variant="peft_fp32", phase="fwd+bwd")
            compiled = _find(layer, variant="compiled", mode=mode, phase="fwd+bwd")
            fused_fwd = _find(layer, variant="fused", mode=mode, phase="fwd")
            floor_fwd = _find(layer, variant="frozen", phase="fwd")
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
    for group in dict.fromkeys(r["group"] for r in rows if r["suite"] == "merge"):
        merge = [r for r in rows if r["suite"] == "merge" and r["group"] == group]
        copy = _find(merge, variant="device copy")
        for row in merge:
            if row["variant"] in ("triton", "cuda extension") and copy:
                out.append(_ratio("fold / device copy, bandwidth", group, row["variant"], row["gbps"] / copy["gbps"]))
    for group in dict.fromkeys(r["group"] for r in rows if r["suite"] == "e2e"):
        e2e = [r for r in rows if r["suite"] == "e2e" and r["group"] == group]
        peft = _find(e2e, variant="peft_fp32")
        for row in e2e:
            if row["variant"] == "fused" and peft:
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
    return out


def _fmt(value, digits=3):
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def tables(data: dict) -> str:
    """Markdown tables of every suite in ``data`` and of the target ratios."""
    rows, env = data["rows"], data["environment"]
    lines = [
        f"Measured on **{env['device']}** ({', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}), "
        f"commit `{env['commit'][:12]}`, {env['date']}. Times are medians"
        + (" of CUDA-event timings (`triton.testing.do_bench`, L2 flushed)." if env["device"] != "cpu" else " (CPU).")
    ]
    for group in dict.fromkeys(r["group"] for r in rows if r["suite"] == "layer"):
        layer = [r for r in rows if r["suite"] == "layer" and r["group"] == group]
        floor = {p: _find(layer, variant="frozen", phase=p) for p in ("fwd+bwd", "fwd")}
        lines += ["", f"**Layer, {group}** (one block in chain context; x floor = time / frozen nn.Linear)", ""]
        lines += [
            "| variant | mode | fwd+bwd ms | x floor | fwd ms | x floor | peak MB fwd+bwd |",
            "|---|---|---|---|---|---|---|",
        ]
        for key in dict.fromkeys((r["variant"], r["mode"]) for r in layer):
            cells = []
            for p in ("fwd+bwd", "fwd"):
                row = _find(layer, variant=key[0], mode=key[1], phase=p)
                base = floor[p]
                cells += [
                    _fmt(row and row["median_ms"]),
                    _fmt(row and base and row["median_ms"] / base["median_ms"], 2),
                ]
            row = _find(layer, variant=key[0], mode=key[1], phase="fwd+bwd")
            lines.append(
                f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {_fmt(row and row.get('peak_mb'), 1)} |"
            )
    for group in dict.fromkeys(r["group"] for r in rows if r["suite"] == "merge"):
        merge = [r for r in rows if r["suite"] == "merge" and r["group"] == group]
        copy = _find(merge, variant="device copy")
        lines += ["", f"**Merge fold, {group}** (bandwidth counts W read + written)", ""]
        lines += ["| implementation | ms | GB/s | x copy |", "|---|---|---|---|"]
        for row in merge:
            ratio = row["gbps"] / copy["gbps"] if copy else None
            lines.append(f"| {row['variant']} | {_fmt(row['median_ms'])} | {_fmt(row['gbps'], 1)} | {_fmt(ratio, 2)} |")
    for group in dict.fromkeys(r["group"] for r in rows if r["suite"] == "e2e"):
        e2e = [r for r in rows if r["suite"] == "e2e" and r["group"] == group]
        peft = _find(e2e, variant="peft_fp32")
        lines += ["", f"**Training step, {group}**", ""]
        lines += ["| variant | mode | step ms | tokens/s | x PEFT | peak MB |", "|---|---|---|---|---|---|"]
        for row in e2e:
            ratio = row["tokens_per_s"] / peft["tokens_per_s"] if peft else None
            lines.append(
                f"| {row['variant']} | {row['mode']} | {_fmt(row['median_ms'], 1)} | {_fmt(row['tokens_per_s'], 0)} | "
                f"{_fmt(ratio, 2)} | {_fmt(row.get('peak_mb'), 0)} |"
            )
    ratios = data.get("ratios") or compute_ratios(rows, env["device"])
    if ratios:
        lines += [
            "",
            "**Targets**",
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
        labels = [f"{r['variant']}\n{r['mode']}" for r in layer]
        values = [r["median_ms"] / floor["median_ms"] for r in layer]
        colors = ["tab:green" if r["variant"] == "fused" else "tab:gray" for r in layer]
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
    parser.add_argument("--readme", type=Path, help="replace the generated section of this README")
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
