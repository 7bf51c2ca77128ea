"""Which implementation runs a ResLoRA block, and the report of what was chosen.

The backends (docs/design.md section 6):

* ``auto`` (default): CPU tensors run ``composed``; CUDA tensors run the faster of ``fused`` and
  ``composed`` for their (M bucket, K, N, rank, dtype, flags), timed at the first such call
  (:mod:`reslora_kernels.autotune`). Where the fused kernels cannot run (Triton missing, float64)
  ``auto`` runs ``composed``; where a fused launch fails while it is timed, ``composed`` runs and a
  :class:`~reslora_kernels.autotune.FusedBackendFailure` warning says so once per key;
* ``reference``: the pure-PyTorch formula, the tests' oracle;
* ``composed``: the vendor GEMMs in one autograd Function (``reslora_kernels.composed``);
* ``fused``: the Triton kernels (``reslora_kernels.fused``); never falls back, raises where they
  cannot run.

Selection, and what it means for threads:

* the process-wide default is read once, from ``RESLORA_BACKEND``, when the package is imported
  (unset or empty: ``auto``; a value that names no backend makes every block call raise until
  :func:`set_backend` replaces it);
* :func:`set_backend` replaces the process-wide default: every thread sees it from its next call;
* :func:`use_backend` overrides it for the body of a ``with`` block in the current context only:
  the thread (or asyncio task) running the block. Blocks nest; other threads keep the default, and
  so does a thread started inside a block (Python starts threads with an empty context);
* under ``torch.compile`` a graph is specialised on the backend in force when it is traced, and
  guarded: :func:`set_backend` recompiles it, and so does the first :func:`use_backend` block in the
  process, after which compiled code reads the override with a graph break (Dynamo cannot trace a
  context variable) until no block is active.

:func:`backend_report` says what runs and why.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading
from typing import Callable, Iterator

import torch

from . import reference
from .autotune import AutoTuner, key_text
from .composed import composed_reslora_linear
from .dtypes import KERNEL_DTYPES

__all__ = [
    "BACKEND_ENV",
    "BACKENDS",
    "set_backend",
    "use_backend",
    "requested_backend",
    "resolve_backend",
    "fused_unavailable",
    "select",
    "backend_choices",
    "backend_report",
]

BACKEND_ENV = "RESLORA_BACKEND"
BACKENDS = ("auto", "reference", "composed", "fused")
# Names of the backends before 0.1, for the error that names their successors.
_RENAMED = {"torch": "reference", "triton": "fused"}
#: Device types on which ``auto`` times fused against composed (tests add "cpu" to drive the
#: choice through Triton's interpreter).
TIMED_DEVICE_TYPES = ("cuda",)

Impl = Callable[..., tuple]


# ---------------------------------------------------------------------------- the selection
def _canonical(raw: object, where: str) -> str:
    """``raw`` as one of :data:`BACKENDS` (case and surrounding spaces ignored), else a clear error."""
    if not isinstance(raw, str):
        raise TypeError(f"{where} needs a backend name, one of {', '.join(BACKENDS)}; got {type(raw).__name__}")
    choice = raw.strip().lower()
    if choice in BACKENDS:
        return choice
    message = f"{where}={raw!r} is not one of {', '.join(BACKENDS)}"
    if choice in _RENAMED:
        message += f" ({choice!r} is called {_RENAMED[choice]!r} now)"
    raise ValueError(message)


def _environment_default(raw: str | None) -> str | ValueError:
    """The default ``RESLORA_BACKEND=raw`` asks for, or the error every call will raise."""
    try:
        return _canonical((raw or "").strip() or "auto", BACKEND_ENV)
    except ValueError as err:
        return err


# Read once: later changes to the environment change nothing (set_backend does).
_ENVIRONMENT = os.environ.get(BACKEND_ENV)
_FROM_ENVIRONMENT = _environment_default(_ENVIRONMENT)
_ENVIRONMENT_SOURCE = f"{BACKEND_ENV}={_ENVIRONMENT or ''!r} when reslora_kernels was imported"
#: The process-wide default (or why the environment's value is none) and where it came from.
_DEFAULT: str | ValueError = _FROM_ENVIRONMENT
_DEFAULT_SOURCE = _ENVIRONMENT_SOURCE
# The context-local override of use_backend(), and whether any is active in the process: plain
# globals are what torch.compile can guard on, a context variable it cannot read.
_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("reslora_backend", default=None)
_OVERRIDDEN = False
_ACTIVE_OVERRIDES = 0
_LOCK = threading.Lock()


def set_backend(name: str | None) -> None:
    """Make ``name`` (``auto``, ``reference``, ``composed`` or ``fused``) the process-wide default,
    for every thread from its next call; ``None`` restores what ``RESLORA_BACKEND`` said at import.
    A :func:`use_backend` block still wins in its own context."""
    global _DEFAULT, _DEFAULT_SOURCE
    if name is None:
        _DEFAULT, _DEFAULT_SOURCE = _FROM_ENVIRONMENT, _ENVIRONMENT_SOURCE
        return
    _DEFAULT, _DEFAULT_SOURCE = _canonical(name, "set_backend"), f"set_backend({name!r})"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the body of the ``with`` block on backend ``name`` in this thread (or asyncio task)
    only; the previous choice comes back on exit, also on an exception. Yields the canonical name."""
    global _OVERRIDDEN, _ACTIVE_OVERRIDES
    choice = _canonical(name, "use_backend")
    with _LOCK:
        _ACTIVE_OVERRIDES += 1
        _OVERRIDDEN = True
    token = _OVERRIDE.set(choice)
    try:
        yield choice
    finally:
        _OVERRIDE.reset(token)
        with _LOCK:
            _ACTIVE_OVERRIDES -= 1
            _OVERRIDDEN = _ACTIVE_OVERRIDES > 0


def requested_backend() -> str:
    """The backend asked for here and now: this context's :func:`use_backend`, else the
    process-wide default. Raises when that default is a ``RESLORA_BACKEND`` naming no backend."""
    if _OVERRIDDEN:
        name = _OVERRIDE.get()
        if name is not None:
            return name
    default = _DEFAULT
    if isinstance(default, str):
        return default
    raise ValueError(str(default))


@functools.lru_cache(maxsize=None)
def fused_import_error() -> Exception | None:
    """Why ``reslora_kernels.fused`` cannot be imported (``None`` when it can); checked once."""
    try:
        from . import fused  # noqa: F401  (imports triton and the kernels)
    except ImportError as err:
        return err
    return None


def fused_unavailable(x: torch.Tensor) -> tuple[type[Exception], str] | None:
    """``(error type, reason)`` when the fused kernels cannot run on tensors like ``x``, else
    ``None``. The reason reads after "the fused backend"."""
    err = fused_import_error.__wrapped__() if torch.compiler.is_compiling() else fused_import_error()
    if err is not None:
        return RuntimeError, f"cannot run: the Triton kernels cannot be imported ({err})"
    if x.dtype not in KERNEL_DTYPES:
        return TypeError, f"supports float16, bfloat16 and float32 inputs, got {x.dtype}"
    if x.is_cuda:
        return None
    device_type = x.device.type
    if device_type == "cpu":
        from .ops import _target

        if _target.INTERPRETED:
            return None
        return RuntimeError, (
            "on CPU tensors runs Triton's interpreter: set TRITON_INTERPRET=1 before importing reslora_kernels "
            "(or use a CUDA device, or the composed backend)"
        )
    return RuntimeError, f"cannot run on {device_type} tensors"


def resolve_backend(x: torch.Tensor) -> str:
    """What runs for input ``x``: ``"reference"``, ``"composed"``, ``"fused"``, or ``"auto"``
    where the choice is made per shape at first use (CUDA, see :func:`backend_report`). An explicit
    ``fused`` raises here when the kernels cannot run on ``x``."""
    choice = requested_backend()
    if choice == "fused":
        problem = fused_unavailable(x)
        if problem is not None:
            kind, reason = problem
            raise kind(f"the fused backend {reason}")
        return "fused"
    if choice != "auto":
        return choice
    # No timing while tracing (the tensors are fake): torch.compile gets the composed op, whose
    # torch ops Inductor fuses and tunes itself.
    if x.device.type not in TIMED_DEVICE_TYPES or torch.compiler.is_compiling() or fused_unavailable(x) is not None:
        return "composed"
    return "auto"


_FUSED_OP: Impl | None = None


def _fused_impl() -> Impl:
    # Imported on first use (it imports Triton), then kept: an import statement costs ~1 us a call.
    global _FUSED_OP
    if _FUSED_OP is None:
        from .fused import fused_reslora_linear

        _FUSED_OP = fused_reslora_linear
    return _FUSED_OP


def implementation(name: str) -> Impl:
    """The op of backend ``name`` (``reference``, ``composed`` or ``fused``)."""
    if name == "composed":
        return composed_reslora_linear
    if name == "fused":
        return _fused_impl()
    if name == "reference":
        return reference.reslora_linear
    raise ValueError(f"no implementation named {name!r}")


def select(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    *,
    x_prev: torch.Tensor | None = None,
    z_prev: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    compute_x_sqnorm: bool = False,
    resolved: str | None = None,
) -> Impl:
    """The op (signature of :func:`reslora_kernels.reference.reslora_linear`) to run these inputs
    with: ``resolved`` (what :func:`resolve_backend` said for ``x``; resolved now when ``None``),
    where ``auto`` on CUDA may time both candidates first (once per key)."""
    name = resolve_backend(x) if resolved is None else resolved
    if name == "auto":
        name = TUNER.choose(
            implementation,
            x,
            weight,
            bias,
            lora_A,
            lora_B,
            x_prev=x_prev,
            z_prev=z_prev,
            dropout_p=dropout_p,
            compute_x_sqnorm=compute_x_sqnorm,
        )
    return implementation(name)


#: The process-wide tuner of ``auto``.
TUNER = AutoTuner()


# ---------------------------------------------------------------------------- the report
def backend_choices() -> list[dict]:
    """Every per-shape decision ``auto`` has made in this process (or loaded from its disk
    cache): key fields, the winner, each candidate's median ms and failures."""
    return [choice.as_dict() for choice in TUNER.choices.values()]


def backend_report() -> str:
    """What runs where, why (the environment, :func:`set_backend` or :func:`use_backend`), and
    every timed choice of ``auto``."""
    choice = requested_backend()
    overridden = _OVERRIDDEN and _OVERRIDE.get() is not None
    source = f"use_backend({choice!r}) in this context" if overridden else _DEFAULT_SOURCE
    lines = [f"backend: {choice} (from {source})"]
    err = fused_import_error()
    fused_state = "available" if err is None else f"unavailable ({err})"
    if choice == "auto":
        lines.append("CPU tensors: composed (vendor GEMMs: oneDNN/MKL)")
        lines.append(
            "CUDA tensors: the faster of fused and composed per (M bucket, K, N, rank, dtype, flags), timed at "
            f"first use; composed where the fused kernels cannot run. Triton kernels: {fused_state}"
        )
    else:
        lines.append(f"every tensor: {choice}" + (f" (Triton kernels: {fused_state})" if choice == "fused" else ""))
    path = TUNER.cache_file()
    if path is not None:
        lines.append(f"disk cache: {path}")
    failed = [c for c in TUNER.choices.values() if "fused" in c.failures]
    if failed:
        lines.append(f"FusedBackendFailure: the fused kernels failed for {len(failed)} key(s); composed runs there")
    for c in TUNER.choices.values():
        times = ", ".join(f"{n} {'-' if ms is None else f'{ms:.3f} ms'}" for n, ms in c.timings_ms.items())
        line = f"  {key_text(c.key)}: {times} -> {c.backend}"
        if c.source != "timed":
            line += f" ({c.source})"
        lines.append(line)
        for name, reason in c.failures.items():
            lines.append(f"    {name} could not run: {reason}")
    return "\n".join(lines)
