"""The benchmark harness measures what it claims: every ResLoRA variant of the layer suite does
the same computation (block 1 of a chain, shortcut inputs from block 0), and the report turns
rows into the right ratios."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import KERNEL_DEVICE, rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
pytest.importorskip("triton")
import bench_lib  # noqa: E402
import report  # noqa: E402


def run_case(variant, mode, seed=3):
    torch.manual_seed(seed)
    case = bench_lib.layer_step(variant, mode, 17, 24, 40, 4, torch.float32, backward=True, device=KERNEL_DEVICE)
    y = case.forward()
    y.backward(case.grad_out)
    return y.detach(), [t.grad for t in case.leaves]


@pytest.mark.parametrize("mode", bench_lib.MODES)
def test_fused_and_reference_variants_compute_the_same(monkeypatch, mode):
    monkeypatch.setenv("RESLORA_BACKEND", "torch")  # the variants set it; restore afterwards
    y_ref, grads_ref = run_case("reference", mode)
    y_fused, grads_fused = run_case("fused", mode)
    assert rel_err(y_fused, y_ref) < 1e-5
    assert len(grads_ref) == len(grads_fused)
    for g_ref, g_fused in zip(grads_ref, grads_fused):
        if g_ref is None:  # block 0's adapter is only used by bs
            assert g_fused is None
        else:
            assert rel_err(g_fused, g_ref) < 1e-5
    if mode == "bs":  # the shortcut really reaches block 0's adapter
        assert grads_ref[-1] is not None and grads_ref[-1].abs().sum() > 0


def test_ratios_from_rows():
    rows = [
        {"suite": "layer", "group": "g", "variant": "frozen", "mode": "-", "phase": "fwd+bwd", "median_ms": 2.0},
        {"suite": "layer", "group": "g", "variant": "frozen", "mode": "-", "phase": "fwd", "median_ms": 1.0},
        {"suite": "layer", "group": "g", "variant": "fused", "mode": "is", "phase": "fwd+bwd", "median_ms": 2.1},
        {"suite": "layer", "group": "g", "variant": "fused", "mode": "is", "phase": "fwd", "median_ms": 1.01},
        {"suite": "layer", "group": "g", "variant": "peft_fp32", "mode": "none", "phase": "fwd+bwd", "median_ms": 3.0},
        {"suite": "merge", "group": "m", "variant": "device copy", "median_ms": 1.0, "gbps": 100.0},
        {"suite": "merge", "group": "m", "variant": "triton", "median_ms": 1.1, "gbps": 90.0},
        {
            "suite": "e2e",
            "group": "e",
            "variant": "peft_fp32",
            "mode": "none",
            "median_ms": 5.0,
            "tokens_per_s": 100.0,
            "peak_mb": 10.0,
        },
        {
            "suite": "e2e",
            "group": "e",
            "variant": "fused",
            "mode": "is",
            "median_ms": 4.0,
            "tokens_per_s": 120.0,
            "peak_mb": 9.0,
        },
    ]
    got = {(r["metric"], r["mode"]): (round(r["value"], 6), r["met"]) for r in report.compute_ratios(rows, "H100")}
    assert got == {
        ("fused / frozen, fwd+bwd", "is"): (1.05, True),
        ("PEFT (fp32 adapter) / fused, fwd+bwd", "is"): (round(3.0 / 2.1, 6), True),
        ("fused / frozen, fwd", "is"): (1.01, True),
        ("fold / device copy, bandwidth", "triton"): (0.9, True),
        ("fused / PEFT, training tokens/s", "is"): (1.2, True),
        ("fused / PEFT, peak memory", "is"): (0.9, True),
    }
    assert report.compute_ratios(rows, "cpu") == []
    text = report.tables(
        {"environment": {"device": "H100", "versions": {"torch": "x"}, "commit": "abc", "date": "d"}, "rows": rows}
    )
    assert "| fused | is | 2.100 | 1.05 | 1.010 | 1.01 |" in text


def test_readme_section_is_regenerated(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold\n{report.README_END}\noutro\n")
    report.update_readme(readme, "| new | table |", "results/x.json")
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n")
    assert "old" not in text and "| new | table |" in text and "from results/x.json" in text
    real = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert report.README_START in real and report.README_END in real
