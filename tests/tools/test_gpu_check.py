"""benchmarks/gpu_check.py, the one-command GPU check, on CPU: its dry run produces every file with
the schema a GPU run produces (and benchmarks/report.py reads it); the deadline skips the stages
that would not finish; a kernel worker that crashes or hangs costs one case, not the stage; the
kernel checks catch an unwritten or a wrong output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import report  # noqa: E402

STAGE_NAMES = ["probe", "kernels", "sanitizer", "gpu_tests", "merge", "layer", "e2e"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of the whole check (about a minute on a loaded 2-core machine)."""
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    return out, proc


def test_dry_run_passes_and_writes_the_files(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir())  # no folders: the device tool returns plain files
    assert set(files) <= set(gpu_check.OUT_FILES) and len(files) <= gpu_check.MAX_OUT_FILES <= 7
    for name in (gpu_check.LOG_FILE, gpu_check.RESULTS_FILE, gpu_check.SANITIZER_FILE, gpu_check.PYTEST_FILE):
        assert (out / name).stat().st_size > 0, name
    # The summary table ends the output (the device tool returns its last 12,000 characters).
    assert "| stage | status | s | summary |" in proc.stdout[-12000:] and "CHECK PASSED" in proc.stdout[-200:]
    assert "| kernels | PASSED |" in proc.stdout and "[DRY RUN]" in proc.stdout


def test_dry_run_results_schema(dry_run):
    out, _ = dry_run
    data = json.loads((out / gpu_check.RESULTS_FILE).read_text())
    assert {"environment", "rows", "ratios", "check", "stages"} <= set(data)
    env = data["environment"]
    assert {"device", "driver", "cuda", "versions", "commit", "date", "gpu", "kernel_release"} <= set(env)
    assert env["device"] == "cpu" and env["versions"]["torch"] == torch.__version__ and env["versions"]["triton"]
    assert env["commit"] and env["commit"] != "unknown"
    check = data["check"]
    assert check["status"] == "passed" and check["dry_run"] is True and check["deadline_s"] == 510.0
    assert 0 < check["elapsed_s"] < check["deadline_s"]
    assert [s["name"] for s in data["stages"]] == STAGE_NAMES
    for stage in data["stages"]:
        assert stage["status"] == "passed", stage
        assert {"title", "seconds", "summary", "details"} <= set(stage) and stage["seconds"] > 0
    assert {r["suite"] for r in data["rows"]} == {"merge", "overhead", "layer", "e2e"}
    layer = [r for r in data["rows"] if r["suite"] == "layer"]
    assert {(r["variant"], r["phase"]) for r in layer} >= {("frozen", "fwd"), ("composed", "fwd+bwd")}
    assert {r["mode"] for r in layer if r["variant"] == "composed"} == {"none", "is", "bs", "ms"}
    assert all(r["median_ms"] > 0 for r in layer)
    # benchmarks/report.py reads the file as it reads a suite's results file.
    assert report.main([str(out / gpu_check.RESULTS_FILE)]) == 0
    assert "**Layer, M=64 32->48 r=4 float32**" in report.tables(report.combine([out / gpu_check.RESULTS_FILE]))


def test_dry_run_covers_every_op_and_path(dry_run):
    out, _ = dry_run
    from reslora_kernels import ops

    stages = {s["name"]: s for s in json.loads((out / gpu_check.RESULTS_FILE).read_text())["stages"]}
    cases = stages["kernels"]["details"]["cases"]
    helpers = {"simulate", "capture", "seed_tensor", "Target"}
    public_ops = {n for n in ops.__all__ if callable(getattr(ops, n)) and n not in helpers}
    assert {c["op"] for c in cases} == public_ops
    assert all(c["status"] == "passed" and c["kernels"] for c in cases)
    kernels = {k for c in cases for k in c["kernels"]}
    # The interpreter runs the pointer kernels, aligned and unaligned, and (planned as an H100)
    # the TMA GEMMs.
    assert {"_linear_lora_fwd_kernel", "_linear_lora_fwd_unaligned_kernel", "_linear_lora_fwd_tma_kernel"} <= kernels
    sanitize = stages["sanitizer"]["details"]["cases"]
    assert 130 in {c["shape"][3] for c in sanitize if c["op"] != "dropout_keep_mask"}  # several rank tiles
    assert stages["sanitizer"]["details"]["env"]["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
    # -k bf16 selects the bf16 GPU tests (skipped without CUDA).
    gpu_tests = stages["gpu_tests"]["details"]
    assert gpu_tests["selected"] == gpu_tests["skipped"] == 8
    assert all("bf16" in name for name in gpu_tests["tests"])


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_deadline_skips_a_stage_that_would_not_finish():
    clock = FakeClock()
    ran, budgets = [], {}

    def stage(name, seconds, fail=False):
        def run(ctx, budget):
            ran.append(name)
            budgets[name] = budget
            clock.now += seconds
            if fail:
                raise RuntimeError("kernel exploded")
            return {"status": "passed", "summary": "ok", "details": {}}

        return run

    stages = [
        gpu_check.Stage("a", "first", stage("a", 50), min_s=5, cap_s=100, needs_gpu=False),
        gpu_check.Stage("b", "raises", stage("b", 5, fail=True), min_s=5, cap_s=100, needs_gpu=False),
        gpu_check.Stage("c", "too long", stage("c", 1), min_s=60, cap_s=100, needs_gpu=False),
        gpu_check.Stage("d", "overruns its cap", stage("d", 30), min_s=10, cap_s=20, needs_gpu=False),
        gpu_check.Stage("e", "short", stage("e", 1), min_s=10, cap_s=20, needs_gpu=False),
    ]
    saved = []
    runner = gpu_check.Runner(
        100, clock=clock, reserve_s=10, log=lambda *a, **k: None, on_stage=lambda: saved.append(1)
    )
    records = [runner.run(s, None) for s in stages]
    assert [r["status"] for r in records] == ["passed", "failed", "skipped", "passed", "skipped"]
    assert ran == ["a", "b", "d"]
    # a: 100 - 10 reserve = 90 s; b: 40 s left; then 100 - 10 - 55 s used = 35 s left: c (needs
    # 60) is skipped, d gets its cap of 20 (and takes 30), e finds 5 s, under its 10 s minimum.
    assert budgets == {"a": 90, "b": 40, "d": 20}
    assert "deadline: 35 s left, the stage needs at least 60 s" == records[2]["summary"]
    assert "kernel exploded" in records[1]["details"]["traceback"] and records[1]["seconds"] == 5
    assert records[4]["summary"].startswith("deadline:")
    assert len(saved) == 5  # the results file is rewritten after every stage


def test_stages_after_a_failed_probe_are_not_run(tmp_path):
    ctx = gpu_check.Context(out=tmp_path, tmp=tmp_path, dry_run=False, seed=0, log=lambda *a, **k: None)
    ctx.gpu_ok, ctx.gpu_problem = False, "torch sees no CUDA device"
    runner = gpu_check.Runner(500, log=lambda *a, **k: None)
    record = runner.run(gpu_check.STAGES[1], ctx)
    assert record["status"] == "skipped" and record["summary"] == "not run: torch sees no CUDA device"


def test_too_near_a_deadline_skips_everything_and_says_so(tmp_path):
    out = tmp_path / "out"
    code = gpu_check.main(["--dry-run", "--out", str(out), "--deadline", "11"])
    data = json.loads((out / gpu_check.RESULTS_FILE).read_text())
    assert code == 2 and data["check"]["status"] == "incomplete"
    assert [s["status"] for s in data["stages"]] == ["skipped"] * 7
    assert all(s["summary"].startswith("deadline:") for s in data["stages"])
    assert sorted(p.name for p in out.iterdir()) == [gpu_check.LOG_FILE, gpu_check.RESULTS_FILE]


FAKE_WORKER = """
import json, os, sys, time
args = sys.argv[1:]
cases = args[args.index("--cases") + 1].split(",")
with open(args[args.index("--worker-out") + 1], "a") as progress:
    for case in cases:
        progress.write(json.dumps({"event": "start", "case": case}) + "\\n")
        progress.flush()
        if case == os.environ["FAKE_CRASH"]:
            os._exit(7)
        if case == os.environ["FAKE_HANG"]:
            time.sleep(600)
        done = {"event": "done", "case": case, "status": "passed", "seconds": 0.0, "kernels": ["k"], "configs": [""]}
        progress.write(json.dumps(done) + "\\n")
        progress.flush()
"""


def test_a_crashed_or_hung_worker_costs_one_case(tmp_path, monkeypatch):
    """The kernels stage's workers, replaced by a fake that dies with exit code 7 on one case and
    hangs on another (the wrapper slot is where compute-sanitizer goes)."""
    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE_WORKER)
    monkeypatch.setenv("FAKE_CRASH", "lora_grad_out/aligned")
    monkeypatch.setenv("FAKE_HANG", "fold_lora_/unaligned")
    monkeypatch.setitem(gpu_check.CASE_TIMEOUT_S, "dry", 3.0)
    ctx = gpu_check.Context(out=tmp_path, tmp=tmp_path, dry_run=True, seed=0, log=lambda *a, **k: None)
    cases, procs = gpu_check.run_kernel_cases(ctx, 60, "dry", tmp_path / "out.txt", [sys.executable, str(fake)], {})
    by_name = {c["case"]: c for c in cases}
    assert [c["case"] for c in cases] == gpu_check.kernel_case_names("dry", "H100")
    assert "exited with code 7" in by_name["lora_grad_out/aligned"]["error"]
    assert "ran over 3 s" in by_name["fold_lora_/unaligned"]["error"]
    assert {n for n, c in by_name.items() if c["status"] == "failed"} == {
        "lora_grad_out/aligned",
        "fold_lora_/unaligned",
    }
    assert all(
        c["status"] == "passed"
        for n, c in by_name.items()
        if n not in ("lora_grad_out/aligned", "fold_lora_/unaligned")
    )
    assert len(procs) == 3  # a fresh worker after each


def test_sanitizer_summary_is_parsed():
    text = "========= COMPUTE-SANITIZER\n... ========= ERROR SUMMARY: 0 errors\n"
    assert gpu_check.sanitizer_errors(text) == 0
    assert gpu_check.sanitizer_errors(text + "========= ERROR SUMMARY: 3 errors\n") == 3
    assert gpu_check.sanitizer_errors("no summary: the sanitizer never started") is None


@pytest.fixture(scope="module")
def checks():
    # tests/conftest.py has set TRITON_INTERPRET on a machine without CUDA.
    return gpu_check._KernelChecks("dry", seed=0)


def test_kernel_checks_catch_an_unwritten_and_a_wrong_output(checks, monkeypatch):
    from reslora_kernels import ops

    record = checks.run("linear_lora_fwd/aligned", 0)
    assert record["kernels"][0].startswith("_linear_lora_fwd") and record["rel_err"] < 1e-2
    real = ops.linear_lora_fwd

    def unwritten(x, weight, *args):
        y = real(x, weight, *args)
        out = torch.empty_like(y)  # poisoned: the last row is never written
        out[:-1] = y[:-1]
        return out

    monkeypatch.setattr(ops, "linear_lora_fwd", unwritten)
    with pytest.raises(AssertionError):
        checks.run("linear_lora_fwd/aligned", 0)

    def one_wrong_tile(*args):
        y = real(*args)
        y[:16, :16] *= 1.05
        return y

    monkeypatch.setattr(ops, "linear_lora_fwd", one_wrong_tile)
    with pytest.raises(AssertionError, match="max abs err"):
        checks.run("linear_lora_fwd/aligned", 0)


def test_pytest_counts_from_verbose_lines():
    """A pytest run killed at its budget writes no junit file: its -v lines still count."""
    output = (
        "tests/backends/test_gpu.py::test_realistic_size_against_float64[bf16-none-aligned] PASSED [ 12%]\n"
        "tests/backends/test_gpu.py::test_realistic_size_against_float64[bf16-is-aligned] FAILED [ 25%]\n"
        "tests/backends/test_gpu.py::test_realistic_size_against_float64[bf16-bs-aligned] "
    )
    counts = gpu_check.verbose_counts(output)
    assert (counts["passed"], counts["failed"], counts["selected"]) == (1, 1, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check's answer on a machine without CUDA")
def test_without_cuda_the_real_check_runs_nothing_and_says_why(tmp_path):
    code = gpu_check.main(["--out", str(tmp_path), "--commit", "abc123"])
    data = json.loads((tmp_path / gpu_check.RESULTS_FILE).read_text())
    assert code == 1 and data["environment"]["commit"] == "abc123"
    assert data["stages"][0]["status"] == "failed" and "no CUDA device" in data["stages"][0]["summary"]
    assert all(s["status"] == "skipped" and "no CUDA device" in s["summary"] for s in data["stages"][1:])


def test_unknown_stage_is_refused():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--stages", "kernels,layr"])
    assert gpu_check.parse_args(["--stages", "kernels,layer"]).stages == ["kernels", "layer"]
