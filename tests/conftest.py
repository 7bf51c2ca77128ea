import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter; the flag must be set before
# triton builds the kernels, i.e. before reslora_kernels.ops is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm()
    if denom == 0:
        return float((out - ref).norm())
    return float((out - ref).norm() / denom)


@pytest.fixture(autouse=True)
def _seed_and_backend(monkeypatch):
    torch.manual_seed(0)
    # Tests choose their backend explicitly; a developer's shell setting must not leak in.
    monkeypatch.delenv("RESLORA_BACKEND", raising=False)
    yield
