"""save_reslora / load_reslora round trips, bit-exact, and their errors."""

import json

import pytest
import torch
from helpers import LLAMA_TARGETS, ToyStack, randomize_adapters, tiny_llama

from reslora_kernels import FusedResLoRALinear, ResLoRAConfig, apply_reslora, link_chain, load_reslora, save_reslora
from reslora_kernels.io import CONFIG_NAME, WEIGHTS_NAME


def reslora_state(model):
    return {
        k: v
        for k, v in model.state_dict().items()
        if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "norm_sq_window", "norm_count", "norm_nonfinite")
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_round_trip_is_bit_exact(tmp_path, dtype):
    torch.manual_seed(1)
    model = tiny_llama(dtype)
    torch.manual_seed(1)
    fresh = tiny_llama(dtype)  # the same base weights, no adapter
    config = ResLoRAConfig(mode="ms", rank=4, alpha=8, pre_num=2, target_modules=LLAMA_TARGETS, norm_window=5)
    apply_reslora(model, config)
    randomize_adapters(model)
    model.train()
    ids = torch.randint(0, 64, (2, 6))
    for _ in range(3):  # fill the merge statistics
        model(ids)
    save_reslora(model, tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / WEIGHTS_NAME).is_file()
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["config"] == config.to_dict()

    load_reslora(fresh, tmp_path)
    assert fresh.reslora_config == config
    saved, loaded = reslora_state(model), reslora_state(fresh)
    assert saved.keys() == loaded.keys() and len(saved) == 5 * 21
    for key in saved:
        assert saved[key].dtype == loaded[key].dtype and torch.equal(saved[key], loaded[key]), key
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)
    assert fresh.model.layers[2].self_attn.q_proj.chain.name == "model.layers.*.self_attn.q_proj"


def test_load_into_hand_built_layers(tmp_path):
    model = ToyStack(3, 6, "is")
    save_reslora(model, tmp_path)
    other = ToyStack(3, 6, "is")
    load_reslora(other, tmp_path)
    for a, b in zip(model.blocks, other.blocks):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
    unlinked = ToyStack(3, 6, "is")
    unlinked.blocks[0].chain.unlink()
    with pytest.raises(ValueError, match="chains differ"):
        load_reslora(unlinked, tmp_path)
    with pytest.raises(ValueError, match="saved from layers built by hand"):
        load_reslora(torch.nn.Sequential(torch.nn.Linear(6, 6)), tmp_path)


def test_load_errors(tmp_path):
    model = ToyStack(2, 6, "bs", rank=4)
    save_reslora(model, tmp_path)
    with pytest.raises(ValueError, match=r"blocks.0 has settings .*'rank': 2.* but the adapter has .*'rank': 4"):
        load_reslora(ToyStack(2, 6, "bs", rank=2), tmp_path)
    bigger = ToyStack(3, 6, "bs", rank=4)
    with pytest.raises(ValueError, match=r"missing in the model \[\], not in the adapter \['blocks.2'\]"):
        load_reslora(bigger, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not hold"):
        load_reslora(model, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no ResLoRA layers to save"):
        save_reslora(torch.nn.Linear(2, 2), tmp_path / "empty")


def test_hand_linked_chain_round_trip(tmp_path):
    layers = [FusedResLoRALinear(4, 4, mode="ms", pre_num=-1) for _ in range(3)]
    holder = torch.nn.ModuleList(layers)
    link_chain(layers, name="mine")
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B)
    save_reslora(holder, tmp_path)
    fresh_layers = [FusedResLoRALinear(4, 4, mode="ms", pre_num=-1) for _ in range(3)]
    fresh = torch.nn.ModuleList(fresh_layers)
    link_chain(fresh_layers, name="mine")
    load_reslora(fresh, tmp_path)
    assert all(torch.equal(a.lora_B, b.lora_B) for a, b in zip(layers, fresh_layers))


def test_resume_from_a_full_checkpoint(tmp_path):
    """A whole-model checkpoint (Trainer's, torch.save of the state dict) of a ResLoRA model holds
    the base weights under ``<module>.base_layer.weight`` (as PEFT's do) beside the adapters and
    statistics, and loads strictly into the same base with ResLoRA applied: training resumes as if
    never stopped."""
    config = ResLoRAConfig(mode="is", rank=4, alpha=8, target_modules=LLAMA_TARGETS, norm_window=4)
    torch.manual_seed(2)
    model = apply_reslora(tiny_llama(torch.float32), config)
    randomize_adapters(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 64, (2, 6))

    def step(model, opt):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    step(model, opt)
    state = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in state
    assert "model.layers.0.self_attn.q_proj.weight" not in state
    assert "model.layers.0.self_attn.q_proj.statistics.norm_count" in state
    torch.save({"model": state, "opt": opt.state_dict()}, tmp_path / "checkpoint.pt")

    torch.manual_seed(3)  # another base: every value must come from the checkpoint
    resumed = apply_reslora(tiny_llama(torch.float32), config)
    checkpoint = torch.load(tmp_path / "checkpoint.pt")
    resumed.load_state_dict(checkpoint["model"], strict=True)
    resumed_opt = torch.optim.SGD([p for p in resumed.parameters() if p.requires_grad], lr=0.1)
    resumed_opt.load_state_dict(checkpoint["opt"])
    step(model, opt)
    step(resumed, resumed_opt)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
