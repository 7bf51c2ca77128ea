"""What the launchers plan for, and how they launch: the target GPU, launch capture, and the
per-target config pruning every autotuned kernel uses (fits shared memory, does not spill).

Launchers never query the device directly: they ask :func:`target_of` for the compute capability,
the streaming-multiprocessor count and the shared memory a block may use, and they launch through
:func:`launch` with keyword arguments only. Two context managers make the real launchers usable
without a GPU:

* :func:`simulate` plans every launch for a named GPU (e.g. :data:`H100`): the launchers take the
  path and grid they would take there. Under Triton's interpreter this runs the Hopper kernels on
  CPU tensors.
* :func:`capture` records each launch (kernel, grid, keyword arguments) instead of running it, so
  a compile matrix can build exactly what the launchers would launch for a GPU target
  (``reslora_kernels.ops.compile_matrix``), from ``meta`` tensors on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
import re
import subprocess
import tempfile
from pathlib import Path
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


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """``(registers, stack bytes)`` per thread of a cubin, read by the ``cuobjdump`` that ships with
    Triton's NVIDIA backend. The kernels keep no local arrays, so stack bytes are register spills."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {out[:300]}")
    return int(match.group(1)), int(match.group(2))


def _spills(compiled) -> int:
    try:
        return resource_usage(compiled.asm["cubin"])[1]
    except (OSError, subprocess.CalledProcessError, RuntimeError, KeyError):
        return 0  # no cuobjdump here: spills unknown, the shared-memory check still holds


def usable(kernel, configs: list, args: dict) -> list:
    """The configs of ``kernel`` worth offering for one launch on the planned target.

    Each config is compiled for the launch's arguments (the build the autotuner would make and
    cache anyway). Those whose shared memory exceeds the target's are dropped, so a config is never
    offered where it cannot launch (large float32 tiles on an A100, say); of the rest, those whose
    binary spills registers are dropped too, unless every one spills (then the least spilling is
    kept: slower, still correct). If nothing fits, the error names the kernel and the sizes."""
    device = next(v.device for v in args.values() if isinstance(v, torch.Tensor))
    target = target_of(device)
    fitting, sizes = [], []
    for config in configs:
        full = {**args, **config.all_kwargs()}
        if config.pre_hook is not None:
            config.pre_hook(full)
        compiled = kernel.warmup(grid=(1,), **full)
        sizes.append(compiled.metadata.shared)
        if compiled.metadata.shared <= target.max_shared:
            fitting.append((_spills(compiled), config))
    if not fitting:
        raise RuntimeError(
            f"no config of {kernel.fn.__name__} fits the {target.max_shared} B of shared memory of {target.name} "
            f"(they need {sorted(sizes)} B)"
        )
    least = min(spill for spill, _ in fitting)
    return [config for spill, config in fitting if spill == 0 or spill == least]


def autotune(configs: list, key: list[str], **kwargs):
    """``triton.autotune`` with the configs pruned, per launch, to those that fit the planned target
    without spilling (:func:`usable`). The interpreter gets a single config, so it never prunes
    or compiles."""

    def decorate(jit_fn):
        def prune(configs, named_args, **launch_kwargs):
            return usable(jit_fn, configs, {**named_args, **launch_kwargs})

        return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, **kwargs)(
            jit_fn
        )

    return decorate
