"""The compile matrix in CI: the kernels built for sm_90a (H100) and sm_80 (A100) on a
machine without a GPU, by the real launchers with the target simulated.

The representative subset (``--subset ci``: every kernel x every config of its table x both
targets, with the flags that need the most resources, in bfloat16 and float32/TF32, plus rank
tile 64 and unaligned shapes in bfloat16) runs once per test run in a subprocess, because the
rest of the suite imports the kernels for Triton's interpreter, which builds nothing. The full
matrix (``python -m tools.compile_matrix``) writes docs/compile_matrix.md.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("triton")
from reslora_kernels.ops import _configs  # noqa: E402
from tools import compile_matrix as cm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """The CI subset's launches (built once per module)."""
    out = tmp_path_factory.mktemp("compile_matrix") / "ci.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "tools.compile_matrix", "--subset", "ci", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.exists(), f"the compile matrix did not run (exit {done.returncode}):\n{done.stderr[-4000:]}"
    launches = cm.from_json(json.loads(out.read_text()))
    builds = sum(len(launch.builds) for launch in launches)
    print(f"compile matrix CI subset: {builds} builds in {time.time() - start:.0f}s")
    return launches


def test_every_launch_passes_every_check(matrix):
    """Compiles; the launcher offers >= 1 config and only configs that fit; no 16-bit offered
    config spills; wgmma and TMA in the Hopper GEMMs; no 32-bit index x stride product."""
    problems = [p for launch in matrix for p in launch.problems()]
    assert not problems, "\n".join(problems)


def test_every_kernel_and_config_is_built_for_both_targets(matrix):
    """The matrix follows the kernels: each launch builds every row of its kernel's table, and
    every kernel of the package is built for each target it runs on."""
    tables = {
        "_linear_lora_fwd_kernel": {"aligned": _configs.GEMM, "unaligned": _configs.GEMM_UNALIGNED},
        "_linear_lora_dx_kernel": {"aligned": _configs.GEMM, "unaligned": _configs.GEMM_UNALIGNED},
        "_linear_lora_fwd_tma_kernel": {"aligned": _configs.GEMM_TMA},
        "_linear_lora_dx_tma_kernel": {"aligned": _configs.GEMM_TMA},
        "_lora_down_kernel": {"aligned": _configs.ROWS, "unaligned": _configs.ROWS_UNALIGNED},
        "_lora_grad_a_kernel": {"aligned": _configs.ROWS, "unaligned": _configs.ROWS_UNALIGNED},
        "_lora_grad_out_kernel": {"aligned": _configs.GRAD_OUT, "unaligned": _configs.GRAD_OUT_UNALIGNED},
        "_fold_kernel": {"aligned": _configs.FOLD, "unaligned": _configs.FOLD_UNALIGNED},
        "_dropout_mask_kernel": {"aligned": [None], "unaligned": [None]},
        "_dequant_4bit_kernel": {"aligned": _configs.DEQUANT, "unaligned": _configs.DEQUANT},
        "_dequant_int8_kernel": {"aligned": _configs.DEQUANT, "unaligned": _configs.DEQUANT},
    }
    hopper = {"_linear_lora_fwd_tma_kernel", "_linear_lora_dx_tma_kernel"}
    pointer_gemms = {"_linear_lora_fwd_kernel", "_linear_lora_dx_kernel"}
    built = {t: {launch.kernel for launch in matrix if launch.target == t} for t in cm.TARGETS}
    assert built["sm_80"] == set(tables) - hopper
    assert built["sm_90a"] >= (set(tables) - pointer_gemms) | {"_linear_lora_dx_kernel"}  # unaligned dx
    for launch in matrix:
        table = tables[launch.kernel]["unaligned" if launch.shape == "unaligned" else "aligned"]
        assert len(launch.builds) == len(table), f"{launch.kernel} {launch.shape}: {len(launch.builds)} builds"


def test_hopper_gemms_take_the_tma_path(matrix):
    """Aligned GEMMs on sm_90a run the persistent TMA kernels; sm_80 and unaligned shapes the
    pointer kernels (with the unaligned config table)."""
    for launch in matrix:
        if launch.op not in ("linear_lora_fwd", "linear_lora_dx"):
            continue
        tma = launch.kernel.endswith("_tma_kernel")
        assert tma == (launch.target == "sm_90a" and launch.shape != "unaligned"), launch
        if tma and launch.precision != "fp32-ieee":
            assert all(b.wgmma and b.tma for b in launch.builds)


def test_pruning_is_per_target(matrix):
    """float32 + input shortcut: configs that fit an H100's 227 KiB but not an A100's 163 KiB
    are offered on one and not the other, and each target keeps at least one."""

    def offered(target):
        (launch,) = [
            x
            for x in matrix
            if x.op == "lora_down" and x.target == target and x.precision == "fp32-tf32" and "prev=1" in x.flags
        ]
        assert all(b.shared <= launch.max_shared for b in launch.builds if b.offered)
        assert any(b.shared > launch.max_shared for b in launch.builds if not b.offered)
        return {b.config for b in launch.builds if b.offered}

    h100, a100 = offered("sm_90a"), offered("sm_80")
    assert a100 and a100 < h100


# fmt: off
# A real TTIR excerpt (Triton 3.9, sm_80): x's offset is a 32-bit product with stride_xm, y's is
# formed in int64 (the pattern tile_ptrs enforces).
TTIR = """module {
  tt.func public @bad(%x_ptr: !tt.ptr<f32> {tt.divisibility = 16 : i32} loc("x_ptr"(#loc)), %y_ptr: !tt.ptr<f32> {tt.divisibility = 16 : i32} loc("y_ptr"(#loc)), %M: i32 {tt.divisibility = 16 : i32} loc("M"(#loc)), %stride_xm: i32 {tt.divisibility = 16 : i32} loc("stride_xm"(#loc)), %stride_ym: i32 {tt.divisibility = 16 : i32} loc("stride_ym"(#loc))) attributes {noinline = false} {
    %offs_2 = tt.make_range {end = 32 : i32, start = 0 : i32} : tensor<32xi32> loc(#loc16)
    %offs_4 = arith.addi %offs_3, %offs_2 : tensor<32xi32> loc(#loc15)
    %v_6 = tt.splat %stride_xm : i32 -> tensor<32xi32> loc(#loc18)
    %v_7 = arith.muli %offs_4, %v_6 : tensor<32xi32> loc(#loc18)
    %v_8 = tt.splat %x_ptr : !tt.ptr<f32> -> tensor<32x!tt.ptr<f32>> loc(#loc19)
    %v_9 = tt.addptr %v_8, %v_7 : tensor<32x!tt.ptr<f32>>, tensor<32xi32> loc(#loc19)
    %0 = arith.extsi %offs_4 : tensor<32xi32> to tensor<32xi64> loc(#loc7)
    %1 = arith.extsi %stride_ym : i32 to i64 loc(#loc7)
    %2 = tt.splat %1 : i64 -> tensor<32xi64> loc(#loc7)
    %3 = arith.muli %0, %2 : tensor<32xi64> loc(#loc7)
    tt.return loc(#loc)
  } loc(#loc)
} loc(#loc)
"""  # noqa: E501
# fmt: on


def test_int32_offset_check_finds_a_32_bit_product():
    assert cm.int32_stride_products(TTIR) == ["%stride_xm"]
    assert cm.int32_stride_products(TTIR.replace("tensor<32xi32> loc(#loc18)", "tensor<32xi64> loc(#loc18)")) == []


def test_problems_name_what_fails():
    """Each check of Launch.problems can fail, with a message naming the build."""
    launch = cm.Launch("linear_lora_fwd", "_linear_lora_fwd_tma_kernel", "sm_90a", "bf16", "aligned", "bias=1", 1000)
    assert launch.problems() == ["_linear_lora_fwd_tma_kernel sm_90a bf16 aligned [bias=1]: no config offered"]
    launch.builds = [
        cm.Build("a", offered=True, shared=2000, wgmma=True, tma=True),
        cm.Build("b", offered=True, stack=8, registers=255, wgmma=True, tma=True),
        cm.Build("c", offered=False, wgmma=False, tma=True),
        cm.Build("d", int32_stride_products=["%stride_xm"], wgmma=True, tma=True),
        cm.Build("e", error="CompilationError: boom"),
    ]
    found = "\n".join(launch.problems())
    for expected in [
        "a: offered but needs 2000 B of 1000 B shared",
        "b: spills (255 registers, 8 B stack)",
        "c: wgmma False, TMA True (both expected)",
        "d: 32-bit index x stride products ['%stride_xm']",
        "e: does not compile: CompilationError: boom",
    ]:
        assert expected in found
    launch.precision = "fp32-tf32"
    assert "spills" not in "\n".join(launch.problems())  # float32 configs may spill


def test_ci_subset_is_representative():
    """Every op, both targets, 16-bit and float32, rank tile 64 and unaligned shapes; a subset of
    the full matrix, which has every precision."""
    scenarios = cm._scenarios()
    subset = cm.tasks("ci")
    ops = {scenarios[i].op for _, i, _, _ in subset}
    assert ops == {s.op for s in scenarios}
    assert {t for t, _, _, _ in subset} == set(cm.TARGETS)
    assert {p for _, _, p, _ in subset} == {"bf16", "fp32-tf32"}
    assert {s for _, _, _, s in subset} == set(cm.SHAPES)
    full = cm.tasks("full")
    assert set(subset) <= set(full) and {p for _, _, p, _ in full} == set(cm.PRECISIONS)


def test_the_docs_table_has_a_row_per_build(matrix):
    text = cm.to_markdown({"9.9.9": ("ci", matrix)}, "the command")
    rows = [line for line in text.splitlines() if line.startswith("| sm_") or line.startswith("|  |")]
    assert len(rows) == sum(len(launch.builds) for launch in matrix)
    assert sum(line.startswith("| sm_") for line in rows) == len(matrix)
    assert "The CI subset" in text and "checks: **all pass**" in text
