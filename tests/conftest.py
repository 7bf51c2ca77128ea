import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter; the flag must be set before
# triton builds the kernels, i.e. before reslora_kernels.ops is imported.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/ops/real_launch/ runs kernels built for a GPU on a fake one: where this run builds them for
# the interpreter, tests/ops/test_real_launch.py runs those tests in processes of their own.
collect_ignore_glob = ["ops/real_launch/*"] if os.environ.get("TRITON_INTERPRET") == "1" else []

# After the flag: helpers imports the package (and so builds the kernels).
from helpers import DTYPE_IDS  # noqa: E402


def pytest_make_parametrize_id(config, val, argname):
    if isinstance(val, torch.dtype):
        return DTYPE_IDS.get(val, str(val).replace("torch.", ""))
    return None


@pytest.fixture
def poison_empty(monkeypatch):
    """Every torch.empty / empty_like comes back full of NaN (floats) or -1 (ints), so an
    element a kernel forgets to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.numel():
            t.fill_(float("nan") if t.is_floating_point() else -1)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


@pytest.fixture(autouse=True)
def _seed_and_backend():
    torch.manual_seed(0)
    # Tests choose their backend explicitly (set_backend, use_backend); a developer's
    # RESLORA_BACKEND must not leak in, nor one test's choice into the next.
    from reslora_kernels import set_backend

    set_backend("auto")
    yield
    set_backend("auto")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """On a CUDA machine, write the outcome of the GPU-marked tests with the GPU name, versions
    and git commit to $RESLORA_GPU_LOG_DIR (default tests/gpu_logs/)."""
    if not HAS_CUDA:
        return
    import datetime
    import json
    import subprocess
    from pathlib import Path

    import triton

    outcomes = {}
    for status in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(status, []):
            if "gpu" in getattr(report, "keywords", {}):
                outcomes[report.nodeid] = status
    if not outcomes:
        return
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    gpu = torch.cuda.get_device_name()
    log = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        # The device machine gets a copy of the tree without .git: the caller passes the commit.
        "commit": commit or os.environ.get("RESLORA_GIT_COMMIT", "unknown"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "exitstatus": int(exitstatus),
        "tests": outcomes,
    }
    out_dir = Path(os.environ.get("RESLORA_GPU_LOG_DIR", root / "tests" / "gpu_logs"))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{gpu.replace(' ', '_')}-{log['date'][:10]}.json"
    (out_dir / name).write_text(json.dumps(log, indent=2) + "\n")
    terminalreporter.write_line(f"GPU test log written to {out_dir / name}")
