"""Which implementation runs a ResLoRA block: ``RESLORA_BACKEND``, the per-shape timing cache of
``auto``, and the report of what was chosen.

``RESLORA_BACKEND`` (read at every call; parsing is cached per value):

* ``auto`` (default): CPU tensors run ``composed``; CUDA tensors run the faster of ``fused`` and
  ``composed`` for their (M bucket, K, N, rank, dtype, flags), timed on the call's own inputs
  the first time such a call is seen, as Triton's autotuner does. Where the fused kernels
  cannot run (Triton missing, float64) ``auto`` runs ``composed``; where a fused launch fails
  while it is timed (a kernel that cannot be built or launched), ``auto`` runs ``composed`` and
  says so once per key with a :class:`FusedBackendFailure` warning;
* ``reference`` (alias ``torch``): the pure-PyTorch formula, the tests' oracle;
* ``composed``: the vendor GEMMs in one autograd Function (``reslora_kernels.composed``);
* ``fused`` (alias ``triton``): the Triton kernels; never falls back, raises where they cannot run.

``RESLORA_AUTOTUNE_CACHE=<file.json>`` keeps ``auto``'s choices on disk between processes (per
device name and torch/triton versions). :func:`backend_report` says what runs and why.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import reference
from .composed import composed_reslora_linear
from .dtypes import KERNEL_DTYPES

__all__ = [
    "BACKEND_ENV",
    "CACHE_ENV",
    "BACKENDS",
    "ALIASES",
    "AutoTuner",
    "Choice",
    "FusedBackendFailure",
    "TUNER",
    "requested_backend",
    "fused_unavailable",
    "resolve_backend",
    "select",
    "backend_choices",
    "backend_report",
]

BACKEND_ENV = "RESLORA_BACKEND"
CACHE_ENV = "RESLORA_AUTOTUNE_CACHE"
BACKENDS = ("auto", "reference", "composed", "fused")
#: The names of earlier versions, still accepted.
ALIASES = {"torch": "reference", "triton": "fused"}
#: Device types on which ``auto`` times fused against composed (tests add "cpu" to drive the
#: choice through Triton's interpreter).
TIMED_DEVICE_TYPES = ("cuda",)

Impl = Callable[..., tuple]


class FusedBackendFailure(UserWarning):
    """The fused kernels failed where ``auto`` timed them, so ``composed`` runs for that shape.
    Issued once per shape key, with the shape and the exception; :func:`backend_report` lists it.
    Make it an error to stop at the first one: ``warnings.simplefilter("error", FusedBackendFailure)``."""


# ---------------------------------------------------------------------------- the switch
@functools.lru_cache(maxsize=16)
def _parse(raw: str | None) -> str:
    choice = (raw or "").strip().lower() or "auto"
    choice = ALIASES.get(choice, choice)
    if choice not in BACKENDS:
        names = ", ".join(BACKENDS)
        old = ", ".join(f"{k} = {v}" for k, v in ALIASES.items())
        raise ValueError(f"{BACKEND_ENV}={raw!r} is not one of {names} (or the old names {old})")
    return choice


def requested_backend() -> str:
    """The canonical name of what ``RESLORA_BACKEND`` asks for (``auto`` when unset)."""
    if torch.compiler.is_compiling():
        # Dynamo traces through lru_cache wrappers (with a warning): call the function itself.
        return _parse.__wrapped__(os.environ.get(BACKEND_ENV))
    return _parse(os.environ.get(BACKEND_ENV))


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
    if x.device.type == "cuda":
        return None
    if x.device.type == "cpu":
        from .ops import INTERPRETED

        if INTERPRETED:
            return None
        return RuntimeError, (
            "on CPU tensors runs Triton's interpreter: set TRITON_INTERPRET=1 before importing reslora_kernels "
            "(or use a CUDA device, or RESLORA_BACKEND=composed)"
        )
    return RuntimeError, f"cannot run on {x.device.type} tensors"


def resolve_backend(x: torch.Tensor) -> str:
    """What runs for input ``x``: ``"reference"``, ``"composed"``, ``"fused"``, or ``"auto"``
    where the choice is made per shape at first use (CUDA, see :func:`backend_report`).
    ``RESLORA_BACKEND=fused`` raises here when the kernels cannot run on ``x``."""
    choice = requested_backend()
    if choice == "fused":
        problem = fused_unavailable(x)
        if problem is not None:
            kind, reason = problem
            raise kind(f"{BACKEND_ENV}=fused {reason}")
        return "fused"
    if choice != "auto":
        return choice
    if x.device.type not in TIMED_DEVICE_TYPES or fused_unavailable(x) is not None:
        return "composed"
    return "auto"


def _fused_impl() -> Impl:
    from .fused import fused_reslora_linear

    return fused_reslora_linear


def implementation(name: str) -> Impl:
    """The op of backend ``name`` (``reference``, ``composed`` or ``fused``)."""
    if name == "composed":
        return composed_reslora_linear
    if name == "reference":
        return reference.reslora_linear
    if name == "fused":
        return _fused_impl()
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
) -> Impl:
    """The op (signature of :func:`reslora_kernels.reference.reslora_linear`) to run these
    inputs with; under ``auto`` on CUDA this may time both candidates first (once per key)."""
    name = resolve_backend(x)
    if name == "auto" and torch.compiler.is_compiling():
        # No timing while tracing (the tensors are fake): torch.compile gets the composed op,
        # whose torch ops Inductor fuses and tunes itself.
        name = "composed"
    if name == "auto":
        name = TUNER.choose(
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


# ---------------------------------------------------------------------------- auto on CUDA
def m_bucket(rows: int) -> int:
    """Rows rounded up to a power of two: one timing serves a range of batch sizes."""
    return 1 if rows <= 1 else 1 << (rows - 1).bit_length()


def tuning_key(
    x, weight, bias, lora_A, *, x_prev=None, z_prev=None, dropout_p=0.0, compute_x_sqnorm=False, grad=True
) -> tuple:
    """What a timing is valid for: device, M bucket, K, N, rank, dtype and the flags that change
    the work (bias, input shortcut, z shortcut, dropout, norm statistics, backward)."""
    rows = x.numel() // max(x.shape[-1], 1)
    shortcut = "none" if x_prev is None else ("self" if x_prev is x else "prev")
    flags = (
        ("bias",) * (bias is not None)
        + (f"x_prev={shortcut}",) * (x_prev is not None)
        + ("z_prev",) * (z_prev is not None)
        + ("dropout",) * (dropout_p > 0.0)
        + ("sqnorm",) * bool(compute_x_sqnorm)
        + (("fwd+bwd",) if grad else ("fwd",))
    )
    return (str(x.device), m_bucket(rows), weight.shape[1], weight.shape[0], lora_A.shape[0], str(x.dtype)[6:], flags)


def _key_text(key: tuple) -> str:
    device, bucket, K, N, rank, dtype, flags = key
    return f"{device} M<={bucket} K={K} N={N} r={rank} {dtype} {','.join(flags)}"


def device_median_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median time of ``fn`` in ms: CUDA events through ``triton.testing.do_bench`` on CUDA
    (warm-up excluded), the wall clock of a few calls elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=25, return_mode="median"))
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@dataclass
class Choice:
    """One decision of ``auto``: the key, what won, every candidate's median ms (``None`` when
    it could not run) and why a candidate could not run."""

    key: tuple
    backend: str
    timings_ms: dict[str, float | None]
    failures: dict[str, str] = field(default_factory=dict)
    source: str = "timed"  # or "disk cache"

    def as_dict(self) -> dict:
        device, bucket, K, N, rank, dtype, flags = self.key
        return {
            "device": device,
            "m_bucket": bucket,
            "K": K,
            "N": N,
            "rank": rank,
            "dtype": dtype,
            "flags": list(flags),
            "backend": self.backend,
            "timings_ms": dict(self.timings_ms),
            "failures": dict(self.failures),
            "source": self.source,
        }


class AutoTuner:
    """Times ``fused`` against ``composed`` on the first call of every key and remembers the
    faster. ``timer(name, fn) -> ms`` and ``candidates`` are injectable (the tests fake both)."""

    def __init__(
        self,
        timer: Callable[[str, Callable[[], object]], float] | None = None,
        candidates: tuple[str, ...] = ("fused", "composed"),
        cache_path: str | os.PathLike | None = None,
    ) -> None:
        self.timer = timer
        self.candidates = candidates
        self.cache_path = cache_path
        self.choices: dict[tuple, Choice] = {}
        self._loaded_from: Path | None = None
        self._warned: set[tuple] = set()

    # -------------------------------------------------------------- disk cache
    def _path(self) -> Path | None:
        path = self.cache_path if self.cache_path is not None else os.environ.get(CACHE_ENV)
        return Path(path) if path else None

    @staticmethod
    def _context(device: str) -> str:
        """Timings are only reused on the same device model with the same torch and triton."""
        name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        return f"{name}|torch {torch.__version__}|triton {triton_version}"

    def _load(self, device: str) -> None:
        path = self._path()
        if path is None or path == self._loaded_from or not path.is_file():
            return
        self._loaded_from = path
        entries = json.loads(path.read_text()).get(self._context(device), [])
        for entry in entries:
            key = _entry_key(entry)
            self.choices.setdefault(
                key, Choice(key, entry["backend"], entry["timings_ms"], entry.get("failures", {}), "disk cache")
            )

    def _save(self, choice: Choice) -> None:
        path = self._path()
        if path is None:
            return
        data = json.loads(path.read_text()) if path.is_file() else {}
        entries = data.setdefault(self._context(choice.key[0]), [])
        entries[:] = [e for e in entries if _entry_key(e) != choice.key]
        entry = choice.as_dict()
        entry["source"] = "timed"
        entries.append(entry)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)  # atomic: a concurrent reader sees the old or the new file

    # -------------------------------------------------------------- the choice
    def choose(
        self, x, weight, bias, lora_A, lora_B, *, x_prev=None, z_prev=None, dropout_p=0.0, compute_x_sqnorm=False
    ) -> str:
        """The backend for these inputs: cached, or timed now on copies of them."""
        tensors = (x, weight, bias, lora_A, lora_B, x_prev, z_prev)
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        key = tuning_key(
            x,
            weight,
            bias,
            lora_A,
            x_prev=x_prev,
            z_prev=z_prev,
            dropout_p=dropout_p,
            compute_x_sqnorm=compute_x_sqnorm,
            grad=grad,
        )
        choice = self.choices.get(key)
        if choice is None:
            self._load(key[0])
            choice = self.choices.get(key)
            if choice is not None:
                self._warn_failures(choice)  # a failure recorded by another process
        if choice is not None:
            return choice.backend
        if x.numel() == 0 or torch.compiler.is_compiling() or _capturing(x):
            # Nothing to time (an empty batch), or timing is impossible here: the safe choice.
            return "composed"
        choice = self._time(key, x, weight, bias, lora_A, lora_B, x_prev, z_prev, dropout_p, compute_x_sqnorm, grad)
        self._warn_failures(choice)
        if choice.timings_ms.get(choice.backend) is not None:  # keep only real decisions
            self.choices[key] = choice
            self._save(choice)
        return choice.backend

    def _warn_failures(self, choice: Choice) -> None:
        """One :class:`FusedBackendFailure` per key whose fused candidate failed."""
        reason = choice.failures.get("fused")
        if reason is None or choice.key in self._warned:
            return
        self._warned.add(choice.key)
        warnings.warn(
            f"the fused kernels failed for {_key_text(choice.key)} ({reason}); {choice.backend} runs instead "
            "(backend_report() lists every failure)",
            FusedBackendFailure,
            stacklevel=2,
        )

    def _time(self, key, x, weight, bias, lora_A, lora_B, x_prev, z_prev, dropout_p, compute_x_sqnorm, grad) -> Choice:
        # Detached copies of the leaves: timing must not touch the caller's graph or .grad.
        def leaf(t):
            return None if t is None else t.detach().requires_grad_(grad and t.requires_grad)

        x_t, lora_A_t, lora_B_t, z_prev_t = leaf(x), leaf(lora_A), leaf(lora_B), leaf(z_prev)
        x_prev_t = x_t if x_prev is x else leaf(x_prev)
        weight_t, bias_t = weight.detach(), None if bias is None else bias.detach()
        wrt = [t for t in (x_t, lora_A_t, lora_B_t, x_prev_t, z_prev_t) if t is not None and t.requires_grad]
        grad_y = None
        timings: dict[str, float | None] = {}
        failures: dict[str, str] = {}
        for name in self.candidates:
            try:
                impl = implementation(name)

                def run(impl=impl):
                    with torch.set_grad_enabled(grad):
                        y, _, _ = impl(
                            x_t,
                            weight_t,
                            bias_t,
                            lora_A_t,
                            lora_B_t,
                            1.0,
                            x_prev=x_prev_t,
                            z_prev=z_prev_t,
                            dropout_p=dropout_p,
                            dropout_seed=0 if dropout_p > 0.0 else None,
                            compute_x_sqnorm=compute_x_sqnorm,
                        )
                        if grad and wrt:
                            torch.autograd.grad(y, wrt, grad_y, allow_unused=True)

                if grad and wrt and grad_y is None:
                    grad_y = torch.randn(
                        (*x.shape[:-1], weight.shape[0]), device=x.device, dtype=x.dtype, generator=_generator(x)
                    )
                run()  # first launch: compiles and autotunes the kernels, outside the timing
                timer = self.timer or (lambda _name, fn: device_median_ms(fn, x.device))
                timings[name] = float(timer(name, run))
            except Exception as err:  # noqa: BLE001  (any failure of a candidate disqualifies it)
                timings[name] = None
                failures[name] = f"{type(err).__name__}: {err}"
        ran = {name: ms for name, ms in timings.items() if ms is not None}
        # Ties go to the earlier candidate; nothing ran (e.g. out of memory while timing): composed.
        backend = min(ran, key=lambda name: (ran[name], self.candidates.index(name))) if ran else "composed"
        return Choice(key, backend, timings, failures)


def _entry_key(entry: dict) -> tuple:
    fields = ("device", "m_bucket", "K", "N", "rank", "dtype")
    return tuple(entry[f] for f in fields) + (tuple(entry["flags"]),)


def _generator(x: torch.Tensor) -> torch.Generator:
    # A private generator: timing must not advance the user's random stream.
    return torch.Generator(device=x.device).manual_seed(0)


def _capturing(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


#: The process-wide tuner of ``auto``.
TUNER = AutoTuner()


# ---------------------------------------------------------------------------- the report
def backend_choices() -> list[dict]:
    """Every per-shape decision ``auto`` has made in this process (or loaded from its disk
    cache): key fields, the winner, each candidate's median ms and failures."""
    return [choice.as_dict() for choice in TUNER.choices.values()]


def backend_report() -> str:
    """What runs where under the current ``RESLORA_BACKEND``, and every timed choice."""
    choice = requested_backend()
    lines = [f"{BACKEND_ENV}={os.environ.get(BACKEND_ENV, '')!r} -> {choice}"]
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
    path = TUNER._path()
    if path is not None:
        lines.append(f"disk cache: {path}")
    failed = [c for c in TUNER.choices.values() if "fused" in c.failures]
    if failed:
        lines.append(f"FusedBackendFailure: the fused kernels failed for {len(failed)} key(s); composed runs there")
    for c in TUNER.choices.values():
        times = ", ".join(f"{n} {'-' if ms is None else f'{ms:.3f} ms'}" for n, ms in c.timings_ms.items())
        line = f"  {_key_text(c.key)}: {times} -> {c.backend}"
        if c.source != "timed":
            line += f" ({c.source})"
        lines.append(line)
        for name, reason in c.failures.items():
            lines.append(f"    {name} could not run: {reason}")
    return "\n".join(lines)
