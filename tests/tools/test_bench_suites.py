"""The benchmark suites select and run what they say: test ids that ``-k`` accepts (``-k bf16``,
``-k 4096x4096-r16``), every ``compiled`` case really compiled (not dynamo's silent eager fallback
past its recompile limit), and the settings that narrow a run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DTYPE_IDS

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
pytest.importorskip("triton")
import bench_lib  # noqa: E402


def collect(*args, env=None):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_dtype_ids_select_with_k():
    assert (
        DTYPE_IDS
        == bench_lib.DTYPE_IDS
        == {
            torch.bfloat16: "bf16",
            torch.float16: "fp16",
            torch.float32: "fp32",
            torch.float64: "fp64",
        }
    )
    selected = collect("tests/backends/test_gpu.py", "-k", "bf16")
    assert len(selected) == 8 and all("[bf16-" in s for s in selected)
    composed = collect("tests/backends/test_composed.py", "-k", "fp32 and test_composed_chain_matches_oracle")
    assert composed and all("[fp32-" in s for s in composed)


def test_layer_ids_select_one_shape_with_k():
    gpu_shapes = "8192x4096x4096r16,8192x4096x11008r16,8192x11008x4096r16,8192x4096x4096r64"
    env = {"RESLORA_BENCH_LAYER_SHAPES": gpu_shapes}
    assert collect("benchmarks/test_layer.py", "-k", "4096x4096-r16", env=env) == [
        f"benchmarks/test_layer.py::test_layer[M8192-4096x4096-r16-{'bf16' if torch.cuda.is_available() else 'fp32'}]"
    ]


def test_layer_settings():
    assert bench_lib.parse_shapes("8192x4096x4096r16, 64x32x48r4") == [(8192, 4096, 4096, 16), (64, 32, 48, 4)]
    with pytest.raises(ValueError, match="'4096->4096' is not MxKxNrR"):
        bench_lib.parse_shapes("4096->4096")
    variants = bench_lib.layer_variants("cuda")
    kept = bench_lib.selected_variants(variants, "frozen,fused")
    assert kept and {v for v, _, _ in kept} == {"frozen", "fused"}
    assert bench_lib.selected_variants(variants, "") == variants
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['fast'\]"):
        bench_lib.selected_variants(variants, "frozen,fast")


def test_every_compiled_case_runs_compiled():
    """Two shapes x 4 modes x 2 phases = 16 graphs of one function, twice dynamo's default
    recompile limit: each case's call must run a compiled graph, built once and reused when the
    cases are interleaved. (Before the fix, the 9th case onwards ran eagerly.)"""
    graphs, runs = [], []

    def counting_backend(gm, example_inputs):
        index = len(graphs)
        graphs.append(gm)

        def run(*args):
            runs.append(index)
            return gm.forward(*args)

        return run

    config = torch._dynamo.config
    saved = config.recompile_limit, config.fail_on_recompile_limit_hit
    torch._dynamo.reset()
    try:
        cases = [
            bench_lib.layer_case(
                "compiled", mode, M, 16, 24, 4, torch.float32, backward, device="cpu", compile_backend=counting_backend
            )
            for M in (8, 12)
            for mode in bench_lib.MODES
            for backward in (True, False)
        ]
        for round_ in range(2):
            for case in cases:
                case.prepare()
                before = len(runs)
                case.step()
                assert len(runs) > before, f"case {cases.index(case)} ran eagerly (round {round_})"
            assert len(graphs) == len(cases)  # one graph per case, none rebuilt in the second round
    finally:
        torch._dynamo.reset()
        config.recompile_limit, config.fail_on_recompile_limit_hit = saved


# ---------------------------------------------------------------------------- the default CPU sweep stays small
PLAN = r"""
import json, sys
sys.path.insert(0, "benchmarks")
import bench_lib, test_e2e, test_layer, test_merge, test_overhead

variants = bench_lib.layer_variants("cpu")
layer_flop = sum(  # every variant: forward+backward (6MKN) and forward (2MKN), per round
    (test_layer.ROUNDS + test_layer.WARMUP + 2) * len(variants) * 8 * M * K * N for M, K, N, _ in test_layer.SHAPES
)
h, inter, layers = (test_e2e.SIZES[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
kv = test_e2e.SIZES["num_key_value_heads"] * h // test_e2e.SIZES["num_attention_heads"]
params = layers * (h * (2 * h + 2 * kv) + 3 * h * inter) + h * test_e2e.SIZES["vocab_size"]
e2e_flop = (test_e2e.ROUNDS + 4) * len(test_e2e.VARIANTS) * 6 * test_e2e.SEQ * test_e2e.BATCH * params
merge_flop = (test_merge.ROUNDS + 2) * 3 * 2 * test_merge.N * test_merge.K * (test_merge.RANK + 1)
print(json.dumps({
    "full": bench_lib.FULL,
    "gflop": (layer_flop + e2e_flop + merge_flop) / 1e9,
    "overhead_calls": (test_overhead.ROUNDS + 2) * test_overhead.CALLS,
    "layer_shapes": len(test_layer.SHAPES),
    "layer_kinds": sorted({(K < N) for _, K, N, _ in test_layer.SHAPES}),
    "layer_variants": variants,
    "e2e_variants": test_e2e.VARIANTS,
}))
"""


def suite_plan(**env):
    """What the CPU suites would run under ``env`` (their module settings, read in a fresh process)."""
    import json

    clean = {k: v for k, v in os.environ.items() if not k.startswith("RESLORA_BENCH_")}
    proc = subprocess.run(
        [sys.executable, "-c", PLAN], capture_output=True, text=True, cwd=ROOT, env={**clean, **env}
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the reduced sweep is the CPU default")
def test_default_cpu_sweep_is_small_and_keeps_every_kind_of_row():
    """``pytest benchmarks/`` on CPU must stay within two minutes on a loaded two-core machine. The
    default sweep's arithmetic (every timed, warm-up and memory call of the layer, e2e and merge
    suites) stays under 300 GFLOP: at ~275 GFLOP the whole run took 67 s (55 s in pytest) on the
    two-core development machine at load average 5-6, where the full sweep (~4600 GFLOP) took
    15 min. The host-overhead suite stays under 200 calls per variant. The full sweep
    (``RESLORA_BENCH_FULL=1``) is over ten times more; both run the same variants, modes and kinds
    of layer shape, so the results file has the same kinds of rows."""
    default, full = suite_plan(), suite_plan(RESLORA_BENCH_FULL="1")
    assert not default["full"] and full["full"]
    assert default["gflop"] < 300, default["gflop"]
    assert default["overhead_calls"] <= 200, default["overhead_calls"]
    assert full["gflop"] > 10 * default["gflop"]
    for key in ("layer_shapes", "layer_kinds", "layer_variants", "e2e_variants"):
        assert default[key] == full[key], key
    assert default["layer_kinds"] == [False, True]  # a narrowing and a widening projection


def test_bench_flag_refuses_what_it_cannot_read(monkeypatch):
    monkeypatch.setenv("RESLORA_BENCH_FULL", "maybe")
    with pytest.raises(ValueError, match="RESLORA_BENCH_FULL='maybe': expected 1/true/yes/on or 0/false/no/off"):
        bench_lib.env_flag("RESLORA_BENCH_FULL")
    for value, expected in [("1", True), ("TRUE", True), ("on", True), ("0", False), ("", False), ("no", False)]:
        monkeypatch.setenv("RESLORA_BENCH_FULL", value)
        assert bench_lib.env_flag("RESLORA_BENCH_FULL") is expected
