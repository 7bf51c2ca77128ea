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
