"""The GPU check: one command that, on a lent GPU machine, runs every check that needs a GPU, in
priority order, within a global deadline, and leaves a log and one results file behind.

    RESLORA_BUILD_CUDA=0 pip install --no-deps --no-build-isolation -e . && \\
        python benchmarks/gpu_check.py --commit <the commit's hash> --out $OUT

(the device machine's copy of the tree has no .git: ``--commit`` names the commit in the results;
benchmarks/README.md, "GPU check", explains the command, the stages' time budgets and the files).

Stages (each is recorded as passed, failed or skipped, with its time; a stage that would not
finish before the deadline is skipped, and a failure never stops the stages after it):

    probe        GPU, driver, CUDA, torch, Triton, SM count, commit
    kernels      one real autotuned launch of every op in reslora_kernels.ops on each launch path,
                 outputs NaN-poisoned, checked against the float64 formula with the tests' rules
                 (the dequantization ops: bit for bit against the reference)
    sanitizer    compute-sanitizer memcheck over the same ops at small odd, aligned and
                 multi-rank-tile shapes (a subprocess of this script, RESLORA_TUNE=pinned)
    gpu_tests    pytest tests/backends/test_gpu.py -k bf16
    merge        the merge-fold and host-overhead benchmark suites
    layer        the LLaMA-7B 4096 -> 4096 layer at M = 8192, r = 16: frozen nn.Linear, PEFT,
                 composed, fused, auto, every mode, fwd+bwd and fwd-only, interleaved in one process
    e2e          the end-to-end training-step suite, if time is left

Everything heavy runs in a subprocess with a timeout: a kernel that corrupts its CUDA context
or hangs costs its own case, and the kernels stage goes on with the next case in a fresh
process. Files under ``--out`` (at most 7, the device tool returns 8):

    gpu_check.log       everything, subprocess outputs included
    results.json        benchmarks/report.py's format (environment, rows, ratios) plus ``check``
                        and ``stages``: ``python benchmarks/report.py results.json --readme
                        benchmarks/README.md``
    sanitizer.txt       compute-sanitizer's output and error summary
    pytest_bf16.txt     the bf16 GPU tests' output
    gpu_test_log.json   tests/conftest.py's GPU test log (GPU runs only)
    chart.png           the layer chart (when matplotlib is there)

The output ends with a table of the stages and kernel cases; the exit code is 0 when every stage
passed, 1 when one failed, 2 when one was skipped. ``--dry-run`` runs the same stages,
subprocesses and files on CPU: the kernels in Triton's interpreter at tiny shapes, the suites at
tiny sizes, the sanitizer stage's worker without compute-sanitizer (tests/tools/test_gpu_check.py runs it
in CI).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import glob
import importlib.util
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

LOG_FILE = "gpu_check.log"
RESULTS_FILE = "results.json"
SANITIZER_FILE = "sanitizer.txt"
PYTEST_FILE = "pytest_bf16.txt"
GPU_TEST_LOG_FILE = "gpu_test_log.json"
CHART_FILE = "chart.png"
#: Every file the check may leave under --out (the device tool returns at most 8 files).
OUT_FILES = (LOG_FILE, RESULTS_FILE, SANITIZER_FILE, PYTEST_FILE, GPU_TEST_LOG_FILE, CHART_FILE)
MAX_OUT_FILES = 7

STATUSES = ("passed", "failed", "skipped")
#: Seconds kept free at the deadline to write the results and print the summary.
RESERVE_S = 10.0
#: The layer stage's shape: the LLaMA-7B attention projection at 8192 tokens (its pytest id).
LAYER_SELECTION = "4096x4096-r16"
LAYER_VARIANTS = "frozen,peft_fp32,composed,fused,auto"


# ---------------------------------------------------------------------------- stages and deadline
@dataclasses.dataclass
class Stage:
    """``run(ctx, budget_s)`` returns ``{"status", "summary", "details"}``; it is given at most
    ``budget_s`` seconds (its cap, or what is left before the deadline) and is skipped when less
    than ``min_s`` is left. ``dry_min_s`` / ``dry_cap_s`` apply to --dry-run."""

    name: str
    title: str
    run: Callable
    min_s: float
    cap_s: float
    dry_min_s: float = 5.0
    dry_cap_s: float = 120.0
    needs_gpu: bool = True


class Runner:
    """Runs stages in order against one deadline. After every stage the results file is
    rewritten (``on_stage``), so a run killed from outside still leaves every finished stage."""

    def __init__(
        self,
        deadline_s: float,
        dry_run: bool = False,
        clock: Callable[[], float] = time.monotonic,
        reserve_s: float = RESERVE_S,
        log: Callable[[str], None] = print,
        on_stage: Callable[[], None] | None = None,
    ) -> None:
        self.clock = clock
        self.start = clock()
        self.deadline = self.start + deadline_s
        self.dry_run = dry_run
        self.reserve_s = reserve_s
        self.log = log
        self.on_stage = on_stage or (lambda: None)
        self.records: list[dict] = []

    def left(self) -> float:
        """Seconds a stage may still use: up to the deadline, less the reserve."""
        return self.deadline - self.clock() - self.reserve_s

    def elapsed(self) -> float:
        return self.clock() - self.start

    def run(self, stage: Stage, ctx) -> dict:
        min_s, cap_s = (stage.dry_min_s, stage.dry_cap_s) if self.dry_run else (stage.min_s, stage.cap_s)
        left = self.left()
        record = {"name": stage.name, "title": stage.title, "status": "skipped", "seconds": 0.0, "details": {}}
        if stage.needs_gpu and ctx is not None and not ctx.gpu_ok:
            record["summary"] = f"not run: {ctx.gpu_problem}"
        elif left < min_s:
            record["summary"] = f"deadline: {max(left, 0):.0f} s left, the stage needs at least {min_s:.0f} s"
        else:
            budget = min(cap_s, left)
            self.log(f"\n=== stage {stage.name}: {stage.title} (budget {budget:.0f} s, {left:.0f} s left)")
            t0 = self.clock()
            try:
                result = stage.run(ctx, budget)
            except Exception:  # a stage's own bug must not cost the stages after it
                result = {"status": "failed", "summary": "the stage raised", "details": {}}
                result["details"]["traceback"] = traceback.format_exc()
                self.log(result["details"]["traceback"])
            record.update(result)
            record["seconds"] = round(self.clock() - t0, 2)
            if record["status"] not in STATUSES:
                raise ValueError(f"stage {stage.name} returned status {record['status']!r}")
        self.log(f"--- stage {stage.name}: {record['status'].upper()} ({record['seconds']:.1f} s) {record['summary']}")
        self.records.append(record)
        self.on_stage()
        return record


# ---------------------------------------------------------------------------- subprocesses
@dataclasses.dataclass
class Proc:
    returncode: int | None
    seconds: float
    output: str
    killed: str | None  # why the process group was killed (timeout, stuck case), else None


def run_process(
    cmd: list[str],
    timeout_s: float,
    output_path: Path,
    env: dict | None = None,
    watch: Callable[[], str | None] | None = None,
) -> Proc:
    """``cmd`` in its own process group, output (stdout and stderr) into ``output_path``; the
    whole group is killed at ``timeout_s`` or as soon as ``watch()`` returns a reason. Output goes
    to a file, not a pipe, so a child that hangs cannot block on a full pipe, and whatever it
    printed is kept."""
    t0 = time.monotonic()
    killed = None
    with open(output_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        while proc.poll() is None:
            if time.monotonic() - t0 > timeout_s:
                killed = f"timed out after {timeout_s:.0f} s"
            elif watch is not None:
                killed = watch()
            if killed:
                _kill_group(proc)
                break
            time.sleep(0.2)
    return Proc(proc.returncode, time.monotonic() - t0, output_path.read_text(errors="replace"), killed)


def _kill_group(proc: subprocess.Popen) -> None:
    # The group, not the process: compute-sanitizer and pytest have children of their own.
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def junit_counts(path: Path) -> dict:
    """Outcome counts and per-test outcomes of a pytest ``--junitxml`` file."""
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    tests = {}
    if not path.exists():
        return {**counts, "selected": 0, "tests": tests}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
        counts[outcome] += 1
        tests[name] = outcome
    return {**counts, "selected": len(tests), "tests": tests}


def verbose_counts(output: str) -> dict:
    """The counts of :func:`junit_counts` from ``pytest -v`` lines (``path::test[id] PASSED``)."""
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    tests = {}
    for name, outcome in re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", output, re.M):
        tests[name] = outcome.lower()
    for outcome in tests.values():
        counts[outcome] += 1
    return {**counts, "selected": len(tests), "tests": tests}


# ---------------------------------------------------------------------------- the run's context
@dataclasses.dataclass
class Context:
    out: Path
    tmp: Path
    dry_run: bool
    seed: int
    log: Callable[..., None]
    sanitizer: str | None = None
    e2e_batch: int = 4
    environment: dict = dataclasses.field(default_factory=dict)
    rows: list = dataclasses.field(default_factory=list)
    gpu_ok: bool = True
    gpu_problem: str = ""
    hopper: bool = False
    load_start: list = dataclasses.field(default_factory=lambda: list(os.getloadavg()))

    def env(self, **extra) -> dict:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if self.dry_run:
            # CPU only, even on a machine with a GPU: kernels in Triton's interpreter.
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["TRITON_INTERPRET"] = "1"
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def append_log(self, title: str, text: str) -> None:
        self.log(f"----- {title} -----\n{text.rstrip()}\n----- end of {title} -----", to_stdout=False)


def script_cmd(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


# ---------------------------------------------------------------------------- (a) probe
def stage_probe(ctx: Context, budget: float) -> dict:
    path = ctx.tmp / "probe.json"
    proc = run_process(
        script_cmd("--worker", "probe", "--worker-out", str(path)), budget, ctx.tmp / "probe.txt", ctx.env()
    )
    ctx.append_log("probe output", proc.output)
    if proc.returncode != 0 or not path.exists():
        ctx.gpu_ok, ctx.gpu_problem = False, "the probe failed (torch or the package does not import)"
        return {"status": "failed", "summary": f"probe exited {proc.returncode}: {tail(proc.output, 3)}", "details": {}}
    probe = json.loads(path.read_text())
    ctx.environment.update(probe)
    if ctx.sanitizer:
        ctx.environment["compute_sanitizer"] = _sanitizer_version(ctx.sanitizer)
    gpu = probe.get("gpu") or {}
    ctx.hopper = gpu.get("capability", [0])[0] == 9
    if not ctx.dry_run and not gpu:
        ctx.gpu_ok, ctx.gpu_problem = False, "torch sees no CUDA device (use --dry-run on a CPU machine)"
        return {"status": "failed", "summary": ctx.gpu_problem, "details": probe}
    where = f"{gpu.get('name')}, {gpu.get('sm_count')} SMs, driver {probe.get('driver')}" if gpu else "cpu (dry run)"
    versions = probe.get("versions", {})
    summary = f"{where}; torch {versions.get('torch')}, triton {versions.get('triton')}, commit {probe.get('commit')}"
    return {"status": "passed", "summary": summary, "details": {}}


def _sanitizer_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{path}: {err}"
    return f"{path}: {tail(out, 1)}"


def find_sanitizer(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    candidates = [shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer"]
    candidates += sorted(glob.glob("/usr/local/cuda*/bin/compute-sanitizer"), reverse=True)
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


# ---------------------------------------------------------------------------- (b), (c) kernel cases
#: (M, K, N, R) per named shape and scale. gpu: a real autotuned launch, tails in M and a
#: persistent grid walking several tiles per SM (aligned), and the unaligned tables (K = 1000).
#: sanitize: small odd (unaligned), aligned with M tails, and a rank of three rank tiles.
KERNEL_SHAPES = {
    "gpu": {"aligned": (4000, 1024, 1536, 16), "unaligned": (1000, 1000, 520, 16)},
    "sanitize": {"odd": (37, 40, 72, 8), "aligned": (70, 48, 80, 16), "multirank": (33, 64, 48, 130)},
    "dry": {"aligned": (33, 48, 32, 16), "unaligned": (17, 40, 24, 8)},
}
#: Seconds one kernel case may take (the first launch of a kernel compiles and tunes every config).
CASE_TIMEOUT_S = {"gpu": 150.0, "sanitize": 90.0, "dry": 60.0}
#: Worker processes a stage may start: each one after the first replaces a worker that crashed.
MAX_WORKERS = 4
KERNEL_OPS = (
    "lora_down",
    "linear_lora_fwd",
    "lora_grad_out",
    "linear_lora_dx",
    "lora_grad_A",
    "fold_lora_",
    "dequant_4bit",
    "dequant_int8",
)
GEMM_OPS = ("linear_lora_fwd", "linear_lora_dx")


def other_plan(device_is_cpu: bool, hopper: bool) -> str | None:
    """The launch path a device does not take by itself, planned with ``_target.simulate``: a Hopper
    also runs the pointer GEMMs (planned as an A100); the interpreter runs the TMA GEMMs (planned
    as an H100). Other GPUs compile only their own path."""
    if device_is_cpu:
        return "H100"
    return "A100" if hopper else None


def kernel_case_names(scale: str, plan: str | None) -> list[str]:
    """``op/shape`` for every op and shape of ``scale``, ``op/shape@TARGET`` for the GEMMs on the
    other launch path (first shape aligned), and the dropout mask once."""
    shapes = list(KERNEL_SHAPES[scale])
    names = [f"{op}/{shape}" for shape in shapes for op in KERNEL_OPS]
    if plan is not None:
        aligned = next(s for s in shapes if s == "aligned")
        names += [f"{op}/{aligned}@{plan}" for op in GEMM_OPS]
    return names + ["dropout_keep_mask/mask"]


def run_kernel_cases(ctx: Context, budget: float, scale: str, output: Path, wrapper: list[str], extra_env: dict):
    """Runs every case of ``scale`` in worker processes; a worker that dies or hangs costs the
    case it was running, and a fresh worker takes the rest. Returns ``(cases, outputs)``."""
    names = kernel_case_names(scale, other_plan(ctx.dry_run, ctx.hopper))
    case_timeout = CASE_TIMEOUT_S[scale]
    results: dict[str, dict] = {}
    stop = time.monotonic() + budget
    outputs = []
    not_run = f"not run: {MAX_WORKERS} workers died before this case"
    for attempt in range(MAX_WORKERS):
        todo = [n for n in names if n not in results]
        left = stop - time.monotonic()
        if not todo:
            break
        if left < 5:
            not_run = "not run: no time left"
            break
        progress = ctx.tmp / f"{scale}-progress-{attempt}.jsonl"
        progress.write_text("")
        state = {"case": None, "since": time.monotonic()}

        def watch():
            events = _read_events(progress)
            started = [e for e in events if e["event"] == "start"]
            if started and started[-1]["case"] != state["case"]:
                state["case"], state["since"] = started[-1]["case"], time.monotonic()
            if state["case"] and time.monotonic() - state["since"] > case_timeout:
                return f"case {state['case']} ran over {case_timeout:.0f} s"
            return None

        cmd = wrapper + script_cmd(
            "--worker", "kernels", "--scale", scale, "--cases", ",".join(todo), "--seed", str(ctx.seed + attempt),
            "--worker-out", str(progress),
        )  # fmt: skip
        ctx.log(f"[{scale}] worker {attempt + 1}: {len(todo)} cases")
        proc = run_process(cmd, left, output, ctx.env(**extra_env), watch)
        outputs.append(proc)
        events = _read_events(progress)
        for e in events:
            if e["event"] == "done":
                results[e["case"]] = e
                mark = "ok " if e["status"] == "passed" else "FAIL"
                ctx.log(f"  {mark} {e['case']:<34} {e['seconds']:7.2f} s  {', '.join(e.get('kernels', []))}")
                if e["status"] != "passed":
                    ctx.log("       " + e.get("error", "").strip().replace("\n", "\n       "))
        started = {e["case"] for e in events if e["event"] == "start"}
        crashed = [n for n in started if n not in results]
        for name in crashed:
            why = proc.killed or f"the worker exited with code {proc.returncode} during this case"
            results[name] = {"case": name, "status": "failed", "seconds": None, "error": f"{why}\n{tail(proc.output)}"}
            ctx.log(f"  FAIL {name}: {why}")
        if not started:  # died before its first case (import error): a new worker would too
            for name in todo:
                error = proc.killed or f"the worker exited with code {proc.returncode} before its first case"
                results[name] = {
                    "case": name,
                    "status": "failed",
                    "seconds": None,
                    "error": f"{error}\n{tail(proc.output)}",
                }
            break
    for name in names:
        results.setdefault(name, {"case": name, "status": "skipped", "seconds": None, "error": not_run})
    return [results[n] for n in names], outputs


def _read_events(path: Path) -> list[dict]:
    events = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            pass
    return events


def _case_summary(cases: list[dict]) -> tuple[str, str]:
    counts = {s: sum(c["status"] == s for c in cases) for s in STATUSES}
    failed = [c["case"] for c in cases if c["status"] == "failed"]
    # Cases left unrun for lack of time fail the stage too: it did not check what it names.
    status = "failed" if failed or counts["skipped"] or counts["passed"] == 0 else "passed"
    summary = f"{counts['passed']}/{len(cases)} cases passed" + (f"; FAILED: {', '.join(failed)}" if failed else "")
    if counts["skipped"]:
        reasons = sorted({c["error"] for c in cases if c["status"] == "skipped"})
        summary += f"; {counts['skipped']} {', '.join(reasons)}"
    return status, summary


def stage_kernels(ctx: Context, budget: float) -> dict:
    scale = "dry" if ctx.dry_run else "gpu"
    output = ctx.tmp / "kernels.txt"
    cases, procs = run_kernel_cases(ctx, budget, scale, output, [], {})
    ctx.append_log("kernels worker output", output.read_text(errors="replace"))
    status, summary = _case_summary(cases)
    return {"status": status, "summary": summary, "details": {"scale": scale, "cases": cases}}


SANITIZER_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) error")


def sanitizer_errors(text: str) -> int | None:
    """Errors compute-sanitizer reported over every ``ERROR SUMMARY`` line (None: no summary)."""
    found = [int(n) for n in SANITIZER_SUMMARY.findall(text)]
    return sum(found) if found else None


def stage_sanitizer(ctx: Context, budget: float) -> dict:
    report = ctx.out / SANITIZER_FILE
    if ctx.sanitizer is None and not ctx.dry_run:
        report.write_text("compute-sanitizer: not found (looked on PATH and in /usr/local/cuda*/bin)\n")
        return {"status": "skipped", "summary": "compute-sanitizer not found", "details": {}}
    # Every tensor its own cudaMalloc (the caching allocator would hide an out-of-bounds access
    # inside one of its blocks); one pinned config per kernel where the package offers it, so
    # the autotuner does not benchmark every config under the sanitizer.
    extra = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "RESLORA_TUNE": "pinned"}
    if ctx.dry_run:
        wrapper, note = [], "dry run: the worker ran without compute-sanitizer (none on CPU)"
    else:
        wrapper = [ctx.sanitizer, "--tool", "memcheck", "--print-limit", "50", "--target-processes", "application-only"]
        note = " ".join(wrapper)
    output = ctx.tmp / "sanitizer-raw.txt"
    cases, procs = run_kernel_cases(ctx, budget, "sanitize", output, wrapper, extra)
    raw = output.read_text(errors="replace")
    errors = None if ctx.dry_run else sanitizer_errors(raw)
    status, summary = _case_summary(cases)
    if not ctx.dry_run:
        if "Device not supported" in raw:
            # Seen on gVisor machines: the sanitizer refuses the device, then every allocation fails.
            status, summary = "skipped", "compute-sanitizer does not support this machine ('Device not supported')"
        elif errors is None:
            status, summary = "failed", f"no ERROR SUMMARY from compute-sanitizer; {summary}"
        elif errors:
            status, summary = "failed", f"{errors} memcheck errors; {summary}"
        else:
            summary = f"0 memcheck errors; {summary}"
    # The device tool returns files of at most 16 MiB: keep the head (setup) and the tail (summary).
    text = raw if len(raw) < 4_000_000 else raw[:1_000_000] + "\n[... cut ...]\n" + raw[-2_000_000:]
    report.write_text(f"{note}\nerrors: {errors}\nstatus: {status}: {summary}\n\n{text}")
    ctx.append_log("sanitizer output (tail)", tail(raw, 60))
    details = {"command": note, "errors": errors, "env": extra, "cases": cases}
    return {"status": status, "summary": summary, "details": details}


# ---------------------------------------------------------------------------- (d) pytest
def stage_gpu_tests(ctx: Context, budget: float) -> dict:
    junit, logs = ctx.tmp / "gpu_tests.xml", ctx.tmp / "gpu_logs"
    cmd = [sys.executable, "-m", "pytest", "tests/backends/test_gpu.py", "-k", "bf16", "-v", "-rfE"]
    cmd += ["-p", "no:cacheprovider", f"--junitxml={junit}"]
    output = ctx.out / PYTEST_FILE
    output.write_text(" ".join(cmd) + "\n\n")
    proc = run_process(cmd, budget, output, ctx.env(RESLORA_GPU_LOG_DIR=logs))
    ctx.append_log("pytest -k bf16 output (tail)", tail(proc.output, 40))
    # pytest writes the junit file at the end: a run killed at its budget leaves only the -v lines.
    counts = junit_counts(junit) if junit.exists() else verbose_counts(proc.output)
    for path in sorted(logs.glob("*.json")) if logs.exists() else []:
        shutil.copyfile(path, ctx.out / GPU_TEST_LOG_FILE)
    summary = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "error", "skipped"))
    details = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, **counts}
    if proc.killed:
        return {"status": "failed", "summary": f"{proc.killed}; {summary}", "details": details}
    if counts["selected"] == 0:
        return {"status": "failed", "summary": "-k bf16 selected no test", "details": details}
    if proc.returncode != 0 or counts["failed"] or counts["error"]:
        return {"status": "failed", "summary": summary, "details": details}
    if not ctx.dry_run and counts["passed"] == 0:
        return {"status": "failed", "summary": f"nothing ran on the GPU: {summary}", "details": details}
    return {"status": "passed", "summary": summary, "details": details}


# ---------------------------------------------------------------------------- (e), (f), (g) suites
def run_suite(ctx: Context, budget: float, name: str, args: list[str], extra_env: dict) -> dict:
    """A benchmark suite in its own pytest process; its results file's rows join the check's."""
    out_dir, junit = ctx.tmp / f"bench-{name}", ctx.tmp / f"bench-{name}.xml"
    out_dir.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    output = ctx.tmp / f"bench-{name}.txt"
    env = {"RESLORA_BENCH_OUT": out_dir, **extra_env}
    if ctx.dry_run:
        # One torch thread: an OpenMP team on a loaded CPU machine waits at every barrier.
        env["RESLORA_BENCH_THREADS"] = 1
    proc = run_process(cmd, budget, output, ctx.env(**env))
    ctx.append_log(f"{name} suite output", proc.output)
    rows, environments = [], []
    for path in sorted(out_dir.glob("*.json")):
        data = json.loads(path.read_text())
        rows += data["rows"]
        environments.append({k: data["environment"].get(k) for k in ("backend_report", "load_average", "cpu_threads")})
    ctx.rows += rows
    counts = junit_counts(junit)
    summary = f"{len(rows)} rows; pytest: {counts['passed']} passed, {counts['failed'] + counts['error']} failed"
    summary += f", {counts['skipped']} skipped"
    details = {
        "command": " ".join(cmd[1:]),
        "env": {k: str(v) for k, v in extra_env.items()},
        "returncode": proc.returncode,
    }
    details.update(rows=len(rows), suite_environment=environments, tests=counts["tests"])
    if proc.killed:
        return {"status": "failed", "summary": f"{proc.killed}; {summary}", "details": details}
    if proc.returncode != 0 or not rows:
        return {"status": "failed", "summary": f"exit code {proc.returncode}; {summary}", "details": details}
    return {"status": "passed", "summary": summary, "details": details}


def stage_merge(ctx: Context, budget: float) -> dict:
    return run_suite(ctx, budget, "merge", ["benchmarks/test_merge.py", "benchmarks/test_overhead.py"], {})


def stage_layer(ctx: Context, budget: float) -> dict:
    env = {"RESLORA_BENCH_VARIANTS": LAYER_VARIANTS}
    selection = LAYER_SELECTION
    if ctx.dry_run:
        env.update(RESLORA_BENCH_LAYER_SHAPES="64x32x48r4", RESLORA_BENCH_ROUNDS=3)
        selection = "32x48-r4"
    return run_suite(ctx, budget, "layer", ["benchmarks/test_layer.py", "-k", selection], env)


def stage_e2e(ctx: Context, budget: float) -> dict:
    env = {"RESLORA_BENCH_VARIANTS": LAYER_VARIANTS}
    env.update({"RESLORA_BENCH_E2E_ROUNDS": 1} if ctx.dry_run else {"RESLORA_BENCH_E2E_BATCH": ctx.e2e_batch})
    return run_suite(ctx, budget, "e2e", ["benchmarks/test_e2e.py"], env)


STAGES = [
    Stage("probe", "environment: GPU, driver, CUDA, torch, Triton, commit", stage_probe, 5, 90, 5, 90, False),
    Stage("kernels", "one autotuned launch of every op, checked against float64", stage_kernels, 30, 200, 5, 120),
    Stage("sanitizer", "compute-sanitizer memcheck on small shapes", stage_sanitizer, 30, 120, 5, 120),
    Stage("gpu_tests", "pytest tests/backends/test_gpu.py -k bf16", stage_gpu_tests, 40, 150, 5, 90),
    Stage("merge", "merge-fold and host-overhead suites", stage_merge, 20, 90, 5, 90),
    Stage("layer", "LLaMA-7B 4096->4096 layer, M=8192, r=16, every mode", stage_layer, 60, 240, 5, 90),
    Stage("e2e", "end-to-end training step", stage_e2e, 90, 300, 5, 120),
]


# ---------------------------------------------------------------------------- results and summary
def results_document(ctx: Context, records: list[dict], runner: Runner, argv: list[str]) -> dict:
    from report import compute_ratios

    env = dict(ctx.environment)
    env.setdefault("device", "unknown")
    env.setdefault("versions", {})
    env.setdefault("commit", os.environ.get("RESLORA_GIT_COMMIT", "unknown"))
    env.setdefault("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    env["load_average"] = {"start": ctx.load_start, "end": list(os.getloadavg())}
    failed = [r["name"] for r in records if r["status"] == "failed"]
    skipped = [r["name"] for r in records if r["status"] == "skipped"]
    check = {
        "status": "failed" if failed else "incomplete" if skipped else "passed",
        "failed_stages": failed,
        "skipped_stages": skipped,
        "dry_run": ctx.dry_run,
        "deadline_s": round(runner.deadline - runner.start, 1),
        "elapsed_s": round(runner.elapsed(), 1),
        "seed": ctx.seed,
        "argv": argv,
    }
    return {
        "environment": env,
        "rows": ctx.rows,
        "ratios": compute_ratios(ctx.rows, env["device"]),
        "check": check,
        "stages": records,
    }


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def summary_table(data: dict) -> str:
    env = data["environment"]
    gpu = env.get("gpu") or {}
    head = (
        f"GPU check on {env.get('device')} (driver {env.get('driver')}, CUDA {env.get('cuda')}, "
        f"torch {env['versions'].get('torch')}, triton {env['versions'].get('triton')}, "
        f"{gpu.get('sm_count', '-')} SMs), commit {str(env.get('commit'))[:12]}, "
        f"{data['check']['elapsed_s']:.0f} s of {data['check']['deadline_s']:.0f} s"
        + (" [DRY RUN]" if data["check"]["dry_run"] else "")
    )
    lines = [head, "", "| stage | status | s | summary |", "|---|---|---|---|"]
    for r in data["stages"]:
        lines.append(f"| {r['name']} | {r['status'].upper()} | {r['seconds']:.0f} | {r['summary'][:150]} |")
    kernels = next((r for r in data["stages"] if r["name"] == "kernels"), None)
    if kernels and kernels["details"].get("cases"):
        lines += ["", "| kernel case | status | s | kernels (config) |", "|---|---|---|---|"]
        for c in kernels["details"]["cases"]:
            seconds = "-" if c.get("seconds") is None else f"{c['seconds']:.1f}"
            what = "; ".join(f"{k} ({cfg})" if cfg else k for k, cfg in zip(c.get("kernels", []), c.get("configs", [])))
            lines.append(f"| {c['case']} | {c['status'].upper()} | {seconds} | {what[:160]} |")
    check = data["check"]
    verdict = f"CHECK {check['status'].upper()}"
    if check["failed_stages"]:
        verdict += f"; failed: {', '.join(check['failed_stages'])}"
    if check["skipped_stages"]:
        verdict += f"; skipped: {', '.join(check['skipped_stages'])}"
    return "\n".join(lines + ["", verdict])


def main_check(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stray = [p.name for p in out.iterdir() if p.name not in OUT_FILES]
    log_file = open(out / LOG_FILE, "a", buffering=1)

    def log(text: str, to_stdout: bool = True) -> None:
        log_file.write(text + "\n")
        if to_stdout:
            print(text, flush=True)

    if args.commit:
        os.environ["RESLORA_GIT_COMMIT"] = args.commit
    sys.path.insert(0, str(HERE))  # report.py
    tmp = Path(tempfile.mkdtemp(prefix="reslora-gpu-check-"))
    ctx = Context(
        out=out,
        tmp=tmp,
        dry_run=args.dry_run,
        seed=args.seed if args.seed is not None else secrets.randbelow(2**31),
        log=log,
        sanitizer=None if args.dry_run else find_sanitizer(args.sanitizer),
        e2e_batch=args.e2e_batch,
    )
    stages = [s for s in STAGES if args.stages is None or s.name in args.stages]
    argv = sys.argv[:]

    def save():
        write_json(out / RESULTS_FILE, results_document(ctx, runner.records, runner, argv))

    runner = Runner(args.deadline, dry_run=args.dry_run, log=log, on_stage=save)
    log(f"GPU check{' (dry run)' if args.dry_run else ''}: deadline {args.deadline:.0f} s, out {out}, seed {ctx.seed}")
    if stray:
        log(f"note: {out} already holds {stray}; the device tool returns at most 8 files")
    if args.stages is not None and "probe" not in args.stages:
        stages.insert(0, STAGES[0])  # the environment goes into every results file
    for stage in stages:
        runner.run(stage, ctx)
    data = results_document(ctx, runner.records, runner, argv)
    write_json(out / RESULTS_FILE, data)
    if data["rows"]:
        from report import chart, tables

        # Before the stage table, so that the output's last 12,000 characters hold both.
        log("\n" + tables(data))
        try:
            chart(data, out / CHART_FILE)
        except Exception as err:  # a chart is a convenience: its failure is logged, not the check's
            log(f"no chart: {type(err).__name__}: {err}")
    shutil.rmtree(tmp, ignore_errors=True)
    table = summary_table(data)
    log("\n" + table)
    log_file.close()
    return {"passed": 0, "failed": 1, "incomplete": 2}[data["check"]["status"]]


# ---------------------------------------------------------------------------- workers (subprocesses)
def worker_probe(args) -> int:
    """Writes (and prints) the environment as JSON: the results files' fields plus the GPU's."""
    sys.path.insert(0, str(HERE))
    import torch
    from bench_env import environment

    env = environment()
    env["python"] = platform.python_version()
    env["kernel_release"] = platform.release()  # gVisor reports 4.4.0; Firecracker a real kernel
    env["env"] = {k: v for k, v in os.environ.items() if k.startswith(("RESLORA_", "TRITON_", "CUDA_"))}
    env["gpu"] = None
    env["driver"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": props.name,
            "capability": list(torch.cuda.get_device_capability(0)),
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        }
        try:
            query = [
                "nvidia-smi",
                "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                "--format=csv,noheader",
            ]
            smi = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
            env["driver"] = smi.split(",")[0].strip() if smi else None
            env["nvidia_smi"] = smi
        except (OSError, subprocess.TimeoutExpired) as err:
            env["nvidia_smi"] = f"failed: {err}"
    Path(args.worker_out).write_text(json.dumps(env, indent=2, default=str))
    print(json.dumps(env, indent=2, default=str))
    return 0


class _KernelChecks:
    """The kernel cases: every op of ``reslora_kernels.ops`` against its float64 formula (the
    formulas of tests/ops/test_kernels.py), checked with the tests' tolerance rules, outputs poisoned."""

    def __init__(self, scale: str, seed: int) -> None:
        import torch

        from reslora_kernels import ops, reference
        from reslora_kernels.ops import _target

        # The tests' tolerance rules: tests/helpers.py, which imports tests/oracle.py beside it.
        sys.path.insert(0, str(ROOT / "tests"))
        spec = importlib.util.spec_from_file_location("reslora_tolerance_rules", ROOT / "tests" / "helpers.py")
        self.rules = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.rules)
        self.torch, self.ops, self.reference = torch, ops, reference
        self.scale, self.seed = scale, seed
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # The interpreter's tl.dot is wrong for bfloat16: float16 there, bfloat16 on the GPU.
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float16
        # Under the sanitizer: formulas on the CPU, so that only the kernels and a few copies run
        # on the device (each cuBLAS module loaded would be instrumented too).
        self.ref_device = "cpu" if scale == "sanitize" else self.device
        self.targets = {"A100": _target.A100, "H100": _target.H100}

    def rand(self, *shape, scale=1.0, dtype=None):
        t = self.torch.randn(*shape, device=self.device, dtype=self.torch.float64) * scale
        return t.to(dtype or self.dtype)

    def ref(self, t):
        return None if t is None else t.to(self.ref_device)

    @contextlib.contextmanager
    def poisoned(self):
        """torch.empty / empty_like come back NaN-filled (ints -1): an unwritten element shows up."""
        torch = self.torch
        empty, empty_like = torch.empty, torch.empty_like

        def fill(t):
            if t.numel():
                t.fill_(float("nan") if t.is_floating_point() else -1)
            return t

        torch.empty = lambda *a, **k: fill(empty(*a, **k))
        torch.empty_like = lambda *a, **k: fill(empty_like(*a, **k))
        try:
            yield
        finally:
            torch.empty, torch.empty_like = empty, empty_like

    def launch(self, fn, plan: str | None, record: dict, deterministic: bool = False):
        """``fn()`` once under ``_target.capture`` (which kernels the launchers pick), then for real,
        poisoned and synchronised; records the kernels and the configs the autotuner chose."""
        from reslora_kernels.ops import _target

        torch = self.torch
        simulated = _target.simulate(self.targets[plan]) if plan else contextlib.nullcontext()
        with simulated:
            with _target.capture() as launches:
                fn()
            before = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(deterministic)
            try:
                with self.poisoned():
                    out = fn()
            finally:
                torch.use_deterministic_algorithms(before)
        if self.device == "cuda":
            torch.cuda.synchronize()
        record["kernels"] = [_kernel_name(launch.kernel) for launch in launches]
        record["configs"] = [_config_text(getattr(launch.kernel, "best_config", None)) for launch in launches]
        return out

    def check(self, out, formula, what):
        """The tests' rule (tests/helpers.py ``assert_lowp_close``): normwise and max-abs against
        the float64 formula, relative to PyTorch's own error in the kernel's dtype."""
        torch = self.torch
        self.rules.assert_lowp_close(out.to(self.ref_device), formula(torch.float64), formula(out.dtype), what)
        return self.rules.rel_err(out.to(self.ref_device), formula(torch.float64))

    def mask(self, shape, p, seed):
        return self.reference.dropout_keep_mask(shape, p, seed, self.ref_device)

    def run(self, name: str, index: int) -> dict:
        torch = self.torch
        op, rest = name.split("/")
        shape_name, _, plan = rest.partition("@")
        torch.manual_seed(self.seed * 1009 + index)
        record = {"case": name, "op": op, "plan": plan or "native", "dtype": str(self.dtype).replace("torch.", "")}
        if op == "dropout_keep_mask":
            shape = (70, 129)
            record["shape"] = list(shape)
            got = self.launch(lambda: self.ops.dropout_keep_mask(shape, 0.3, 12345, self.device), None, record)
            if not torch.equal(got.cpu(), self.reference.dropout_keep_mask(shape, 0.3, 12345, "cpu")):
                raise AssertionError("the kernel's dropout mask differs from the reference's")
            return record
        shape = KERNEL_SHAPES[self.scale][shape_name]
        record["shape"] = list(shape)
        # Alternate the flags: the first shape with every input and option, the next without.
        full = list(KERNEL_SHAPES[self.scale]).index(shape_name) % 2 == 0
        record["flags"] = "full" if full else "plain"
        getattr(self, f"_{op}")(shape, full, plan or None, record)
        return record

    def _lora_down(self, shape, full, plan, record):
        M, K, _, R = shape
        x, A = self.rand(M, K), self.rand(R, K, scale=0.2)
        x_prev = self.rand(M, K) if full else None
        p = 0.1 if full else 0.0
        seed = self.ops.seed_tensor(11, self.device)
        z, sqnorm = self.launch(
            lambda: self.ops.lora_down(x, A, x_prev, dropout_p=p, dropout_seed=seed, compute_x_sqnorm=True),
            plan,
            record,
        )
        mask = self.mask((M, K), p, 11)

        def formula(dt):
            lora_in = self.ref(x).to(dt) + (self.ref(x_prev).to(dt) if full else 0)
            return (lora_in * mask / (1 - p)) @ self.ref(A).to(dt).T

        record["rel_err"] = self.check(z, formula, "z")
        err = self.rules.rel_err(sqnorm.cpu(), x.double().square().sum().cpu())
        assert err < 1e-5, f"||x||^2 rel err {err:.3g}"

    def _linear_lora_fwd(self, shape, full, plan, record):
        M, K, N, R = shape
        x, W = self.rand(M, K), self.rand(N, K, scale=K**-0.5)
        bias = self.rand(N) if full else None
        u, B = self.rand(M, R), self.rand(N, R, scale=0.2)
        y = self.launch(lambda: self.ops.linear_lora_fwd(x, W, bias, u, B, 1.5), plan, record)

        def formula(dt):
            out = self.ref(x).to(dt) @ self.ref(W).to(dt).T + 1.5 * (self.ref(u).to(dt) @ self.ref(B).to(dt).T)
            return out + self.ref(bias).to(dt) if full else out

        record["rel_err"] = self.check(y, formula, "y")

    def _lora_grad_out(self, shape, full, plan, record):
        M, _, N, R = shape
        grad_out, B, u = self.rand(M, N), self.rand(N, R, scale=0.2), self.rand(M, R)
        g, dB = self.launch(lambda: self.ops.lora_grad_out(grad_out, B, u, 0.5), plan, record, deterministic=not full)
        record["rel_err"] = self.check(g, lambda dt: 0.5 * self.ref(grad_out).to(dt) @ self.ref(B).to(dt), "g")
        self.check(dB, lambda dt: 0.5 * self.ref(grad_out).to(dt).T @ self.ref(u).to(dt), "dB")

    def _linear_lora_dx(self, shape, full, plan, record):
        torch = self.torch
        M, K, N, R = shape
        grad_out, W = self.rand(M, N), self.rand(N, K, scale=N**-0.5)
        g, A = self.rand(M, R, dtype=torch.float32), self.rand(R, K, scale=0.2)
        p, scale = (0.1, 2.0) if full else (0.0, 1.0)
        seed = self.ops.seed_tensor(3, self.device)
        dx, dx_prev = self.launch(
            lambda: self.ops.linear_lora_dx(
                grad_out, W, g, A, input_scale=scale, dropout_p=p, dropout_seed=seed, store_prev=full
            ),
            plan,
            record,
        )
        mask = self.mask((M, K), p, 3)

        def v(dt):
            return (self.ref(g).to(dt) @ self.ref(A).to(dt)) * scale * mask / (1 - p)

        if full:
            self.check(dx_prev, v, "dx_prev")
        record["rel_err"] = self.check(dx, lambda dt: self.ref(grad_out).to(dt) @ self.ref(W).to(dt) + v(dt), "dx")

    def _lora_grad_A(self, shape, full, plan, record):
        torch = self.torch
        M, K, _, R = shape
        g, x = self.rand(M, R, dtype=torch.float32), self.rand(M, K)
        x_prev = self.rand(M, K) if full else None
        p = 0.1 if full else 0.0
        seed = self.ops.seed_tensor(5, self.device)
        dA = self.launch(
            lambda: self.ops.lora_grad_A(g, x, x_prev, dropout_p=p, dropout_seed=seed),
            plan,
            record,
            deterministic=not full,
        )
        mask = self.mask((M, K), p, 5)

        def formula(dt):
            lora_in = self.ref(x).to(dt) + (self.ref(x_prev).to(dt) if full else 0)
            return self.ref(g).to(dt).T @ (lora_in * mask / (1 - p))

        record["rel_err"] = self.check(dA, formula, "dA")

    def _fold_lora_(self, shape, full, plan, record):
        torch = self.torch
        _, K, N, R = shape
        W, B, A = self.rand(N, K), self.rand(N, R, scale=0.3), self.rand(R, K, scale=0.3)
        target = W.clone()
        self.launch(lambda: self.ops.fold_lora_(target, B, A, -1.25), plan, record)

        def formula(dt):
            # float32 accumulation, one rounding to W's dtype: the contract of every fold.
            acc = torch.float64 if dt == torch.float64 else torch.float32
            out = self.ref(W).to(acc) - 1.25 * (self.ref(B).to(acc) @ self.ref(A).to(acc))
            return out.to(dt)

        # The fold launches once per call: the capture run above left `target` untouched, the
        # real run folded it once.
        record["rel_err"] = self.check(target, formula, "W")

    def same_bits(self, out, ref, what):
        """Bit for bit (the dequantization kernels reproduce their formula exactly)."""
        torch = self.torch
        as_int = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[out.dtype]
        differ = int((out.to(self.ref_device).view(as_int) != ref.view(as_int)).sum())
        if differ:
            raise AssertionError(f"{what}: {differ} of {out.numel()} elements differ from the formula")

    def _dequant_4bit(self, shape, full, plan, record):
        """The weight [N, K] from random packed codes; full: double-quantized absmax."""
        torch = self.torch
        _, K, N, _ = shape
        blocks = -(-N * K // 64)
        packed = torch.randint(0, 256, ((N * K + 1) // 2,), dtype=torch.uint8, device=self.device)
        code = torch.randn(16, device=self.device)
        if full:
            absmax = torch.randint(0, 256, (blocks,), dtype=torch.uint8, device=self.device)
            nested = dict(
                nested_absmax=torch.rand(-(-blocks // 256), device=self.device) + 0.5,
                nested_code=torch.randn(256, device=self.device),
                nested_offset=torch.tensor(0.25, device=self.device),
            )
        else:
            absmax, nested = torch.rand(blocks, device=self.device) + 0.1, {}
        out = self.launch(
            lambda: self.ops.dequant_4bit(
                packed, absmax, code, out=torch.empty(N, K, dtype=self.dtype, device=self.device), blocksize=64,
                **nested,
            ),
            plan,
            record,
        )  # fmt: skip
        ref = self.reference.dequant_4bit(
            self.ref(packed), self.ref(absmax), self.ref(code), blocksize=64,
            out=torch.empty(N, K, dtype=self.dtype, device=self.ref_device),
            **{name: self.ref(t) for name, t in nested.items()},
        )  # fmt: skip
        self.same_bits(out, ref, "W")
        record["rel_err"] = 0.0

    def _dequant_int8(self, shape, full, plan, record):
        torch = self.torch
        _, K, N, _ = shape
        weight_int8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=self.device)
        row_absmax = torch.rand(N, device=self.device) * 2
        out = self.launch(
            lambda: self.ops.dequant_int8(
                weight_int8, row_absmax, out=torch.empty(N, K, dtype=self.dtype, device=self.device)
            ),
            plan,
            record,
        )
        ref = self.reference.dequant_int8(
            self.ref(weight_int8), self.ref(row_absmax), out=torch.empty(N, K, dtype=self.dtype, device=self.ref_device)
        )
        self.same_bits(out, ref, "W")
        record["rel_err"] = 0.0


def _kernel_name(kernel) -> str:
    """The module-level name the op module gives the launched (autotuned) kernel, e.g.
    ``_linear_lora_fwd_unaligned_kernel``: aligned and unaligned tables share one jit function."""
    fn = kernel
    while hasattr(fn, "fn"):  # Autotuner -> JITFunction (or the interpreter's wrapper) -> function
        fn = fn.fn
    module = sys.modules.get(getattr(fn, "__module__", ""), None)
    names = [name for name, value in vars(module).items() if value is kernel] if module else []
    return names[0] if names else getattr(fn, "__name__", repr(kernel))


def _config_text(config) -> str:
    """``BLOCK_M=128 BLOCK_N=256 BLOCK_K=64 w8 s3`` (the blocks, warps and stages that matter)."""
    if config is None:
        return ""
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items() if k.startswith("BLOCK"))
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def worker_kernels(args) -> int:
    """Runs the named cases in order, appending a start and a done event per case to
    ``--worker-out``; exits 3 when a failure left the CUDA context unusable."""
    progress = open(args.worker_out, "a", buffering=1)

    def emit(event: dict) -> None:
        progress.write(json.dumps(event, default=str) + "\n")
        progress.flush()
        os.fsync(progress.fileno())

    checks = _KernelChecks(args.scale, args.seed)
    torch = checks.torch
    print(f"kernel worker: {checks.device}, {checks.dtype}, scale {args.scale}, seed {args.seed}", flush=True)
    for index, name in enumerate(args.cases.split(",")):
        emit({"event": "start", "case": name})
        print(f"[case] {name}", flush=True)
        t0 = time.monotonic()
        try:
            record = checks.run(name, index)
            record["status"] = "passed"
        except Exception as err:
            record = {"case": name, "status": "failed", "error": f"{type(err).__name__}: {err}"}
            record["traceback"] = traceback.format_exc()
            print(record["traceback"], flush=True)
        record["seconds"] = round(time.monotonic() - t0, 3)
        emit({"event": "done", **record})
        if record["status"] == "failed" and checks.device == "cuda":
            try:  # an illegal access leaves the context unusable: every later case would fail too
                torch.ones(1, device="cuda").add_(1).cpu()
                torch.cuda.synchronize()
            except Exception as err:
                print(f"CUDA context lost after {name}: {err}", flush=True)
                return 3
    return 0


# ---------------------------------------------------------------------------- command line
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"), help="output folder (default $OUT)")
    parser.add_argument("--deadline", type=float, default=510.0, help="seconds for the whole check (default 510)")
    parser.add_argument("--dry-run", action="store_true", help="every stage on CPU: interpreter, tiny shapes")
    parser.add_argument("--commit", help="the git commit checked (the device machine's copy has no .git)")
    parser.add_argument("--stages", type=lambda s: s.split(","), help=f"run only these: {[s.name for s in STAGES]}")
    parser.add_argument("--sanitizer", help="path of compute-sanitizer (default: PATH, /usr/local/cuda*/bin)")
    parser.add_argument("--seed", type=int, help="seed of the kernel cases' inputs (default: a fresh one)")
    parser.add_argument("--e2e-batch", type=int, default=4, help="sequences per e2e step on GPU (default 4)")
    parser.add_argument("--worker", choices=["probe", "kernels"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--scale", choices=list(KERNEL_SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stages is not None:
        unknown = set(args.stages) - {s.name for s in STAGES}
        if unknown:
            parser.error(f"unknown stage(s) {sorted(unknown)}; stages: {[s.name for s in STAGES]}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker == "probe":
        return worker_probe(args)
    if args.worker == "kernels":
        return worker_kernels(args)
    return main_check(args)


if __name__ == "__main__":
    raise SystemExit(main())
