"""What the launchers plan for, and how they launch: the target GPU, launch capture, the
per-target config pruning every autotuned kernel uses (fits shared memory, does not spill), and
``RESLORA_TUNE`` (``autotune``: Triton's autotuner over the pruned configs; ``pinned``: the first
config that fits, no timing).

Launchers never query the device directly: they ask :func:`target_of` for the compute capability,
the streaming-multiprocessor count and the shared memory a block may use, and they launch through
:func:`launch` with keyword arguments only. Two context managers make the real launchers usable
without a GPU:

* :func:`simulate` plans every launch for a named GPU (e.g. :data:`H100`): the launchers take the
  path and grid they would take there. Under Triton's interpreter this runs the Hopper kernels on
  CPU tensors.
* :func:`capture` records each launch (kernel, grid, keyword arguments) instead of running it, so
  a compile matrix can build exactly what the launchers would launch for a GPU target
  (``python -m tools.compile_matrix``), from ``meta`` tensors on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
from typing import Callable, Iterator

import torch
import triton

#: Whether the kernels were built for Triton's CPU interpreter. Triton reads TRITON_INTERPRET
#: when a kernel is decorated, so this is fixed at import time.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU as the launchers see it: ``capability`` is ``10 * major + minor``."""

    name: str
    capability: int
    sm_count: int
    max_shared: int  # bytes of shared memory one block may use (the opt-in maximum)


#: The two GPUs the compile matrix proves the kernels for (shared memory per block, opt-in).
H100 = Target("H100 SXM", 90, 132, 232448)
A100 = Target("A100", 80, 108, 166912)
#: What launches on CPU tensors (the interpreter) plan for: no tensor-memory accelerator, a
#: small grid, no shared-memory limit (the interpreter has none).
INTERPRETER = Target("interpreter", 0, 2, 1 << 62)

_simulated: contextvars.ContextVar[Target | None] = contextvars.ContextVar("reslora_simulated", default=None)
_captured: contextvars.ContextVar[list | None] = contextvars.ContextVar("reslora_captured", default=None)


@contextlib.contextmanager
def simulate(target: Target) -> Iterator[Target]:
    """Plan every launch in this context for ``target`` instead of the tensors' device."""
    token = _simulated.set(target)
    try:
        yield target
    finally:
        _simulated.reset(token)


@dataclasses.dataclass
class Launch:
    """One captured launch: ``kernel[grid](**kwargs)`` (``kernel`` is the autotuned kernel)."""

    kernel: triton.runtime.Autotuner
    grid: Callable | tuple
    kwargs: dict


@contextlib.contextmanager
def capture() -> Iterator[list[Launch]]:
    """Record the launches made in this context instead of running them."""
    launches: list[Launch] = []
    token = _captured.set(launches)
    try:
        yield launches
    finally:
        _captured.reset(token)


def launch(kernel, grid, **kwargs) -> None:
    """``kernel[grid](**kwargs)``, or recorded when inside :func:`capture`."""
    captured = _captured.get()
    if captured is not None:
        captured.append(Launch(kernel, grid, kwargs))
        return
    kernel[grid](**kwargs)


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    major, minor = torch.cuda.get_device_capability(index)
    return Target(
        torch.cuda.get_device_name(index), 10 * major + minor, props["multiprocessor_count"], props["max_shared_mem"]
    )


def target_of(device: torch.device) -> Target:
    """The GPU the launchers plan for: the simulated one, else ``device``'s (cached per device)."""
    simulated = _simulated.get()
    if simulated is not None:
        return simulated
    if device.type == "cuda":
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER


def uses_tma(target: Target) -> bool:
    """Hopper (sm_90): the GEMMs load through tensor descriptors in a persistent tile loop. Other
    architectures keep the pointer kernels (the compile matrix proves sm_90 and sm_80 only)."""
    return 90 <= target.capability < 100


#: ``RESLORA_TUNE``: how each autotuned kernel picks its config (read at every launch).
TUNE_ENV = "RESLORA_TUNE"
#: ``autotune`` (default): every config that fits is built and timed at a key's first launch, as
#: Triton's autotuner does. ``pinned``: the first config of the table that fits the target without
#: spilling is built and launched, nothing is timed: predictable first calls, short GPU runs.
TUNE_MODES = ("autotune", "pinned")


@functools.lru_cache(maxsize=8)
def _parse_tune(raw: str | None) -> str:
    mode = (raw or "").strip().lower() or "autotune"
    if mode not in TUNE_MODES:
        raise ValueError(f"{TUNE_ENV}={raw!r} is not one of {', '.join(TUNE_MODES)}")
    return mode


def tune_mode() -> str:
    """What ``RESLORA_TUNE`` asks for: ``"autotune"`` (the default) or ``"pinned"``."""
    return _parse_tune(os.environ.get(TUNE_ENV))


#: Compile options a launch may pass beside the kernel's arguments (``ops/dequant_4bit.py`` turns fp
#: fusion off): they change the binary, so the pruner builds with them too.
COMPILE_OPTIONS = ("enable_fp_fusion",)


def _kernel_args(jit_fn, kwargs: dict) -> dict:
    """The kernel's own arguments and compile options among a launch's keywords. Triton's autotuner
    hands its pruner its launch keywords too (``grid``, ``warmup``, ...): passed on to ``warmup``
    they would clash with its own."""
    return {name: value for name, value in kwargs.items() if name in jit_fn.arg_names or name in COMPILE_OPTIONS}


def _build(jit_fn, config, args: dict):
    """The binary ``config`` makes for these arguments: the build a launch with it uses (Triton
    caches it, so the launch does not compile again)."""
    full = {**args, **config.all_kwargs()}
    if config.pre_hook is not None:
        config.pre_hook(full)
    return jit_fn.warmup(grid=(1,), **full)


def _spills(compiled) -> int:
    """Registers the build spills, in 4-byte words, as the driver reports them when it loads the
    binary (loading is what the build's first launch does anyway; no tool is run)."""
    compiled._init_handles()
    return compiled.n_spills


def _no_fit(jit_fn, target: Target, sizes: list[int]) -> RuntimeError:
    return RuntimeError(
        f"no config of {jit_fn.__name__} fits the {target.max_shared} B of shared memory of {target.name} "
        f"(they need {sorted(sizes)} B)"
    )


def _launch_target(args: dict) -> Target:
    return target_of(next(v.device for v in args.values() if isinstance(v, torch.Tensor)))


def usable(jit_fn, configs: list, args: dict) -> list:
    """The configs of ``jit_fn`` worth offering for one launch on the planned target.

    Each config is built for the launch's arguments (the build the autotuner would make and cache
    anyway; keywords that are not the kernel's are ignored). Those whose shared memory exceeds the
    target's are dropped, so a config is never offered where it cannot launch (large float32 tiles
    on an A100, say); of the rest, those whose binary spills registers are dropped too, unless every
    one spills (then the least spilling is kept: slower, still correct). If nothing fits, the error
    names the kernel and the sizes."""
    args = _kernel_args(jit_fn, args)
    target = _launch_target(args)
    fitting, sizes = [], []
    for config in configs:
        compiled = _build(jit_fn, config, args)
        sizes.append(compiled.metadata.shared)
        if compiled.metadata.shared <= target.max_shared:
            fitting.append((_spills(compiled), config))
    if not fitting:
        raise _no_fit(jit_fn, target, sizes)
    least = min(spill for spill, _ in fitting)
    return [config for spill, config in fitting if spill == 0 or spill == least]


def pinned(jit_fn, configs: list, args: dict):
    """The one config ``RESLORA_TUNE=pinned`` launches: the first of the table that fits the
    target without spilling, built in table order and no further (usually one build); if every
    fitting config spills, the least spilling."""
    args = _kernel_args(jit_fn, args)
    target = _launch_target(args)
    fitting, sizes = [], []
    for config in configs:
        compiled = _build(jit_fn, config, args)
        sizes.append(compiled.metadata.shared)
        if compiled.metadata.shared > target.max_shared:
            continue
        spills = _spills(compiled)
        if spills == 0:
            return config
        fitting.append((spills, config))
    if not fitting:
        raise _no_fit(jit_fn, target, sizes)
    return min(fitting, key=lambda item: item[0])[1]


#: Every autotuned kernel of the package, so that tests and tools can make them forget their
#: choices (:func:`forget_tuning`).
_TUNED: list = []


class _Autotuner(triton.runtime.Autotuner):
    """Triton's autotuner with the per-target pruning (:func:`usable`). Under ``RESLORA_TUNE=pinned``
    a launch skips tuning: the key's config comes from :func:`pinned` and the kernel launches with it,
    as Triton's autotuner launches a kernel that has a single config (no timing)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pinned_configs: dict[tuple, triton.Config] = {}

    def run(self, *args, **kwargs):
        if len(self.configs) == 1 or tune_mode() != "pinned":
            return super().run(*args, **kwargs)
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        key = tuple(named[name] for name in self.keys) + tuple(
            str(v.dtype) for name, v in named.items() if name in self.arg_names and hasattr(v, "dtype")
        )
        config = self.pinned_configs.get(key)
        if config is None:
            config = self.pinned_configs[key] = pinned(self.fn, self.configs, named)
        self.best_config = config
        if config.pre_hook is not None:
            config.pre_hook({**named, **config.all_kwargs()})
        return self.fn.run(*args, **kwargs, **config.all_kwargs())


def autotune(configs: list, key: list[str], reset_to_zero=None, restore_value=None):
    """``triton.autotune`` with the configs pruned, per launch, to those that fit the planned target
    without spilling (:func:`usable`), or pinned to one under ``RESLORA_TUNE=pinned``. The
    interpreter gets a single config, so it never prunes or compiles."""

    def decorate(jit_fn):
        def prune(configs, named_args, **launch_kwargs):
            return usable(jit_fn, configs, {**named_args, **launch_kwargs})

        tuned = _Autotuner(
            jit_fn,
            jit_fn.arg_names,
            configs,
            key,
            reset_to_zero,
            restore_value,
            prune_configs_by={"early_config_prune": prune},
        )
        _TUNED.append(tuned)
        return tuned

    return decorate


def forget_tuning() -> None:
    """Every autotuned kernel forgets the configs it chose (for tests and tools that simulate
    another GPU in the same process: Triton's tuning cache is not keyed by device)."""
    for tuned in _TUNED:
        tuned.cache.clear()
        tuned.pinned_configs.clear()
