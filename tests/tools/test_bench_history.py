"""benchmarks/README.md's history reads its numbers from the results files it names: the host-overhead
table's every cell is the file's median CPU time (and wall clock) of that row, rounded."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "benchmarks" / "README.md"
COLUMNS = {
    "layer, fused": "layer, fused (H100 plan, launches captured)",
    "Function only, fused": "Function only, fused (H100 plan, launches captured)",
    "launchers only": "launchers only, fused (H100 plan, launches captured)",
}


def overhead_table() -> tuple[list[str], list[list[str]]]:
    section = README.read_text().split("### Host overhead of the fused path", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return header, [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_host_overhead_history_is_read_from_its_files():
    header, rows = overhead_table()
    assert header[1:4] == list(COLUMNS) and header[-1] == "file" and len(rows) == 6
    for row in rows:
        name = row[-1].strip("`")
        results = json.loads((ROOT / "benchmarks" / "results" / name).read_text())["rows"]
        by_variant = {r["variant"]: r for r in results if r["suite"] == "overhead"}
        for column, cell in zip(header[1:4], row[1:4]):
            cpu, wall = map(int, re.fullmatch(r"(\d+) \((\d+)\)", cell).groups())
            measured = by_variant[COLUMNS[column]]
            assert (cpu, wall) == (round(measured["cpu_median_us"]), round(measured["median_us"])), (name, column)
