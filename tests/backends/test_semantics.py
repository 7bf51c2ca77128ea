"""Every mode x pre_num x chain length on the reference path, against the float64 oracle."""

import pytest
import torch
from helpers import SeedRecorder, ToyStack, oracle_params, rel_err
from oracle import toy_stack

from reslora_kernels import MODES, reference

FEATURES = 12


def run_both(model, x0, mode, pre_num, masks=None, p=0.0):
    """Forward + backward of the package model and of the oracle on the same weights."""
    params = oracle_params(model)
    ys = model(x0)
    probes = [torch.randn_like(y) for y in ys]  # a loss that reaches every block's output
    sum((y * w).sum() for y, w in zip(ys, probes)).backward()

    x0_ref = x0.detach().clone().requires_grad_()
    ys_ref = toy_stack(x0_ref, params, model.blocks[0].scaling, mode, pre_num, masks, p)
    sum((y * w).sum() for y, w in zip(ys_ref, probes)).backward()
    return ys, ys_ref, params, x0_ref


def assert_matches(model, ys, ys_ref, params, x0, x0_ref, tol=1e-12):
    for n, (y, y_ref) in enumerate(zip(ys, ys_ref)):
        assert rel_err(y, y_ref) < tol, f"output of block {n}"
    for n, (block, (_, _, A_ref, B_ref)) in enumerate(zip(model.blocks, params)):
        assert rel_err(block.lora_A.grad, A_ref.grad) < tol, f"lora_A grad of block {n}"
        assert rel_err(block.lora_B.grad, B_ref.grad) < tol, f"lora_B grad of block {n}"
    assert rel_err(x0.grad, x0_ref.grad) < tol, "input grad"


@pytest.mark.parametrize("length", range(1, 7))
@pytest.mark.parametrize("pre_num", [1, 2, -1])
@pytest.mark.parametrize("mode", MODES)
def test_chain_matches_oracle(mode, pre_num, length):
    model = ToyStack(length, FEATURES, mode, pre_num)
    x0 = torch.randn(2, 3, FEATURES, dtype=torch.float64, requires_grad=True)
    ys, ys_ref, params, x0_ref = run_both(model, x0, mode, pre_num)
    assert_matches(model, ys, ys_ref, params, x0, x0_ref)


@pytest.mark.parametrize("pre_num", [1, -1])
@pytest.mark.parametrize("mode", MODES)
def test_chain_with_dropout_matches_oracle(mode, pre_num, monkeypatch):
    p, length = 0.3, 4
    recorder = SeedRecorder(monkeypatch)
    model = ToyStack(length, FEATURES, mode, pre_num, dropout=p).train()
    x0 = torch.randn(5, FEATURES, dtype=torch.float64, requires_grad=True)
    # One seed per block forward; the oracle rebuilds each mask from its seed.
    params = oracle_params(model)
    ys = model(x0)
    assert len(recorder.seeds) == length
    masks = [reference.dropout_keep_mask(x0.shape, p, seed, "cpu") for seed in recorder.seeds]
    assert all(0 < int((~m).sum()) < m.numel() for m in masks), "masks should drop some, keep some"
    probes = [torch.randn_like(y) for y in ys]
    sum((y * w).sum() for y, w in zip(ys, probes)).backward()
    x0_ref = x0.detach().clone().requires_grad_()
    ys_ref = toy_stack(x0_ref, params, model.blocks[0].scaling, mode, pre_num, masks, p)
    sum((y * w).sum() for y, w in zip(ys_ref, probes)).backward()
    assert_matches(model, ys, ys_ref, params, x0, x0_ref)


def test_no_bias_and_leading_dims():
    model = ToyStack(3, FEATURES, "ms", 2, bias=False)
    x0 = torch.randn(2, 2, 3, FEATURES, dtype=torch.float64, requires_grad=True)
    ys, ys_ref, params, x0_ref = run_both(model, x0, "ms", 2)
    assert ys[0].shape == (2, 2, 3, FEATURES)
    assert_matches(model, ys, ys_ref, params, x0, x0_ref)


def test_empty_batch():
    model = ToyStack(3, FEATURES, "is", dtype=torch.float32)
    x0 = torch.randn(0, FEATURES, requires_grad=True)
    ys = model(x0)
    sum(y.sum() for y in ys).backward()
    assert ys[-1].shape == (0, FEATURES)
    assert x0.grad.shape == (0, FEATURES)
