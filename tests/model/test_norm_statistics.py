"""The input-norm merge statistics survive a bad step: an Inf/NaN norm is not recorded, it is
counted, and the count is reported (reslora_summary, merge_report, the input_norm merge)."""

import copy
import math

import pytest
import torch
from helpers import ToyStack

from reslora_kernels import merge_and_unload, merge_report, reslora_summary, set_backend

BAD = {"inf": float("inf"), "nan": float("nan")}


@pytest.mark.parametrize("bad", ["inf", "nan"])
@pytest.mark.parametrize("mode", ["is", "ms"])
def test_a_non_finite_norm_is_counted_not_recorded(mode, bad):
    model = ToyStack(2, 6, mode, norm_window=3).train()
    block = model.blocks[0]
    norms = []
    for step in range(5):
        x = torch.randn(4, 6, dtype=torch.float64) * (step + 1)
        if step == 3:
            x[1, 2] = BAD[bad]  # one overflowing step
        model(x)
        recorded = x if mode == "is" else x @ block.lora_A.detach().T
        norms.append(float(recorded.norm()))
    assert int(block.statistics.norm_count) == 4 and int(block.statistics.norm_nonfinite) == 1
    # The ring buffer holds the last three finite norms: steps 1, 2 and 4 (step 3 took no slot).
    finite = [n for n in norms if math.isfinite(n)]
    assert block.statistics.mean_norm() == pytest.approx(sum(finite[-3:]) / 3, rel=1e-6)
    assert torch.isfinite(block.statistics.norm_sq_window).all()


def test_recording_runs_on_the_triton_interpreter_too(monkeypatch):
    set_backend("fused")
    model = ToyStack(2, 16, "is", dtype=torch.float32).train()
    x = torch.randn(8, 16)
    model(x)
    bad = x.clone()
    bad[0, 0] = float("inf")
    model(bad)
    block = model.blocks[0]
    assert (int(block.statistics.norm_count), int(block.statistics.norm_nonfinite)) == (1, 1)
    assert float(block.statistics.norm_sq_window[0]) == pytest.approx(float(x.norm() ** 2), rel=1e-5)


@pytest.mark.parametrize("mode", ["is", "ms"])
def test_merge_after_a_bad_step_equals_the_merge_without_it(mode):
    """Before: one Inf norm in the window made a mean of inf and the merge wrote Inf/NaN weights."""
    torch.manual_seed(0)
    clean = ToyStack(3, 6, mode, pre_num=-1).train()
    hit = copy.deepcopy(clean)
    inputs = [torch.randn(4, 6, dtype=torch.float64) * (1 + step % 3) for step in range(6)]
    for step, x in enumerate(inputs):
        clean(x)
        hit(x)
        if step == 2:
            bad = x.clone()
            bad[0, 0] = float("inf")
            hit(bad)  # the extra, overflowing step
    # Inf in the input makes NaN downstream: every block saw one bad step.
    assert reslora_summary(hit).skipped_norms == {"blocks.0": 1, "blocks.1": 1, "blocks.2": 1}
    assert "non-finite norms left out of the merge statistics" in str(reslora_summary(hit))
    assert reslora_summary(clean).skipped_norms == {}
    held_out = [torch.randn(4, 6, dtype=torch.float64)]
    assert merge_report(hit, held_out, ["input_norm"]).skipped_norms == reslora_summary(hit).skipped_norms
    with pytest.warns(UserWarning, match=r"Inf/NaN norms were left out of the statistics \(blocks.0: 1"):
        merge_and_unload(hit)
    merge_and_unload(clean)
    for a, b in zip(hit.blocks, clean.blocks):
        assert torch.isfinite(a.weight).all()
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=0)


def test_zero_norms_are_recorded_and_skipped_by_the_mean():
    model = ToyStack(1, 6, "is", norm_window=4).train()
    block = model.blocks[0]
    model(torch.zeros(2, 6, dtype=torch.float64))
    x = torch.randn(2, 6, dtype=torch.float64)
    model(x)
    assert (int(block.statistics.norm_count), int(block.statistics.norm_nonfinite)) == (2, 0)
    assert block.statistics.mean_norm() == pytest.approx(float(x.norm()), rel=1e-6)
