"""``auto``'s per-shape choice on CUDA: the faster of ``fused`` and ``composed``, timed on the call's
own inputs the first time a key (M bucket, K, N, rank, dtype, flags) is seen, as Triton's autotuner
does; kept in memory and, with ``RESLORA_AUTOTUNE_CACHE=<file.json>``, on disk between processes
(per device name and torch/triton versions). A candidate that cannot run is disqualified with its
reason. :mod:`reslora_kernels.backend` owns the process's tuner and decides when it is asked.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

__all__ = ["CACHE_ENV", "FusedBackendFailure", "Choice", "AutoTuner", "tuning_key", "m_bucket"]

CACHE_ENV = "RESLORA_AUTOTUNE_CACHE"

Impl = Callable[..., tuple]


class FusedBackendFailure(UserWarning):
    """The fused kernels failed where ``auto`` timed them, so ``composed`` runs for that shape.
    Issued once per shape key, with the shape and the exception; :func:`reslora_kernels.backend_report`
    lists it. Make it an error to stop at the first one:
    ``warnings.simplefilter("error", FusedBackendFailure)``."""


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

    def _load(self, device: str) -> None:
        path = self.cache_file()
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
        path = self.cache_file()
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
