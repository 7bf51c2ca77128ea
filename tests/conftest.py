import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter; the flag must be set before
# triton builds the kernels, i.e. before reslora_kernels.ops is imported.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/real_launch/ runs kernels built for a GPU on a fake one: where this run builds them for
# the interpreter, tests/test_real_launch.py runs those tests in processes of their own.
collect_ignore_glob = ["real_launch/*"] if os.environ.get("TRITON_INTERPRET") == "1" else []

#: Where the Triton kernel tests run: the GPU if there is one, else the interpreter on CPU.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
#: The interpreter's tl.dot multiplies bfloat16 bit patterns: bfloat16 is tested on the GPU only.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


#: Test ids of dtype parameters: ``-k bf16`` selects the bfloat16 cases of every test.
DTYPE_IDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def pytest_make_parametrize_id(config, val, argname):
    if isinstance(val, torch.dtype):
        return DTYPE_IDS.get(val, str(val).replace("torch.", ""))
    return None


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm()
    if denom == 0:
        return float((out - ref).norm())
    return float((out - ref).norm() / denom)


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| in float64."""
    if out.numel() == 0:
        return 0.0
    return float((out.detach().double() - ref.detach().double()).abs().max())


def rounding_atol(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice the largest error of merely rounding the float64 reference to ``dtype``: no kernel
    that writes ``dtype`` can do better, so this is the absolute slack of the max-abs rule."""
    if ref64.numel() == 0:
        return 0.0
    ref64 = ref64.detach().double()
    return 2 * float((ref64.to(dtype).double() - ref64).abs().max())


def assert_maxabs_close(out, ref64, torch_same_dtype, what=""):
    """FlashAttention's rule: the kernel's largest elementwise error is at most twice PyTorch's own
    largest error for the same computation in the same dtype, plus the rounding of the output.
    Unlike a normwise error, it fails when a single tile (or element) of a large output is wrong."""
    err = max_abs_err(out, ref64)
    torch_err = max_abs_err(torch_same_dtype, ref64)
    atol = rounding_atol(ref64, out.dtype)
    assert err <= 2 * torch_err + atol, (
        f"{what}: max abs err {err:.3g} > 2 x PyTorch's own {torch_err:.3g} + atol {atol:.3g}"
    )


def assert_lowp_close(out, ref64, torch_same_dtype, what=""):
    """docs/design.md section 11: float32 within 1e-5 of the float64 reference; float16/bfloat16
    within 2e-2 and at most 2x PyTorch's own error at that dtype (plus a small atol). Beside the
    normwise error, the max-abs rule (:func:`assert_maxabs_close`) whenever PyTorch's result in the
    same dtype is given."""
    err = rel_err(out, ref64)
    if torch_same_dtype is not None:
        assert_maxabs_close(out, ref64, torch_same_dtype, what)
    if out.dtype == torch.float32:
        assert err < 1e-5, f"{what}: float32 rel err {err:.3g}"
        return
    torch_err = rel_err(torch_same_dtype, ref64)
    assert err < 2e-2, f"{what}: {out.dtype} rel err {err:.3g}"
    assert err <= 2 * torch_err + 1e-4, f"{what}: rel err {err:.3g} vs PyTorch's own {torch_err:.3g}"


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
def _seed_and_backend(monkeypatch):
    torch.manual_seed(0)
    # Tests choose their backend explicitly; a developer's shell setting must not leak in.
    monkeypatch.delenv("RESLORA_BACKEND", raising=False)
    yield


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
