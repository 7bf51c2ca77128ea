"""Shared machinery of the benchmark suites: the variants, the timer, the results file.

Every number in a results file is measured by these functions in the run that wrote it; ratios
are computed only between numbers of the same run (benchmarks/report.py).
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

import reslora_kernels
from reslora_kernels import FusedResLoRALinear, link_chain, reference

ROOT = Path(__file__).resolve().parents[1]
IS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if IS_CUDA else "cpu"
MODES = ("none", "is", "bs", "ms")

try:
    import peft
except ImportError:  # optional: the PEFT baselines are skipped with a reason
    peft = None


# ---------------------------------------------------------------------------- measuring
def synchronize() -> None:
    if IS_CUDA:
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object]) -> float:
    """Median time of ``fn`` in milliseconds. CUDA: ``triton.testing.do_bench`` (CUDA events,
    L2 flushed before every run so inputs are not served from cache, warm-up excluded). CPU:
    wall clock around each call after two warm-up calls."""
    if IS_CUDA:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    fn()
    times = []
    deadline = time.perf_counter() + 0.5
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_bytes(fn: Callable[[], object]) -> int | None:
    """Extra device memory one call of ``fn`` allocates at its peak (CUDA only)."""
    if not IS_CUDA:
        return None
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    synchronize()
    return torch.cuda.max_memory_allocated() - before


def environment() -> dict:
    """Where and with what the numbers were measured."""
    versions = {"torch": torch.__version__, "reslora_kernels": reslora_kernels.__version__}
    for name in ("triton", "peft", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    dirty = ""
    if commit:
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = "+dirty" if status.strip() else ""
    return {
        "device": torch.cuda.get_device_name() if IS_CUDA else "cpu",
        "cuda": torch.version.cuda if IS_CUDA else None,
        "versions": versions,
        # The device machine gets a copy of the tree without .git: the caller passes the commit.
        "commit": (commit + dirty) or os.environ.get("RESLORA_GIT_COMMIT", "unknown"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend_fold": reslora_kernels.fold_report(),
    }


class Results:
    """Rows of one benchmark session; written as JSON at the end of the session."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, suite: str, group: str, variant: str, **fields) -> None:
        self.rows.append({"suite": suite, "group": group, "variant": variant, **fields})

    def write(self, out_dir: Path) -> Path:
        from report import compute_ratios

        env = environment()
        data = {"environment": env, "rows": self.rows, "ratios": compute_ratios(self.rows, env["device"])}
        out_dir.mkdir(parents=True, exist_ok=True)
        slug = env["device"].replace(" ", "_").replace("/", "_")
        path = out_dir / f"{slug}-{env['date'][:10]}.json"
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path


# ---------------------------------------------------------------------------- layer variants
class _Wrap(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def _clear(*tensors) -> None:
    for t in tensors:
        t.grad = None


def _backend(name: str) -> None:
    os.environ["RESLORA_BACKEND"] = name


def layer_variants() -> list[tuple[str, str]]:
    """``(variant, mode)`` pairs of the layer suite, the floor first."""
    out = [("frozen", "-"), ("peft_fp32", "none"), ("peft_model_dtype", "none")]
    for impl in ("reference", "compiled", "fused"):
        out += [(impl, mode) for mode in MODES]
    return out


@dataclass
class LayerCase:
    """One benchmark case: ``step()`` is what is timed; ``forward`` and ``leaves`` let the
    tests check that every variant computes the same thing."""

    step: Callable[[], object]
    forward: Callable[[], torch.Tensor]
    leaves: list[torch.Tensor]
    grad_out: torch.Tensor


def layer_step(
    variant: str, mode: str, M: int, K: int, N: int, rank: int, dtype, backward: bool, device: str = DEVICE
) -> LayerCase:
    """One layer's forward (+ backward with a fixed ``grad_out``) in chain context as a
    :class:`LayerCase`; ``backward=False`` runs under no_grad. The inputs and weights are drawn
    in the same order for every ResLoRA variant, so under one seed they hold the same values."""
    factory = {"device": device, "dtype": dtype}
    x = torch.randn(M, K, **factory, requires_grad=backward)
    grad_out = torch.randn(M, N, **factory)

    def run(forward, leaves):
        if not backward:

            def step():
                with torch.no_grad():
                    return forward()

        else:

            def step():
                _clear(*leaves)
                forward().backward(grad_out)

        return LayerCase(step, forward, leaves, grad_out)

    if variant == "frozen":
        linear = nn.Linear(K, N, **factory).requires_grad_(False)
        return run(lambda: linear(x), [x])

    if variant.startswith("peft"):
        if peft is None:
            raise RuntimeError("peft is not installed")
        model = _Wrap(nn.Linear(K, N, **factory))
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"], lora_dropout=0.0)
        # PEFT's default upcasts the adapter to float32, so the LoRA branch runs in float32.
        model = peft.get_peft_model(model, config, autocast_adapter_dtype=(variant == "peft_fp32"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
        leaves = [x] + [p for p in model.parameters() if p.requires_grad]
        return run(lambda: model(x), leaves)

    # ResLoRA: block 1 of a two-block chain; block 0 provides the shortcut inputs.
    blocks = [FusedResLoRALinear(K, N, **factory, rank=rank, alpha=2 * rank, mode=mode, pre_num=1) for _ in range(2)]
    if mode != "none":
        link_chain(blocks)
    with torch.no_grad():
        for b in blocks:
            b.lora_B.normal_(0.0, 0.02)
    block = blocks[1]
    x_prev = torch.randn(M, K, **factory, requires_grad=backward) if mode == "is" else None
    z_prev = torch.randn(M, rank, **factory, requires_grad=backward) if mode == "ms" else None
    leaves = [x] + [t for t in (x_prev, z_prev) if t is not None]
    leaves += [p for b in blocks for p in (b.lora_A, b.lora_B)]
    chain = block.chain

    def prime():
        # What block 0's forward leaves in the chain's stash, without timing block 0.
        chain._last_index = 0
        chain._x_stash = x_prev
        chain._z_window = [z_prev] if z_prev is not None else []

    if variant in ("reference", "fused"):
        backend = "torch" if variant == "reference" else "triton"

        def forward():
            _backend(backend)
            prime()
            return block(x)

        return run(forward, leaves)

    if variant == "compiled":
        compiled = torch.compile(reference.reslora_linear, dynamic=False)

        def forward():
            if mode == "bs":
                lora_A = torch.cat([blocks[1].lora_A, blocks[0].lora_A])
                lora_B = torch.cat([blocks[1].lora_B, blocks[0].lora_B], dim=1)
            else:
                lora_A, lora_B = block.lora_A, block.lora_B
            y, _, _ = compiled(x, block.weight, block.bias, lora_A, lora_B, block.scaling, x_prev=x_prev, z_prev=z_prev)
            return y

        return run(forward, leaves)
    raise ValueError(f"unknown variant {variant!r}")
