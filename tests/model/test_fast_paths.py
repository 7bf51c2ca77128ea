"""Targets whose parent computes with their weights without calling their forward (PyTorch's
encoder-layer fast path, nn.MultiheadAttention's out_proj): refused by name, left out by all-linear
with a warning, so that no adapter is ever silently ignored."""

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from reslora_kernels import FusedResLoRALinear, ResLoRAConfig, apply_reslora


def encoder(layers=2):
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    return nn.Sequential(
        OrderedDict(encoder=nn.TransformerEncoder(layer, layers, enable_nested_tensor=False), head=nn.Linear(8, 3))
    ).eval()


@pytest.mark.parametrize("mode", ["none", "is", "bs", "ms"])
@pytest.mark.parametrize("targets", [["linear1", "linear2"], ["linear1"], r".*\.linear2"])
def test_encoder_layer_linears_are_refused_by_name(mode, targets):
    """Before: applied, trained, and in eval the fast path read linear1.weight directly, so the
    outputs equalled the model without LoRA exactly."""
    model = encoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"fast path.*Exclude it from target_modules.*transformers model"):
        apply_reslora(model, ResLoRAConfig(mode=mode, target_modules=targets))
    assert not any(isinstance(m, FusedResLoRALinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_error_names_the_module_and_its_parent():
    expected = (
        r"^encoder\.layers\.0\.linear1 cannot be adapted: its parent encoder\.layers\.0 "
        r"\(TransformerEncoderLayer\) runs PyTorch's fused fast path"
    )
    with pytest.raises(ValueError, match=expected):
        apply_reslora(encoder(), ResLoRAConfig(mode="none", target_modules=["linear1"]))


def test_all_linear_leaves_them_out_and_no_adapter_is_ignored_in_eval():
    model = encoder()
    with pytest.warns(UserWarning, match=r"all-linear leaves out: .*linear1 cannot be adapted.*fast path"):
        apply_reslora(model, ResLoRAConfig(mode="none", target_modules="all-linear"))
    adapted = [name for name, m in model.named_modules() if isinstance(m, FusedResLoRALinear)]
    assert adapted == ["head"]
    # Every adapter that exists acts in eval: changing its B changes the output.
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        base = model(x)
        for name in adapted:
            model.get_submodule(name).lora_B.normal_()
            assert not torch.equal(model(x), base), name


def test_all_linear_with_nothing_left_names_what_it_left_out():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    with pytest.warns(UserWarning, match="all-linear leaves out"):
        with pytest.raises(ValueError, match=r"no linear layer ResLoRA can adapt: .*out_proj.*linear1"):
            apply_reslora(layer, ResLoRAConfig(mode="none", target_modules="all-linear"))


def test_decoder_layers_have_no_fast_path_and_are_adapted():
    """nn.TransformerDecoderLayer calls linear1 and linear2: they are adapted, and act in eval."""
    layer = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).eval()
    apply_reslora(layer, ResLoRAConfig(mode="none", target_modules=["linear1", "linear2"]))
    x, memory = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    with torch.no_grad():
        base = layer(x, memory)
        layer.linear2.lora_B.normal_()
        assert not torch.equal(layer(x, memory), base)


def test_loading_onto_a_bypassed_layer_is_refused():
    """What load_reslora plans from a file naming the blocks (a file written by hand, or by an
    older version) is refused too."""
    from reslora_kernels.apply import plan_reslora

    with pytest.raises(ValueError, match=r"encoder\.layers\.1\.linear2 cannot be adapted.*fast path"):
        plan_reslora(encoder(), ResLoRAConfig(mode="none"), block_names=["head", "encoder.layers.1.linear2"])
