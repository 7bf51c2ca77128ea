"""``auto``'s per-shape choice on CUDA: the faster of ``fused`` and ``composed``, timed on the call's
own inputs the first time a key (M bucket, K, N, rank, dtype, flags) is seen, as Triton's autotuner
does; kept in memory and, with ``RESLORA_AUTOTUNE_CACHE=<file.json>``, on disk between processes
(per device name and torch/triton versions; :class:`TuningCache`: a problem with the file warns and
is ignored, concurrent writers merge). A candidate that cannot run is disqualified with its
reason. :mod:`reslora_kernels.backend` owns the process's tuner and decides when it is asked.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

__all__ = [
    "CACHE_ENV",
    "AutotuneCacheWarning",
    "FusedBackendFailure",
    "Choice",
    "AutoTuner",
    "TuningCache",
    "tuning_key",
    "m_bucket",
]

CACHE_ENV = "RESLORA_AUTOTUNE_CACHE"

Impl = Callable[..., tuple]


class FusedBackendFailure(UserWarning):
    """The fused kernels failed where ``auto`` timed them, so ``composed`` runs for that shape.
    Issued once per shape key, with the shape and the exception; :func:`reslora_kernels.backend_report`
    lists it. Make it an error to stop at the first one:
    ``warnings.simplefilter("error", FusedBackendFailure)``."""


class AutotuneCacheWarning(UserWarning):
    """The disk cache (``RESLORA_AUTOTUNE_CACHE``) could not be read or written: it is ignored
    (``auto`` times again, and keeps its choices in memory). Issued once per cache file and kind of
    problem."""


class TuningCache:
    """The disk cache of ``auto``'s choices: a JSON object mapping a context (device model, torch
    and Triton versions) to a list of entries (:meth:`Choice.as_dict`).

    An optimisation only: a problem with the file (unreadable, truncated, not a cache, an entry
    that is malformed or names an unknown backend, a location that cannot be written) warns once
    (:class:`AutotuneCacheWarning`) and is otherwise ignored; it never reaches the model's forward.
    A write is atomic and merges with what is on disk: under an exclusive lock on ``<file>.lock``
    (``fcntl``, where it exists; plus a lock between this process's threads) the file is read
    again, the entry added, and the result written to a temporary file unique to the process and
    thread, then moved into place with ``os.replace``: concurrent writers, threads or processes,
    keep every key, and a reader sees the old file or the new one, never a partial one."""

    _thread_lock = threading.Lock()

    def __init__(self, path: str | os.PathLike, backends: tuple[str, ...]) -> None:
        self.path = Path(path)
        self.backends = backends
        self._warned: set[str] = set()

    def _warn(self, kind: str, message: str) -> None:
        if kind in self._warned:
            return
        self._warned.add(kind)
        warnings.warn(
            f"RESLORA_AUTOTUNE_CACHE {self.path}: {message}; the cache is ignored (auto times the shapes again)",
            AutotuneCacheWarning,
            stacklevel=4,
        )

    def _read_file(self) -> dict:
        """The file's content, ``{}`` when it is missing or unreadable (warned)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as err:
            self._warn("read", f"cannot be read ({type(err).__name__}: {err})")
            return {}
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            what = "is empty" if not text.strip() else f"is not valid JSON ({err}): truncated or corrupted"
            self._warn("json", what)
            return {}
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            self._warn("format", f"holds a {type(data).__name__}, not an object of context -> list of entries")
            return {}
        return data

    def _valid(self, entry: object) -> bool:
        try:
            key = _entry_key(entry)
            ok = (
                entry["backend"] in self.backends
                and isinstance(entry["timings_ms"], dict)
                and isinstance(entry.get("failures", {}), dict)
                and all(isinstance(part, (str, int)) for part in key[:-1])
                and all(isinstance(flag, str) for flag in key[-1])
            )
        except (TypeError, KeyError, AttributeError):
            ok = False
        if not ok:
            shown = json.dumps(entry)[:200] if _jsonable(entry) else repr(entry)[:200]
            self._warn("entry", f"an entry is malformed or names a backend not among {list(self.backends)}: {shown}")
        return ok

    def read(self, context: str) -> list[dict]:
        """The valid entries of ``context`` (the others are left out, warned once)."""
        return [entry for entry in self._read_file().get(context, []) if self._valid(entry)]

    @contextlib.contextmanager
    def _locked(self) -> "contextlib.AbstractContextManager[None]":
        with self._thread_lock:
            try:
                import fcntl
            except ImportError:  # no fcntl (Windows): atomic replaces still, merges best-effort
                yield
                return
            with open(self.path.with_name(self.path.name + ".lock"), "a") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def write(self, context: str, entry: dict) -> None:
        """Add ``entry`` (replacing one of the same key) to ``context`` on disk, merged with the
        file's current content; any problem warns once and is ignored."""
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                data = self._read_file()
                entries = [e for e in data.get(context, []) if self._valid(e) and _entry_key(e) != _entry_key(entry)]
                data[context] = entries + [entry]
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex}")
                tmp.write_text(json.dumps(data, indent=1) + "\n")
                os.replace(tmp, self.path)  # atomic: a reader sees the old or the new file
                tmp = None
        except OSError as err:
            self._warn("write", f"cannot be written ({type(err).__name__}: {err})")
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


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


def key_text(key: tuple) -> str:
    """A key as the report prints it."""
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
        self._disk: TuningCache | None = None
        self._warned: set[tuple] = set()

    # -------------------------------------------------------------- disk cache
    def cache_file(self) -> Path | None:
        """The disk cache: ``cache_path``, else ``RESLORA_AUTOTUNE_CACHE``, else none."""
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

    def _cache(self) -> TuningCache | None:
        """The :class:`TuningCache` of :meth:`cache_file` (one per file, so each warns once)."""
        path = self.cache_file()
        if path is None:
            return None
        if self._disk is None or self._disk.path != path:
            self._disk = TuningCache(path, self.candidates)
        return self._disk

    def _load(self, device: str) -> None:
        cache = self._cache()
        if cache is None or cache.path == self._loaded_from:
            return
        self._loaded_from = cache.path
        for entry in cache.read(self._context(device)):
            key = _entry_key(entry)
            self.choices.setdefault(
                key, Choice(key, entry["backend"], entry["timings_ms"], entry.get("failures", {}), "disk cache")
            )

    def _save(self, choice: Choice) -> None:
        cache = self._cache()
        if cache is None:
            return
        entry = choice.as_dict()
        entry["source"] = "timed"
        cache.write(self._context(choice.key[0]), entry)

    # -------------------------------------------------------------- the choice
    def choose(
        self,
        implementation: Callable[[str], Impl],
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        *,
        x_prev=None,
        z_prev=None,
        dropout_p=0.0,
        compute_x_sqnorm=False,
    ) -> str:
        """The backend for these inputs: cached, or timed now on copies of them, running each
        candidate's op ``implementation(name)``."""
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
        choice = self._time(
            implementation, key, x, weight, bias, lora_A, lora_B, x_prev, z_prev, dropout_p, compute_x_sqnorm, grad
        )
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
            f"the fused kernels failed for {key_text(choice.key)} ({reason}); {choice.backend} runs instead "
            "(backend_report() lists every failure)",
            FusedBackendFailure,
            stacklevel=2,
        )

    def _time(
        self, implementation, key, x, weight, bias, lora_A, lora_B, x_prev, z_prev, dropout_p, compute_x_sqnorm, grad
    ) -> Choice:
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
