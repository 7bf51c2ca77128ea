"""The RESLORA_BACKEND switch."""

import pytest
import torch

from reslora_kernels import FusedResLoRALinear, resolve_backend


def test_default_and_torch_backends_use_the_reference_on_cpu(monkeypatch):
    x = torch.randn(2, 4)
    assert resolve_backend(x) == "torch"
    monkeypatch.setenv("RESLORA_BACKEND", "torch")
    assert resolve_backend(x) == "torch"
    monkeypatch.setenv("RESLORA_BACKEND", " AUTO ")
    assert resolve_backend(x) == "torch"


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("RESLORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="RESLORA_BACKEND='cuda' is not one of auto, torch, triton"):
        FusedResLoRALinear(4, 4)(torch.randn(2, 4))
