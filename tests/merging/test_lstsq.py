"""The calibrated lstsq merge and merge_report."""

import copy

import pytest
import torch
from helpers import ToyStack, oracle_params, rel_err
from oracle import depth

from reslora_kernels import FusedResLoRALinear, ResLoRAConfig, apply_reslora, merge_and_unload, merge_report


def oracle_lstsq_weights(params, batches, scaling, mode, pre_num, ridge):
    """Closed-form float64 solve from activations recomputed with the oracle's formulas."""
    length = len(params)
    gram = [0.0] * length
    cross = [0.0] * length
    for x0 in batches:
        xs, zs = [x0.double()], []
        for n, (W, b, A, B) in enumerate(params):
            x = xs[n]
            A, B = A.detach(), B.detach()
            zs.append(x @ A.T)
            if mode == "is":
                target = (xs[n - 1] if n > 0 else x) @ A.T
                u = zs[n] + target
            else:
                target = sum(zs[n - k] for k in range(1, depth(n, pre_num) + 1)) if n > 0 else None
                u = zs[n] if target is None else zs[n] + target
            if n > 0:
                gram[n] = gram[n] + x.T @ x
                cross[n] = cross[n] + target.T @ x
            xs.append(torch.tanh(x @ W.T + b + scaling * u @ B.T))
    weights = []
    for n, (W, _, A, B) in enumerate(params):
        A, B = A.detach(), B.detach()
        if n == 0:
            P = A if mode == "is" else torch.zeros_like(A)
        else:
            lam = ridge * gram[n].diagonal().mean()
            P = torch.linalg.solve(gram[n] + lam * torch.eye(gram[n].shape[0], dtype=torch.float64), cross[n].T).T
        weights.append(W + scaling * B @ (A + P))
    return weights


@pytest.mark.parametrize("pre_num", [1, 2, -1])
@pytest.mark.parametrize("mode", ["is", "ms"])
def test_lstsq_matches_closed_form(mode, pre_num):
    model = ToyStack(4, 8, mode, pre_num)
    params = oracle_params(model)
    batches = [torch.randn(6, 8, dtype=torch.float64) for _ in range(5)]
    expected = oracle_lstsq_weights(params, batches, model.blocks[0].scaling, mode, pre_num, ridge=1e-2)
    model.train()  # calibration must switch to eval itself and restore the mode
    merge_and_unload(model, method="lstsq", calibration=iter(batches), ridge=1e-2)
    assert model.training
    for n, block in enumerate(model.blocks):
        assert type(block) is torch.nn.Linear
        assert rel_err(block.weight, expected[n]) < 1e-10, f"block {n}"


def test_lstsq_first_blocks_are_exact():
    """The first is block's shortcut is its own input and the first ms block has none: there the
    lstsq merge reproduces the unmerged block exactly, whatever the calibration data."""
    for mode in ("is", "ms"):
        model = ToyStack(1, 8, mode)
        x = torch.randn(5, 8, dtype=torch.float64)
        with torch.no_grad():
            before = model(x)[0]
            merge_and_unload(model, method="lstsq", calibration=[torch.randn(3, 8, dtype=torch.float64)])
            assert rel_err(model(x)[0], before) < 1e-12, mode


def test_lstsq_errors():
    model = ToyStack(3, 8, "is")
    with pytest.raises(ValueError, match="needs calibration"):
        merge_and_unload(model, method="lstsq")
    with pytest.raises(ValueError, match="calibration is empty"):
        merge_and_unload(model, method="lstsq", calibration=[])
    with pytest.raises(TypeError, match="a batch must be a tensor or a dict"):
        merge_and_unload(model, method="lstsq", calibration=[[torch.randn(2, 8)]])
    with pytest.raises(ValueError, match="ridge must be a positive number"):
        merge_and_unload(model, method="lstsq", calibration=[torch.randn(2, 8)], ridge=0)
    with pytest.raises(ValueError, match="calibration is only used by method 'lstsq'"):
        merge_and_unload(model, method="input_norm", calibration=[torch.randn(2, 8)])
    with pytest.raises(ValueError, match="'lstsq' does not apply to mode 'bs'"):
        merge_and_unload(ToyStack(2, 8, "bs"), method="lstsq", calibration=[torch.randn(2, 8)])
    # Nothing was merged by the failed calls, and no calibration state is left behind.
    assert all(isinstance(b, FusedResLoRALinear) and not b._shortcut_hooks for b in model.blocks)


def test_merge_report_leaves_the_model_alone():
    model = ToyStack(3, 8, "bs", pre_num=-1).train()
    before = copy.deepcopy(model.state_dict())
    before_modules = list(model.modules())
    report = merge_report(model, [torch.randn(4, 8, dtype=torch.float64) for _ in range(2)])
    assert set(report) == {"exact"} and report["exact"] < 1e-12
    assert model.training
    assert all(isinstance(b, FusedResLoRALinear) for b in model.blocks)
    assert [type(m) for m in model.modules()] == [type(m) for m in before_modules]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="batches is empty"):
        merge_report(model, [])


class LastOutput(torch.nn.Module):
    """The toy stack with its last block's output as the model output."""

    def __init__(self, stack):
        super().__init__()
        self.stack = stack

    def forward(self, x):
        return self.stack(x)[-1]


def test_merge_report_matches_real_merges():
    model = LastOutput(ToyStack(4, 8, "is")).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(5, 8, dtype=torch.float64))
    held = [torch.randn(4, 8, dtype=torch.float64) for _ in range(2)]
    calib = [torch.randn(6, 8, dtype=torch.float64) for _ in range(4)]
    report = merge_report(model, held, calibration=calib)
    assert set(report) == {"input_norm", "weight_norm", "lstsq"}
    model.eval()
    with torch.no_grad():
        unmerged = [model(x) for x in held]
    for method in report:
        merged = merge_and_unload(copy.deepcopy(model), method, calibration=calib if method == "lstsq" else None)
        with torch.no_grad():
            outs = [merged(x) for x in held]
        num = sum(float((o - u).square().sum()) for o, u in zip(outs, unmerged))
        den = sum(float(u.square().sum()) for u in unmerged)
        assert report[method] == pytest.approx((num / den) ** 0.5, rel=1e-9), method


@pytest.mark.parametrize("mode", ["is", "ms"])
def test_lstsq_beats_input_norm_on_a_tiny_llama(mode):
    pytest.importorskip("transformers")
    from helpers import LLAMA_TARGETS, tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(torch.float32, layers=4)
    apply_reslora(model, ResLoRAConfig(mode=mode, rank=4, alpha=8, target_modules=LLAMA_TARGETS))
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, FusedResLoRALinear):
                block.lora_B.normal_(0.0, 0.02)
        model.train()
        for _ in range(10):  # training forwards: the input-norm statistics
            model(torch.randint(0, 64, (4, 16)))
    calibration = [torch.randint(0, 64, (4, 16)) for _ in range(8)]
    held_out = [{"input_ids": torch.randint(0, 64, (4, 16))} for _ in range(4)]
    report = merge_report(model, held_out, ["input_norm", "lstsq"], calibration=calibration)
    assert report["lstsq"] * 1.4 < report["input_norm"], report


def test_merge_report_restores_the_model_when_a_merged_forward_fails(monkeypatch):
    from reslora_kernels import merging

    model = ToyStack(3, 8, "is")
    blocks = list(model.blocks)

    def fail(self, x):
        raise RuntimeError("merged forward failed")

    monkeypatch.setattr(merging._MergedPreview, "forward", fail)
    with pytest.raises(RuntimeError, match="merged forward failed"):
        merge_report(model, [torch.randn(4, 8, dtype=torch.float64)])
    assert list(model.blocks) == blocks


def test_merge_report_on_a_single_block():
    layer = FusedResLoRALinear(8, 6, dtype=torch.float64, rank=2, mode="is")
    torch.nn.init.normal_(layer.lora_B)
    report = merge_report(layer, [torch.randn(3, 8, dtype=torch.float64)])
    # A lone is block is the first of its chain: input_norm (a_0 = 1) is exact for it.
    assert report["input_norm"] < 1e-12


def test_shortcut_hook_sees_the_shortcut_inputs_and_can_be_removed():
    model = ToyStack(3, 8, "is")
    seen = []
    handle = model.blocks[1].register_shortcut_hook(lambda b, x, xp, zp: seen.append((b, x, xp, zp)))
    x = torch.randn(2, 8, dtype=torch.float64)
    model(x)
    assert len(seen) == 1 and seen[0][0] is model.blocks[1] and seen[0][3] is None
    assert torch.equal(seen[0][2], x)  # block 1's x_prev is block 0's input
    handle.remove()
    model(x)
    assert len(seen) == 1
