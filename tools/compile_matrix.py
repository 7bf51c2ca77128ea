"""The compile matrix: every Triton kernel of the package, built for a Hopper (sm_90a) and an Ampere
(sm_80) GPU on a machine that has neither.

It drives the real launchers (``reslora_kernels.ops``) on ``meta`` tensors with the GPU target
simulated (:func:`~reslora_kernels.ops._target.simulate`) and the launches captured
(:func:`~reslora_kernels.ops._target.capture`), so it builds exactly what the launchers would launch:
the kernel they pick (the Hopper TMA kernels on sm_90a), their arguments and specialisation, and
every config of the kernel's own table. Each build runs Triton's whole pipeline and the bundled
``ptxas``; from it come the shared memory (``metadata.shared``), registers and stack frame (spills)
of the real binary (``cuobjdump -res-usage``, :mod:`tools.resources`), the instruction mix of the PTX (``wgmma.mma_async``,
``cp.async.bulk.tensor``) and the TTIR's address arithmetic.

Checks (``Launch.problems``): every config compiles; the launcher's per-target pruning
(:func:`~reslora_kernels.ops._target.usable`) offers at least one config and only configs that fit
the target's shared memory; no offered 16-bit config spills (so each 16-bit launch keeps a config
that does not); the GEMM kernels use wgmma (and TMA) on sm_90a; no 32-bit product of an index and a
stride (offsets that pass 2^31 elements would wrap).

``python -m tools.compile_matrix`` (from the repository root) runs the full matrix and writes
docs/compile_matrix.md; ``--subset ci`` is the representative subset tests/ops/test_compile_matrix.py
runs. It needs ``TRITON_INTERPRET`` unset (the interpreter builds nothing).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import triton

from reslora_kernels.ops import _target
from reslora_kernels.ops._target import A100, H100

from .fake_gpu import SimulatedDriver as _SimulatedDriver
from .resources import int32_stride_products, resource_usage

TARGETS = {"sm_90a": H100, "sm_80": A100}
#: Kernels that must run on wgmma (and load through TMA) on sm_90a: the two big GEMMs.
HOPPER_GEMMS = ("_linear_lora_fwd_tma_kernel", "_linear_lora_dx_tma_kernel")
# (M, K, N, R) per shape class: multiples of 16 everywhere; rank tile 64 (bs concatenated
# ranks, r >= 33); and every dimension 8 mod 16 (the unaligned config tables, no TMA).
SHAPES = {
    "aligned": (8192, 4096, 4096, 16),
    "rank64": (8192, 4096, 4096, 64),
    "unaligned": (1000, 1000, 3000, 16),
}
PRECISIONS = {
    "bf16": (torch.bfloat16, True),
    "fp16": (torch.float16, True),
    "fp32-tf32": (torch.float32, True),
    "fp32-ieee": (torch.float32, False),
}


@dataclasses.dataclass
class Build:
    """One config of one launch, compiled."""

    config: str
    offered: bool = False
    shared: int = 0
    registers: int = 0
    stack: int = 0  # bytes of per-thread stack frame: register spills (the kernels keep no local arrays)
    wgmma: bool = False
    tma: bool = False
    int32_stride_products: list = dataclasses.field(default_factory=list)
    error: str = ""


@dataclasses.dataclass
class Launch:
    """One launch the package can make, on one target, with every config of its kernel built."""

    op: str
    kernel: str
    target: str
    precision: str
    shape: str
    flags: str
    max_shared: int
    builds: list = dataclasses.field(default_factory=list)
    error: str = ""

    def problems(self) -> list[str]:
        """What fails the matrix's checks for this launch (empty when it passes)."""
        where = f"{self.kernel} {self.target} {self.precision} {self.shape} [{self.flags}]"
        if self.error:
            return [f"{where}: {self.error}"]
        found = []
        offered = [b for b in self.builds if b.offered]
        if not offered:
            found.append(f"{where}: no config offered")
        for b in self.builds:
            if b.error:
                found.append(f"{where} {b.config}: does not compile: {b.error.splitlines()[0][:200]}")
                continue
            if b.offered and b.shared > self.max_shared:
                found.append(f"{where} {b.config}: offered but needs {b.shared} B of {self.max_shared} B shared")
            if b.offered and b.stack and self.precision in ("bf16", "fp16"):
                found.append(f"{where} {b.config}: spills ({b.registers} registers, {b.stack} B stack)")
            if b.int32_stride_products:
                found.append(f"{where} {b.config}: 32-bit index x stride products {b.int32_stride_products}")
            hopper_gemm = self.kernel in HOPPER_GEMMS and self.precision != "fp32-ieee"
            if hopper_gemm and not (b.wgmma and b.tma):
                found.append(f"{where} {b.config}: wgmma {b.wgmma}, TMA {b.tma} (both expected)")
        return found


# ------------------------------------------------------------------------------------- scenarios
@dataclasses.dataclass(frozen=True)
class Scenario:
    """A call of one launcher: ``run(dims, dtype)`` makes the launch on meta tensors."""

    op: str
    flags: str
    run: Callable
    deterministic: bool = False
    dtype_independent: bool = False


def _meta(*shape, dtype):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _seed(dropout: bool):
    return torch.empty((), device="meta", dtype=torch.int64) if dropout else None


def _scenarios() -> list[Scenario]:
    from reslora_kernels.ops import (
        dequant_4bit,
        dequant_int8,
        dropout_keep_mask,
        fold_lora_,
        linear_lora_dx,
        linear_lora_fwd,
        lora_down,
        lora_grad_A,
        lora_grad_out,
    )

    found = []
    for prev in (False, True):
        for drop in (False, True):
            for sq in (False, True):

                def down(d, dt, prev=prev, drop=drop, sq=sq):
                    M, K, _, R = d
                    x_prev = _meta(M, K, dtype=dt) if prev else None
                    lora_down(
                        _meta(M, K, dtype=dt), _meta(R, K, dtype=dt), x_prev, input_scale=1.0,
                        dropout_p=0.1 if drop else 0.0, dropout_seed=_seed(drop), compute_x_sqnorm=sq,
                    )  # fmt: skip

                found.append(Scenario("lora_down", f"prev={int(prev)} dropout={int(drop)} sqnorm={int(sq)}", down))
    for bias in (False, True):

        def fwd(d, dt, bias=bias):
            M, K, N, R = d
            linear_lora_fwd(
                _meta(M, K, dtype=dt), _meta(N, K, dtype=dt), _meta(N, dtype=dt) if bias else None,
                _meta(M, R, dtype=dt), _meta(N, R, dtype=dt), 2.0,
            )  # fmt: skip

        found.append(Scenario("linear_lora_fwd", f"bias={int(bias)}", fwd))
    for det in (False, True):

        def grad_out(d, dt):
            M, _, N, R = d
            lora_grad_out(_meta(M, N, dtype=dt), _meta(N, R, dtype=dt), _meta(M, R, dtype=dt), 2.0)

        found.append(Scenario("lora_grad_out", f"deterministic={int(det)}", grad_out, deterministic=det))
    for drop in (False, True):
        for store_prev in (False, True):

            def dx(d, dt, drop=drop, store_prev=store_prev):
                M, K, N, R = d
                linear_lora_dx(
                    _meta(M, N, dtype=dt), _meta(N, K, dtype=dt), _meta(M, R, dtype=torch.float32),
                    _meta(R, K, dtype=dt), input_scale=1.0, dropout_p=0.1 if drop else 0.0,
                    dropout_seed=_seed(drop), store_prev=store_prev,
                )  # fmt: skip

            found.append(Scenario("linear_lora_dx", f"dropout={int(drop)} store_prev={int(store_prev)}", dx))
    for prev in (False, True):
        for drop in (False, True):
            for det in (False, True):

                def grad_a(d, dt, prev=prev, drop=drop):
                    M, K, _, R = d
                    x_prev = _meta(M, K, dtype=dt) if prev else None
                    lora_grad_A(
                        _meta(M, R, dtype=torch.float32), _meta(M, K, dtype=dt), x_prev,
                        dropout_p=0.1 if drop else 0.0, dropout_seed=_seed(drop),
                    )  # fmt: skip

                flags = f"prev={int(prev)} dropout={int(drop)} deterministic={int(det)}"
                found.append(Scenario("lora_grad_A", flags, grad_a, deterministic=det))

    def fold(d, dt):
        _, K, N, R = d
        fold_lora_(_meta(N, K, dtype=dt), _meta(N, R, dtype=dt), _meta(R, K, dtype=dt), 0.5)

    found.append(Scenario("fold_lora_", "", fold))

    def mask(d, dt):
        M, K, _, _ = d
        dropout_keep_mask((M, K), 0.1, _seed(True), "meta")

    found.append(Scenario("dropout_keep_mask", "", mask, dtype_independent=True))
    for nested in (False, True):
        for even_k in (False, True):

            def dequant4(d, dt, nested=nested, even_k=even_k):
                _, K, N, _ = d
                K += not even_k  # an odd K: rows start mid-byte (the per-element path)
                blocks, u8, f32 = -(-N * K // 64), torch.uint8, torch.float32
                nested_args = dict(
                    nested_absmax=_meta(-(-blocks // 256), dtype=f32), nested_code=_meta(256, dtype=f32),
                    nested_offset=_meta((), dtype=f32),
                ) if nested else {}  # fmt: skip
                dequant_4bit(
                    _meta((N * K + 1) // 2, dtype=u8), _meta(blocks, dtype=u8 if nested else f32), _meta(16, dtype=f32),
                    out=_meta(N, K, dtype=dt), blocksize=64, **nested_args,
                )  # fmt: skip

            found.append(Scenario("dequant_4bit", f"nested={int(nested)} even_k={int(even_k)}", dequant4))

    def dequant8(d, dt):
        _, K, N, _ = d
        dequant_int8(_meta(N, K, dtype=torch.int8), _meta(N, dtype=torch.float32), out=_meta(N, K, dtype=dt))

    found.append(Scenario("dequant_int8", "", dequant8))
    return found


#: The CI subset: (precision, shape, ops) on both targets, each op with the flag combination that
#: needs the most resources (every flag on). Every kernel and every config of its table is built.
CI_SUBSET = [
    ("bf16", "aligned", None),  # every op
    ("fp32-tf32", "aligned", ("lora_down", "linear_lora_fwd")),  # what fits in 163 KiB (A100) / 227 KiB
    ("bf16", "rank64", ("linear_lora_dx", "lora_grad_out")),
    ("bf16", "unaligned", ("lora_down", "linear_lora_dx")),
]


def tasks(subset: str) -> list[tuple[str, int, str, str]]:
    """``(target, scenario index, precision, shape)`` of the full matrix or the CI subset.

    full: every launcher flag combination x every precision on aligned shapes, and bf16 for rank
    tile 64 and unaligned shapes, on both targets. ci: :data:`CI_SUBSET`."""
    scenarios = _scenarios()
    heaviest = {}
    for i, s in enumerate(scenarios):
        if s.op not in heaviest or s.flags.count("=1") >= scenarios[heaviest[s.op]].flags.count("=1"):
            heaviest[s.op] = i
    out = []
    for target in TARGETS:
        if subset == "ci":
            for precision, shape, ops in CI_SUBSET:
                for op, i in heaviest.items():
                    if ops is None or op in ops:
                        out.append((target, i, precision, shape))
            continue
        for i, s in enumerate(scenarios):
            for precision in PRECISIONS if not s.dtype_independent else ["bf16"]:
                out.append((target, i, precision, "aligned"))
            for shape in ("rank64", "unaligned"):
                out.append((target, i, "bf16", shape))
    return out


# ---------------------------------------------------------------------------------- building
def _config_label(config: triton.Config) -> str:
    blocks = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK"))
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def build_task(task: tuple[str, int, str, str]) -> list[Launch]:
    """Make one scenario's launches for one target and build every config of each."""
    target_name, index, precision, shape = task
    target = TARGETS[target_name]
    scenario = _scenarios()[index]
    dtype, allow_tf32 = PRECISIONS[precision]
    # The driver's own state, put back afterwards (reset_active() would look for a real GPU).
    driver_before = getattr(triton.runtime.driver, "_active", None)
    triton.runtime.driver.set_active(_SimulatedDriver(target))
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    det_before = torch.are_deterministic_algorithms_enabled()
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.use_deterministic_algorithms(scenario.deterministic)
    try:
        with _target.simulate(target), _target.capture() as captured:
            scenario.run(SHAPES[shape], dtype)
        launches = []
        for made in captured:
            launches.append(_build_launch(scenario, made, target_name, target, precision, shape))
        return launches
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
        torch.use_deterministic_algorithms(det_before)
        triton.runtime.driver._active = driver_before


def _build_launch(scenario, made, target_name, target, precision, shape) -> Launch:
    kernel = made.kernel
    record = Launch(
        op=scenario.op,
        kernel=kernel.fn.__name__ if hasattr(kernel, "configs") else kernel.__name__,
        target=target_name,
        precision="any" if scenario.dtype_independent else precision,
        shape=shape,
        flags=scenario.flags,
        max_shared=target.max_shared,
    )
    if not hasattr(kernel, "configs"):  # a plain jit kernel: one fixed build
        configs, offered = [None], [None]
    else:
        configs = kernel.configs
        kernel.nargs = {}
        # The keywords Triton's Autotuner.run hands its pruner: the launch's, grid and warmup included.
        launch_kwargs = {**made.kwargs, "grid": made.grid, "warmup": False}
        with _target.simulate(target):
            try:
                offered = kernel.prune_configs(launch_kwargs)
            except RuntimeError as err:
                offered, record.error = [], str(err)
    jit_fn = kernel.fn if hasattr(kernel, "configs") else kernel
    for config in configs:
        build = Build(config=_config_label(config) if config else "fixed", offered=config in offered)
        args = dict(made.kwargs)
        if config is not None:
            args.update(config.all_kwargs())
            if config.pre_hook is not None:
                config.pre_hook(args)
        try:
            compiled = jit_fn.warmup(grid=(1,), **args)
            ptx = compiled.asm["ptx"]
            build.shared = compiled.metadata.shared
            build.registers, build.stack = resource_usage(compiled.asm["cubin"])
            build.wgmma = "wgmma.mma_async" in ptx
            build.tma = "cp.async.bulk.tensor" in ptx
            build.int32_stride_products = int32_stride_products(compiled.asm["ttir"])
        except Exception as err:  # noqa: BLE001 (a failed build is a result to report)
            build.error = f"{type(err).__name__}: {err}"
        record.builds.append(build)
    return record


def run_matrix(subset: str = "full", jobs: int | None = None, progress: bool = False) -> list[Launch]:
    """Build every task of ``subset`` in ``jobs`` processes; returns the launches in task order."""
    if _target.INTERPRETED:
        raise RuntimeError("the compile matrix builds real kernels: unset TRITON_INTERPRET")
    work = tasks(subset)
    jobs = jobs or min(2, os.cpu_count() or 1)
    results: list[list[Launch]] = [[] for _ in work]
    start = time.time()
    if jobs == 1:
        for i, task in enumerate(work):
            results[i] = build_task(task)
            if progress:
                print(f"[{i + 1}/{len(work)}] {time.time() - start:.0f}s", file=sys.stderr)
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = {pool.submit(build_task, task): i for i, task in enumerate(work)}
            for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
                results[futures[future]] = future.result()
                if progress:
                    print(f"[{n}/{len(work)}] {time.time() - start:.0f}s", file=sys.stderr)
    return [launch for group in results for launch in group]


# ------------------------------------------------------------------------------------ report
def to_json(launches: list[Launch], subset: str, seconds: float = 0.0) -> dict:
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "subset": subset,
        "seconds": round(seconds),
        "launches": [dataclasses.asdict(launch) for launch in launches],
    }


def from_json(data: dict) -> list[Launch]:
    """The launches of a :func:`to_json` result."""
    out = []
    for item in data["launches"]:
        builds = [Build(**b) for b in item.pop("builds")]
        out.append(Launch(**item, builds=builds))
    return out


def _commit() -> str:
    with contextlib.suppress(OSError):
        root = Path(__file__).resolve().parents[2]
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        if done.returncode == 0:
            return done.stdout.strip()
    return "unknown"


def to_markdown(runs: dict[str, tuple[str, list[Launch]]], command: str) -> str:
    """The docs table: per Triton version (``runs``: version -> (subset, launches)), a summary, then
    one row per build."""
    lines = [
        "# Compile matrix",
        "",
        f"Generated on {datetime.date.today().isoformat()} at commit {_commit()} (do not edit by hand), on a",
        "machine without a GPU, by `" + command + "`.",
        "",
        "Every kernel x every config of its table x precision x the flag combinations the launchers",
        "pass x {sm_90a (H100, 232448 B shared memory per block), sm_80 (A100, 166912 B)}, built by the",
        "real launchers with the target simulated (`tools/compile_matrix.py`).",
        "",
        "Columns: **offered** = the launcher's per-target pruning keeps the config (it fits the",
        "shared memory and, unless every config spills, does not spill); **regs** = registers per",
        "thread and **spill** = stack frame bytes per thread of the real binary (`cuobjdump",
        "-res-usage`; the kernels keep no local arrays, so stack = spills); **smem** = shared memory",
        "per block (KiB); **wgmma** / **TMA** = `wgmma.mma_async` / `cp.async.bulk.tensor` in the PTX.",
        "Float32 is built with TF32 (`fp32-tf32`) and without (`fp32-ieee`, torch's default: no tensor",
        "cores, so no wgmma). Flags: prev = input shortcut `x_prev`, sqnorm = the norm statistic,",
        "store_prev = the gradient of `x_prev`, deterministic = partials instead of atomics. A launch's",
        "target, precision, shape and flags are written on its first config's row. Shapes (M, K, N, R):",
        ", ".join(f"{k} {v}" for k, v in SHAPES.items()) + ".",
        "",
    ]
    for version, (subset, launches) in runs.items():
        builds = sum(len(launch.builds) for launch in launches)
        problems = [p for launch in launches for p in launch.problems()]
        offered = [b for launch in launches for b in launch.builds if b.offered]
        spilling = [b for launch in launches for b in launch.builds if b.offered and b.stack]
        lines += [
            f"## Triton {version}",
            "",
            f"The {'full matrix' if subset == 'full' else 'CI subset'}: {len(launches)} launches, {builds} builds, "
            f"{len(offered)} offered; "
            f"checks: **{'all pass' if not problems else f'{len(problems)} problems'}**. "
            f"Offered builds that spill (float32 only may): {len(spilling)}.",
            "",
        ]
        lines += [f"- {p}" for p in problems[:50]]
        by_kernel: dict[str, list[Launch]] = {}
        for launch in launches:
            by_kernel.setdefault(launch.kernel, []).append(launch)
        for kernel, group in by_kernel.items():
            lines += [
                "",
                f"### {kernel} (Triton {version})",
                "",
                "| target | precision | shape | flags | config | offered | regs | spill | smem KiB | wgmma | TMA |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for launch in group:
                for n, b in enumerate(launch.builds):
                    if b.error:
                        cells = ["build failed: " + b.error.splitlines()[0][:80], "", "", "", "", ""]
                    else:
                        cells = [
                            "yes" if b.offered else "no",
                            str(b.registers),
                            str(b.stack),
                            f"{b.shared / 1024:.0f}",
                            "yes" if b.wgmma else "",
                            "yes" if b.tma else "",
                        ]
                    where = [launch.target, launch.precision, launch.shape, launch.flags or "-"] if n == 0 else [""] * 4
                    row = [*where, b.config, *cells]
                    lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", choices=["full", "ci"], default="full")
    parser.add_argument("--jobs", type=int, default=None, help="build processes (default: min(2, CPUs))")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument(
        "--markdown",
        type=Path,
        help="write the docs table here; --merge adds the JSON results of other Triton versions",
    )
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="JSON results of other Triton versions")
    parser.add_argument(
        "--render-only", action="store_true", help="build nothing: write --markdown from the --merge results"
    )
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    start = time.time()
    launches = [] if args.render_only else run_matrix(args.subset, args.jobs, args.progress)
    elapsed = time.time() - start
    if args.json:
        args.json.write_text(json.dumps(to_json(launches, args.subset, elapsed), indent=1) + "\n")
    if args.markdown:
        runs = {} if args.render_only else {triton.__version__: (args.subset, launches)}
        for path in args.merge:
            data = json.loads(path.read_text())
            runs[data["triton"]] = (data.get("subset", "full"), from_json(data))
        runs = dict(sorted(runs.items(), key=lambda kv: [int(p) for p in re.findall(r"\d+", kv[0])[:3]]))
        command = (
            "python -m tools.compile_matrix --json results-TRITON.json` (once per Triton "
            "version), then `python -m tools.compile_matrix --render-only --merge "
            "results-*.json --markdown docs/compile_matrix.md"
        )
        args.markdown.write_text(to_markdown(runs, command))
    if args.render_only:
        return 0
    problems = [p for launch in launches for p in launch.problems()]
    builds = sum(len(launch.builds) for launch in launches)
    print(f"Triton {triton.__version__}: {len(launches)} launches, {builds} builds in {elapsed:.0f}s")
    for p in problems:
        print("PROBLEM", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
