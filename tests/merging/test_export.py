"""export_peft_adapter: PeftModel.from_pretrained on the base model reproduces the merged model."""

import copy
import json

import pytest
import torch
from helpers import rel_err

from reslora_kernels import FusedResLoRALinear, ResLoRAConfig, apply_reslora, export_peft_adapter, merge_and_unload

peft = pytest.importorskip("peft")
from helpers import LLAMA_TARGETS, tiny_llama  # noqa: E402


@pytest.mark.parametrize(
    "mode, pre_num, method",
    [
        ("none", 1, "exact"),
        ("bs", -1, "exact"),
        ("is", 1, "input_norm"),
        ("is", 1, "weight_norm"),
        ("ms", 2, "input_norm"),
        ("is", 1, "lstsq"),
        ("ms", -1, "lstsq"),
    ],
)
def test_peft_round_trip(tmp_path, mode, pre_num, method):
    torch.manual_seed(0)
    base = tiny_llama(torch.float32)
    model = copy.deepcopy(base)
    apply_reslora(model, ResLoRAConfig(mode=mode, rank=4, alpha=8, pre_num=pre_num, target_modules=LLAMA_TARGETS))
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, FusedResLoRALinear):
                block.lora_A.normal_(0.0, 0.2)
                block.lora_B.normal_(0.0, 0.05)
        model.train()
        for _ in range(3):
            model(torch.randint(0, 64, (2, 8)))
    calibration = [torch.randint(0, 64, (2, 8)) for _ in range(4)] if method == "lstsq" else None

    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    export_peft_adapter(model, tmp_path, method, calibration=calibration)
    # The model is not changed: no merge, same tensors (merge statistics included), same mode.
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.training
    merged = merge_and_unload(copy.deepcopy(model), method, calibration=calibration)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    ids = torch.randint(0, 64, (2, 9))
    merged.eval(), peft_model.eval()
    with torch.no_grad():
        expected = merged(ids).logits
        got = peft_model(ids).logits
    assert rel_err(got, expected) < 1e-5

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    if mode == "bs":
        # Concatenated ranks: r * (n + 1) for block n of a pre_num = -1 chain.
        assert config["rank_pattern"][r"model\.layers\.2\.self_attn\.q_proj"] == 12
        assert peft_model.base_model.model.model.layers[2].self_attn.q_proj.lora_A["default"].weight.shape == (12, 32)
    else:
        assert config["rank_pattern"] == {}
