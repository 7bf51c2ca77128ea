"""The benchmark harness measures what it claims: every ResLoRA variant of the layer suite does
the same computation (block 1 of a chain, shortcut inputs from block 0); the interleaved timer
rotates; saved bytes and CPU peak memory count what they say; results files are never
overwritten; the report turns rows into the right ratios."""

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import KERNEL_DEVICE, rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
pytest.importorskip("triton")
import bench_lib  # noqa: E402
import report  # noqa: E402


def run_case(variant, mode, dropout=0.0, seed=3):
    torch.manual_seed(seed)
    case = bench_lib.layer_case(
        variant, mode, 17, 24, 40, 4, torch.float32, backward=True, dropout=dropout, device=KERNEL_DEVICE
    )
    case.prepare()
    torch.manual_seed(seed + 1)  # the dropout seed drawn in forward
    y = case.forward()
    y.backward(case.grad_out)
    return y.detach(), [t.grad for t in case.leaves]


@pytest.mark.parametrize(
    "variant, dropout", [("composed", 0.0), ("fused", 0.0), ("auto", 0.0), ("composed", bench_lib.DROPOUT)]
)
@pytest.mark.parametrize("mode", bench_lib.MODES)
def test_variants_compute_the_same(mode, variant, dropout):
    y_ref, grads_ref = run_case("reference", mode, dropout)
    y, grads = run_case(variant, mode, dropout)
    assert rel_err(y, y_ref) < 1e-5
    assert len(grads_ref) == len(grads)
    for g_ref, g in zip(grads_ref, grads):
        if g_ref is None:  # block 0's adapter is only used by bs
            assert g is None
        else:
            assert rel_err(g, g_ref) < 1e-5
    if mode == "bs":  # the shortcut really reaches block 0's adapter
        assert grads_ref[-1] is not None and grads_ref[-1].abs().sum() > 0


def test_layer_variants_per_device():
    cpu = bench_lib.layer_variants("cpu")
    assert ("composed", "is", bench_lib.DROPOUT) in cpu and ("peft_fp32", "none", bench_lib.DROPOUT) in cpu
    assert not any(v in ("fused", "compiled", "auto") for v, _, _ in cpu)
    cuda = bench_lib.layer_variants("cuda")
    assert {("fused", "ms", 0.0), ("auto", "ms", 0.0), ("composed", "ms", 0.0)} <= set(cuda)


def test_saved_bytes_count_what_backward_keeps():
    """Parameters and inputs are alive anyway; a temporary saved twice counts once."""
    M, K, N, r = 32, 24, 40, 4
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(N, K, requires_grad=True)
    assert bench_lib.saved_bytes(lambda: x @ w.t(), [x, w]) == 0
    assert bench_lib.saved_bytes(lambda: x @ w.t(), [w]) == M * K * 4

    def twice():
        h = torch.tanh(x)  # tanh saves its output h; both products save h again
        return h @ w.t() + h @ w.t()

    assert bench_lib.saved_bytes(twice, [x, w]) == M * K * 4
    # The layer suite: PEFT without dropout saves z [M, r]; with dropout also the dropped
    # input and its mask; the composed path saves u [M, r] whatever the dropout.
    for variant, dropout, expected in [
        ("frozen", 0.0, 0),
        ("peft_fp32", 0.0, M * r * 4),
        ("composed", 0.0, M * r * 4),
        ("composed", 0.1, M * r * 4),
    ]:
        case = bench_lib.layer_case(variant, "none", M, K, N, r, torch.float32, backward=True, dropout=dropout)
        case.prepare()
        assert bench_lib.saved_bytes(case.forward, case.alive) == expected, variant
    if bench_lib.peft is not None:
        case = bench_lib.layer_case("peft_fp32", "none", M, K, N, r, torch.float32, backward=True, dropout=0.1)
        assert bench_lib.saved_bytes(case.forward, case.alive) >= M * K * 4 + M * r * 4


def test_cpu_peak_memory():
    small = 2**10  # scalars and bookkeeping
    assert 2**20 <= bench_lib.cpu_peak_bytes(lambda: torch.ones(2**18).mul_(2)) < 2**20 + small
    # A uint8 sum converts to int64 first: 8 bytes per element at the peak, not 1.
    assert bench_lib.cpu_peak_bytes(lambda: torch.ones(2**18, dtype=torch.uint8).sum()) >= 9 * 2**18
    # Three live at once, then freed: the peak is the three, not one.
    assert 3 * 2**20 <= bench_lib.cpu_peak_bytes(lambda: [torch.ones(2**18) for _ in range(3)]) < 3 * 2**20 + small
    assert 2**20 <= bench_lib.cpu_peak_bytes(lambda: [torch.ones(2**18).sum() for _ in range(3)]) < 2**20 + small


class FakeTimer:
    def __init__(self):
        self.order = []

    def __call__(self, fn):
        fn()
        return float(len(self.order))


def test_interleaved_rounds_rotate():
    timer = FakeTimer()

    class Case:
        def __init__(self, name):
            self.name = name
            self.prepared = 0

        def prepare(self):
            self.prepared += 1

        def step(self):
            timer.order.append(self.name)

    cases = {n: Case(n) for n in "abc"}
    runner = bench_lib.Interleaved(cases, timer=timer)
    runner.warm_up(1)
    for _ in range(3):
        runner.round()
    assert timer.order == list("abc" + "bca" + "cab" + "abc")
    assert all(c.prepared == 4 for c in cases.values())
    assert [len(t) for t in runner.times.values()] == [3, 3, 3]
    stats = bench_lib.quantile_stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert stats["median_ms"] == 3.0 and stats["rounds"] == 5 and stats["q10_ms"] < 2.0 < 4.0 < stats["q90_ms"]


def test_results_files_are_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_lib, "environment", lambda: {"device": "cpu", "date": "2026-01-02T03:04:05+00:00"})
    monkeypatch.setattr(bench_lib.reslora_kernels, "backend_report", lambda: "report")
    results = bench_lib.Results()
    results.add("layer", "g", "frozen", mode="-", phase="fwd", median_ms=1.0)
    first, second = results.write(tmp_path), results.write(tmp_path)
    assert first != second and first.name == "cpu-2026-01-02T030405.json" and second.name.endswith("-1.json")
    data = json.loads(second.read_text())
    assert data["environment"]["load_average"]["start"] and data["rows"][0]["median_ms"] == 1.0


def layer_row(variant, mode, phase, ms, dropout=0.0, saved=None):
    row = {"suite": "layer", "group": "g", "variant": variant, "mode": mode, "phase": phase, "median_ms": ms}
    return row | {"dropout": dropout} | ({"saved_bytes": saved} if saved is not None else {})


def test_ratios_from_rows():
    rows = [
        layer_row("frozen", "-", "fwd+bwd", 2.0),
        layer_row("frozen", "-", "fwd", 1.0),
        layer_row("fused", "is", "fwd+bwd", 2.1),
        layer_row("fused", "is", "fwd", 1.01),
        layer_row("composed", "is", "fwd+bwd", 2.2),
        layer_row("auto", "is", "fwd+bwd", 2.15, saved=100),
        layer_row("auto", "is", "fwd+bwd", 2.5, dropout=0.1, saved=100),
        layer_row("peft_fp32", "none", "fwd+bwd", 3.0, saved=100),
        layer_row("peft_fp32", "none", "fwd+bwd", 3.5, dropout=0.1, saved=1000),
        {"suite": "merge", "group": "m", "variant": "device copy", "median_ms": 1.0, "gbps": 100.0},
        {"suite": "merge", "group": "m", "variant": "triton", "median_ms": 1.1, "gbps": 90.0},
        {"suite": "e2e", "group": "e", "variant": "peft_fp32", "mode": "none", "tokens_per_s": 100.0, "peak_mb": 10.0},
        {"suite": "e2e", "group": "e", "variant": "fused", "mode": "is", "tokens_per_s": 120.0, "peak_mb": 9.0},
        {"suite": "e2e", "group": "e", "variant": "auto", "mode": "is", "tokens_per_s": 99.0},
    ]
    got = {(r["metric"], r["mode"]): (round(r["value"], 6), r["met"]) for r in report.compute_ratios(rows, "H100")}
    assert got == {
        ("fused / frozen, fwd+bwd", "is"): (1.05, True),
        ("PEFT (fp32 adapter) / fused, fwd+bwd", "is"): (round(3.0 / 2.1, 6), True),
        ("fused / frozen, fwd", "is"): (1.01, True),
        ("auto / faster of fused and composed, fwd+bwd", "is"): (round(2.15 / 2.1, 6), True),
        ("PEFT (fp32 adapter) / ours, fwd+bwd", "is"): (round(3.0 / 2.15, 6), True),
        ("saved bytes ours / PEFT, dropout 0", "is"): (1.0, True),
        ("saved bytes ours / PEFT, dropout > 0", "is"): (0.1, True),
        ("fold / device copy, bandwidth", "triton"): (0.9, True),
        ("fused / PEFT, training tokens/s", "is"): (1.2, True),
        ("fused / PEFT, peak memory", "is"): (0.9, True),
        ("ours / PEFT, training tokens/s", "is"): (0.99, False),
    }
    # On CPU "ours" is the composed path: only its ratios, no fused ones.
    cpu = {(r["metric"], r["mode"]): r["met"] for r in report.compute_ratios(rows, "cpu")}
    assert cpu[("PEFT (fp32 adapter) / ours, fwd+bwd", "is")] is True
    assert ("ours / PEFT, training tokens/s", "is") not in cpu
    env = {"device": "H100", "versions": {"torch": "x"}, "commit": "abc", "date": "d"}
    text = report.tables({"environment": env, "rows": rows})
    assert "| fused | is | 0 | 2.100 | 1.05 | 1.010 | 1.01 | - | - |" in text
    assert "| peft_fp32 | none | 0.1 | 3.500 | 1.75 | - | - | 1 | - |" in text


def test_cpu_time_is_recorded_and_compared(monkeypatch):
    """Single-threaded CPU runs also record the thread's CPU time per call; the report compares
    it as a load-robust cross-check of the wall-clock target."""
    monkeypatch.setattr(bench_lib, "IS_CUDA", False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)

    class Busy:
        def prepare(self):
            pass

        def step(self):
            sum(range(20000))

    runner = bench_lib.Interleaved({"a": Busy()}, timer=bench_lib.CallTimer())
    for _ in range(3):
        runner.round()
    stats = runner.stats()["a"]
    assert 0 < stats["cpu_median_ms"] <= stats["median_ms"] * 1.5
    rows = [
        layer_row("peft_fp32", "none", "fwd+bwd", 3.0) | {"cpu_median_ms": 2.4},
        layer_row("composed", "ms", "fwd+bwd", 2.9) | {"cpu_median_ms": 2.0},
    ]
    got = {r["metric"]: round(r["value"], 6) for r in report.compute_ratios(rows, "cpu")}
    assert got["PEFT (fp32 adapter) / ours, fwd+bwd, CPU time"] == 1.2
    assert got["PEFT (fp32 adapter) / ours, fwd+bwd"] == round(3.0 / 2.9, 6)


def test_readme_section_is_regenerated(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold\n{report.README_END}\noutro\n")
    report.update_readme(readme, "| new | table |", "results/x.json")
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n")
    assert "old" not in text and "| new | table |" in text and "from results/x.json" in text
    real = (Path(__file__).resolve().parents[2] / report.README).read_text()
    assert report.README_START in real and report.README_END in real


def test_documented_targets_are_the_reports():
    """benchmarks/README.md's target table lists exactly the targets report.py checks."""
    text = (Path(__file__).resolve().parents[2] / report.README).read_text()
    section = text[text.index("## Targets") :]
    section = section[: section.index("\n## ", 1)]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    documented = {metric.strip(): (target.split()[0], float(target.split()[1])) for metric, target in rows[1:]}
    assert documented == report.TARGETS
