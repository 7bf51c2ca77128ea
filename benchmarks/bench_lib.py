"""Shared machinery of the benchmark suites: the variants, the interleaved timer, the memory
measurements, the results file.

Every number in a results file is measured by these functions in the run that wrote it; ratios
are computed only between numbers of the same run (benchmarks/report.py). Variants of one group
are timed round by round, interleaved (round r runs every variant once, starting at a different
one each round), so a change in machine load shifts every variant alike instead of one.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from bench_env import ROOT, environment  # noqa: F401  (environment: part of this module's API)

import reslora_kernels
from reslora_kernels import FusedResLoRALinear, functional, reference

IS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if IS_CUDA else "cpu"
MODES = ("none", "is", "bs", "ms")
#: The LoRA dropout of the "with dropout" variants (PEFT's and ours).
DROPOUT = 0.1
#: Short dtype names for test ids and ``-k`` selection (``-k bf16``).
DTYPE_IDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}

try:
    import peft
except ImportError:  # optional: the PEFT baselines are skipped with a reason
    peft = None


def env_flag(name: str) -> bool:
    """A yes/no environment setting: unset or ``0``/``false``/``no``/``off`` is no, ``1``/``true``/
    ``yes``/``on`` is yes; anything else is an error naming it (a typo must not silently pick one)."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name}={os.environ[name]!r}: expected 1/true/yes/on or 0/false/no/off")


#: Whether the suites run their full sweep. A GPU always does. On CPU ``RESLORA_BENCH_FULL=1`` asks
#: for it (the sizes and round counts of the committed CPU results); by default a CPU run is the
#: reduced sweep: every suite, variant, mode and shape kind, at smaller sizes and fewer rounds, so
#: that ``pytest benchmarks/`` stays within two minutes on a loaded two-core machine
#: (benchmarks/README.md).
FULL = IS_CUDA or env_flag("RESLORA_BENCH_FULL")


# ---------------------------------------------------------------------------- timing
def synchronize() -> None:
    if IS_CUDA:
        torch.cuda.synchronize()


class CallTimer:
    """Times one call in ms. CPU: the wall clock around the call. CUDA: CUDA events around the
    call, after zeroing a 256 MB buffer (as ``triton.testing.do_bench`` does) so that inputs
    are not served from L2; the flush is outside the events."""

    def __init__(self) -> None:
        self._flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda") if IS_CUDA else None

    #: CPU time of the calling thread during the last CPU call (ms): with one torch thread, the
    #: work of the call without the time other processes held the core (a load-robust cross-check).
    last_cpu_ms: float | None = None

    def __call__(self, fn: Callable[[], object]) -> float:
        if not IS_CUDA:
            start, cpu_start = time.perf_counter(), time.thread_time()
            fn()
            self.last_cpu_ms = (time.thread_time() - cpu_start) * 1e3
            return (time.perf_counter() - start) * 1e3
        self._flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def quantile_stats(times_ms: list[float]) -> dict:
    """Median and the 10% / 90% quantiles of one variant's per-round times."""
    deciles = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else times_ms * 9
    return {
        "median_ms": statistics.median(times_ms),
        "q10_ms": deciles[0],
        "q90_ms": deciles[-1],
        "rounds": len(times_ms),
    }


class Interleaved:
    """Rounds over named cases: ``round()`` runs every case's ``prepare()`` (untimed) and
    ``step()`` (timed) once, in an order rotated by one each round."""

    def __init__(self, cases: dict, timer: CallTimer | None = None) -> None:
        self.cases = cases
        self.names = list(cases)
        self.timer = timer or CallTimer()
        self.times: dict = {name: [] for name in self.names}
        self.cpu_times: dict = {name: [] for name in self.names}
        self._count = 0

    def round(self, record: bool = True) -> None:
        k = self._count % len(self.names)
        self._count += 1
        for name in self.names[k:] + self.names[:k]:
            case = self.cases[name]
            case.prepare()
            ms = self.timer(case.step)
            if record:
                self.times[name].append(ms)
                cpu_ms = getattr(self.timer, "last_cpu_ms", None)
                if cpu_ms is not None:
                    self.cpu_times[name].append(cpu_ms)

    def warm_up(self, rounds: int) -> None:
        for _ in range(rounds):
            self.round(record=False)
        synchronize()

    def stats(self) -> dict:
        """Per case: wall-clock median and quantiles, and (CPU, one torch thread) the same of the
        thread's CPU time as ``cpu_median_ms`` etc."""
        out = {}
        for name, times in self.times.items():
            out[name] = quantile_stats(times)
            if self.cpu_times[name] and torch.get_num_threads() == 1:
                cpu = quantile_stats(self.cpu_times[name])
                out[name].update({f"cpu_{k}": v for k, v in cpu.items() if k != "rounds"})
        return out


class PlainBenchmark:
    """What the suites use of pytest-benchmark's ``benchmark`` fixture, for runs without the plugin:
    ``pedantic`` runs the rounds; the per-variant times are the runner's either way."""

    def __init__(self) -> None:
        self.group = None
        self.extra_info: dict = {}

    def pedantic(self, target, rounds: int = 1, warmup_rounds: int = 0, iterations: int = 1, **_):
        for _ in range(warmup_rounds):
            target()
        for _ in range(rounds * iterations):
            target()


def run_rounds(benchmark, runner: Interleaved, rounds: int) -> None:
    """``rounds`` recorded rounds, through pytest-benchmark when it is there (it then reports the
    time of whole rounds; the per-variant times are the runner's)."""
    if benchmark is None:
        for _ in range(rounds):
            runner.round()
        return
    benchmark.pedantic(runner.round, rounds=rounds, warmup_rounds=0, iterations=1)


# ---------------------------------------------------------------------------- memory
def _storage_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    return (t.device.type, t.device.index, storage.data_ptr(), storage.nbytes())


def saved_bytes(forward: Callable[[], object], alive: list[torch.Tensor]) -> int:
    """Bytes one forward keeps for backward: the distinct storages of the tensors autograd
    saves (``saved_tensors_hooks``), each counted once, without those of tensors that are alive
    anyway (``alive``: the parameters and the call's inputs)."""
    alive_keys = {_storage_key(t) for t in alive if t is not None}
    storages: dict[tuple, int] = {}

    def pack(t):
        key = _storage_key(t)
        if key not in alive_keys:
            storages[key] = key[3]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())


def cpu_peak_bytes(fn: Callable[[], object]) -> int | None:
    """Extra host memory one call of ``fn`` allocates at its peak: the running sum of the CPU
    allocator's allocation and free events recorded by ``torch.profiler`` (``None`` where the
    profiler cannot record them)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = prof.profiler.kineto_results.events()
    except (ImportError, AttributeError, RuntimeError):
        return None
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    level = peak = 0
    for event in memory:
        if str(event.device_type()).endswith("CPU"):
            level += event.nbytes()
            peak = max(peak, level)
    return peak


def gpu_peak_bytes(fn: Callable[[], object]) -> int | None:
    """Extra device memory one call of ``fn`` allocates at its peak (CUDA only)."""
    if not IS_CUDA:
        return None
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    synchronize()
    return torch.cuda.max_memory_allocated() - before


def peak_bytes(fn: Callable[[], object]) -> int | None:
    return gpu_peak_bytes(fn) if IS_CUDA else cpu_peak_bytes(fn)


# ---------------------------------------------------------------------------- results
class Results:
    """Rows of one benchmark run; written as JSON at the end of the pytest run."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.load_start = os.getloadavg()

    def add(self, suite: str, group: str, variant: str, **fields) -> None:
        self.rows.append({"suite": suite, "group": group, "variant": variant, **fields})

    def document(self) -> dict:
        """The results file's content: ``environment``, ``rows`` and the target ``ratios``."""
        from report import compute_ratios

        env = environment()
        # Load averages (1, 5, 15 min) at the start and end: how busy the machine was.
        env["load_average"] = {"start": list(self.load_start), "end": list(os.getloadavg())}
        env["backend_report"] = reslora_kernels.backend_report()
        return {"environment": env, "rows": self.rows, "ratios": compute_ratios(self.rows, env["device"])}

    def write(self, out_dir: Path) -> Path:
        """One new file per run, never an existing one: ``<device>-<UTC time>[-n].json``."""
        data = self.document()
        env = data["environment"]
        out_dir.mkdir(parents=True, exist_ok=True)
        slug = env["device"].replace(" ", "_").replace("/", "_")
        stamp = env["date"][:19].replace(":", "")
        text = json.dumps(data, indent=2) + "\n"
        for n in range(1000):
            path = out_dir / (f"{slug}-{stamp}.json" if n == 0 else f"{slug}-{stamp}-{n}.json")
            try:
                with open(path, "x") as f:  # "x": fails instead of overwriting
                    f.write(text)
                return path
            except FileExistsError:
                continue
        raise RuntimeError(f"no free results file name in {out_dir}")


# ---------------------------------------------------------------------------- layer variants
class _Wrap(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


#: The backend of each ResLoRA variant ("auto" is what a user gets by default).
BACKEND_OF = {"reference": "reference", "composed": "composed", "fused": "fused", "auto": "auto"}


def layer_variants(device: str = DEVICE) -> list[tuple[str, str, float]]:
    """``(variant, mode, dropout)`` of the layer suite on ``device``, the floor first. CPU:
    the composed path (what auto runs there), the reference and PEFT; the fused kernels (the
    interpreter is no speed) and torch.compile (compile time) are GPU only, and PEFT's
    model-dtype adapter equals its float32 one in a float32 model."""
    out = [("frozen", "-", 0.0), ("peft_fp32", "none", 0.0), ("peft_fp32", "none", DROPOUT)]
    impls = ["reference", "composed"]
    if device == "cuda":
        out.append(("peft_model_dtype", "none", 0.0))
        impls += ["compiled", "fused", "auto"]
    for impl in impls:
        out += [(impl, mode, 0.0) for mode in MODES]
    ours = "auto" if device == "cuda" else "composed"
    out += [(ours, mode, DROPOUT) for mode in MODES]
    return out


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    """``RESLORA_BENCH_LAYER_SHAPES``: ``"8192x4096x4096r16,64x32x48r4"`` (M x K x N r rank) ->
    ``[(8192, 4096, 4096, 16), (64, 32, 48, 4)]``."""
    shapes = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)r(\d+)\s*", item)
        if match is None:
            raise ValueError(f"RESLORA_BENCH_LAYER_SHAPES: {item!r} is not MxKxNrR (e.g. 8192x4096x4096r16)")
        shapes.append(tuple(int(g) for g in match.groups()))
    return shapes


def selected_variants(variants: list, names: str | None) -> list:
    """The ``(variant, mode, dropout)`` entries whose variant is named in the comma-separated
    ``names`` (``RESLORA_BENCH_VARIANTS``); all of them when ``names`` is empty."""
    if not names:
        return list(variants)
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    known = {v for device in ("cuda", "cpu") for v, _, _ in layer_variants(device)}
    if wanted - known:
        raise ValueError(f"RESLORA_BENCH_VARIANTS: unknown variant(s) {sorted(wanted - known)}; known: {sorted(known)}")
    return [v for v in variants if v[0] in wanted]


def case_name(variant: str, mode: str, dropout: float) -> str:
    return f"{variant}/{mode}" + (f"/p={dropout:g}" if dropout else "")


#: Graphs the compiled variant may keep at once: the GPU layer suite needs 4 shapes x 4 modes x
#: 2 phases (grad and no_grad guard differently) = 32.
COMPILED_GRAPHS = 64


def compiled_reference(backend="inductor"):
    """``reference.reslora_linear`` under ``torch.compile(dynamic=False)``. Every compiled case
    compiles that one function, and dynamo keeps one graph cache per code object: past
    ``recompile_limit`` (8 by default, one shape's worth) it would run every further case
    eagerly, with only a warning. The limit is raised to hold every case's graph, and hitting it
    is made an error, so a "compiled" time is always a compiled one."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, COMPILED_GRAPHS)
    config.fail_on_recompile_limit_hit = True
    return torch.compile(reference.reslora_linear, dynamic=False, backend=backend)


@dataclass
class LayerCase:
    """One benchmark case: ``step()`` is what is timed (one forward, plus a backward with a
    fixed ``grad_out`` when ``backward``); ``prepare()`` runs untimed before it (clears the
    gradients, sets the backend); ``forward``, ``leaves`` and ``alive`` serve the checks
    and the saved-bytes count."""

    step: Callable[[], object]
    prepare: Callable[[], None]
    forward: Callable[[], torch.Tensor]
    leaves: list[torch.Tensor]
    grad_out: torch.Tensor
    alive: list[torch.Tensor] = field(default_factory=list)


def layer_case(
    variant: str,
    mode: str,
    M: int,
    K: int,
    N: int,
    rank: int,
    dtype,
    backward: bool,
    dropout: float = 0.0,
    device: str = DEVICE,
    compile_backend="inductor",
) -> LayerCase:
    """One layer's forward (+ backward) as a :class:`LayerCase`; ``backward=False`` runs under
    no_grad. ResLoRA blocks run as block 1 of a chain: mode ``none`` through the layer module,
    the others through ``functional.reslora_linear`` with the shortcut inputs block 0 would hand
    over (``x_prev``, ``z_prev``, block 0's adapter concatenated for bs), which is exactly one
    block's compute. The inputs and weights are drawn in the same order for every ResLoRA
    variant, so under one seed they hold the same values. ``compile_backend`` is the
    ``torch.compile`` backend of the ``compiled`` variant."""
    factory = {"device": device, "dtype": dtype}
    x = torch.randn(M, K, **factory, requires_grad=backward)
    grad_out = torch.randn(M, N, **factory)

    def make(forward, leaves, alive, backend=None):
        def prepare():
            for t in leaves:
                t.grad = None
            if backend is not None:
                reslora_kernels.set_backend(backend)

        if backward:

            def step():
                forward().backward(grad_out)

        else:

            def step():
                with torch.no_grad():
                    return forward()

        return LayerCase(step, prepare, forward, leaves, grad_out, alive)

    if variant == "frozen":
        linear = nn.Linear(K, N, **factory).requires_grad_(False)
        return make(lambda: linear(x), [x], [x, *linear.parameters()])

    if variant.startswith("peft"):
        if peft is None:
            raise RuntimeError("peft is not installed")
        model = _Wrap(nn.Linear(K, N, **factory))
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"], lora_dropout=dropout)
        # PEFT's default upcasts the adapter to float32, so the LoRA branch runs in float32.
        model = peft.get_peft_model(model, config, autocast_adapter_dtype=(variant == "peft_fp32"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
        model.train()
        leaves = [x] + [p for p in model.parameters() if p.requires_grad]
        return make(lambda: model(x), leaves, [x, *model.parameters()])

    blocks = [
        FusedResLoRALinear(K, N, **factory, rank=rank, alpha=2 * rank, mode=mode, pre_num=1, dropout=dropout)
        for _ in range(2)
    ]
    with torch.no_grad():
        for b in blocks:
            b.lora_B.normal_(0.0, 0.02)
    block = blocks[1].train()
    x_prev = torch.randn(M, K, **factory, requires_grad=backward) if mode == "is" else None
    z_prev = torch.randn(M, rank, **factory, requires_grad=backward) if mode == "ms" else None
    leaves = [x] + [t for t in (x_prev, z_prev) if t is not None]
    leaves += [p for b in blocks for p in (b.lora_A, b.lora_B)]
    alive = leaves + [p for b in blocks for p in b.parameters()]

    def adapter():
        if mode != "bs":
            return block.lora_A, block.lora_B
        # What the chain hands block 1 of a bs chain: its adapter and block 0's, concatenated.
        return torch.cat([block.lora_A, blocks[0].lora_A]), torch.cat([block.lora_B, blocks[0].lora_B], dim=1)

    if variant in BACKEND_OF:
        if mode == "none":
            return make(lambda: block(x), leaves, alive, BACKEND_OF[variant])

        def forward():
            lora_A, lora_B = adapter()
            y, _, _ = functional.reslora_linear(
                x,
                block.weight,
                block.bias,
                lora_A,
                lora_B,
                block.scaling,
                x_prev=x_prev,
                z_prev=z_prev,
                dropout_p=dropout,
            )
            return y

        return make(forward, leaves, alive, BACKEND_OF[variant])

    if variant == "compiled":
        if dropout:
            raise ValueError("the compiled variant runs without dropout")
        compiled = compiled_reference(compile_backend)

        def forward():
            lora_A, lora_B = adapter()
            y, _, _ = compiled(x, block.weight, block.bias, lora_A, lora_B, block.scaling, x_prev=x_prev, z_prev=z_prev)
            return y

        return make(forward, leaves, alive)
    raise ValueError(f"unknown variant {variant!r}")


class TrainingStep:
    """One optimizer step of one variant of a causal LM (labels = inputs): ``prepare`` (untimed) sets
    the backend; ``loss`` is the forward alone (for the bytes saved for backward)."""

    def __init__(self, model, backend, ids):
        self.model, self.backend, self.ids = model, backend, ids
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
        self.alive = list(model.parameters()) + list(model.buffers())

    def prepare(self):
        reslora_kernels.set_backend(self.backend)

    def loss(self):
        return self.model(input_ids=self.ids, labels=self.ids).loss

    def step(self):
        self.loss().backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
