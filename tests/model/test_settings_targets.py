"""Settings and targets as users write them: numpy integers, "ALL-LINEAR", the defaults of more
model types, nn.Sequential MLPs (stages, not experts)."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from reslora_kernels import (
    DEFAULT_TARGET_MODULES,
    BlockSettings,
    FusedResLoRALinear,
    ResLoRAConfig,
    apply_reslora,
    reslora_summary,
)
from reslora_kernels.chaining import parallel_copies


# ---------------------------------------------------------------------------- integers of any integral type
@pytest.mark.parametrize("rank", [np.int64(8), np.int32(8), np.uint8(8)])
def test_integral_rank_of_any_type_is_taken_as_int(rank):
    config = ResLoRAConfig(rank=rank, pre_num=np.int64(2), norm_window=np.int16(5), alpha=np.float32(16))
    assert type(config.rank) is int and config.rank == 8
    assert type(config.pre_num) is int and type(config.norm_window) is int and type(config.alpha) is float
    assert config.scaling == 2.0
    layer = FusedResLoRALinear(4, 6, rank=rank)
    assert layer.lora_A.shape == (8, 4) and layer.rank == 8
    assert isinstance(config.to_dict()["rank"], int)  # the config is saved as JSON


@pytest.mark.parametrize(
    "field, value",
    [("rank", True), ("rank", 8.0), ("rank", np.float64(8)), ("rank", "8"), ("pre_num", False), ("norm_window", 2.5)],
)
def test_non_integral_or_bool_integers_are_refused(field, value):
    with pytest.raises(TypeError, match=rf"{field} must be an integer, got {type(value).__name__}"):
        BlockSettings(**{field: value})


# ---------------------------------------------------------------------------- "all-linear" in any case
class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(4, 4), "o": nn.Linear(4, 4)}) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer["o"](torch.tanh(layer["q"](x)))
        return x


@pytest.mark.parametrize("spelling", ["ALL-LINEAR", "All-Linear", "all-linear"])
def test_all_linear_keyword_matches_in_any_case(spelling):
    config = ResLoRAConfig(target_modules=spelling)
    assert config.target_modules == "all-linear"
    model = apply_reslora(TwoLayers(), config)
    assert len(reslora_summary(model).replaced) == 4
    # A regex that merely resembles the keyword is still a regex.
    with pytest.raises(ValueError, match="no linear layer"):
        apply_reslora(TwoLayers(), ResLoRAConfig(target_modules="all-linears?x"))


# ---------------------------------------------------------------------------- default targets
def test_opt_has_peft_default_targets():
    transformers = pytest.importorskip("transformers")
    peft_constants = pytest.importorskip("peft.utils.constants")
    assert DEFAULT_TARGET_MODULES["opt"] == peft_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["opt"]
    config = transformers.OPTConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=24,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
    )
    model = transformers.OPTForCausalLM(config)
    apply_reslora(model, ResLoRAConfig(mode="is"))
    names = reslora_summary(model).replaced
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == ["q_proj"] * 2 + ["v_proj"] * 2, names


def test_default_targets_agree_with_peft():
    peft_constants = pytest.importorskip("peft.utils.constants")
    peft_table = peft_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    for model_type, targets in DEFAULT_TARGET_MODULES.items():
        assert targets == peft_table[model_type], model_type


# ---------------------------------------------------------------------------- nn.Sequential MLPs are stages
class SequentialMLPStack(nn.Module):
    def __init__(self, layers=3, features=6, hidden=10):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "attn": nn.Linear(features, features),
                    "mlp": nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, features)),
                }
            )
            for _ in range(layers)
        )

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["mlp"](torch.tanh(layer["attn"](x)))
        return x


def test_sequential_mlp_stages_chain_by_stage_without_an_experts_warning():
    model = SequentialMLPStack()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        apply_reslora(model, ResLoRAConfig(mode="is", target_modules=["attn", "mlp.0", "mlp.2"]))
    assert chains(model) == {
        "layers.*.attn": [f"layers.{i}.attn" for i in range(3)],
        "layers.*.mlp.0": [f"layers.{i}.mlp.0" for i in range(3)],
        "layers.*.mlp.2": [f"layers.{i}.mlp.2" for i in range(3)],
    }
    model.train()
    model(torch.randn(5, 6)).sum().backward()
    assert model.layers[2]["mlp"][2].lora_B.grad is not None


class SequentialExperts(nn.Module):
    """MoE experts that are themselves nn.Sequential MLPs: the expert index is still a copy."""

    def __init__(self, layers=2, experts=3, features=6):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "experts": nn.ModuleList(
                        nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.Linear(features, features))
                        for _ in range(experts)
                    )
                }
            )
            for _ in range(layers)
        )


def test_sequential_experts_are_still_parallel_copies():
    model = SequentialExperts()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_reslora(model, ResLoRAConfig(mode="is", target_modules=r"layers\.\d+\.experts\.\d+\.\d+"))
    assert any("12 target modules are parallel copies" in str(w.message) for w in caught)
    assert chains(model) == {}


def test_parallel_copies_skips_sequential_indices():
    stages = [f"layers.{b}.mlp.{i}" for b in range(2) for i in range(3)]
    swin = [f"stages.{s}.blocks.{b}.attn.qkv" for s in range(2) for b in range(2)]
    sequential = {f"layers.{b}.mlp.{i}" for b in range(2) for i in range(3)}
    sequential |= {f"stages.{s}.blocks.{b}" for s in range(2) for b in range(2)}
    assert parallel_copies(stages + swin) == set(stages + swin)  # names alone cannot tell
    assert parallel_copies(stages + swin, sequential) == set()


def chains(model):
    return reslora_summary(model).chains
