"""load_reslora refuses what would be silently wrong: an adapter already merged into the model, an
adapter of fewer layers than the model, an incomplete config; and a model materialised from the
meta device starts with initialised adapters."""

import json

import pytest
import torch
from helpers import LLAMA_TARGETS, poison_empty_like, randomize_adapters, tiny_llama

from reslora_kernels import (
    FusedResLoRALinear,
    ResLoRAConfig,
    apply_reslora,
    load_reslora,
    merge_and_unload,
    reslora_summary,
    save_reslora,
)
from reslora_kernels.io import CONFIG_NAME, _meta_sha256

CONFIG = ResLoRAConfig(mode="bs", rank=4, alpha=8, target_modules=LLAMA_TARGETS)  # merged exactly
IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def trained_adapter(tmp_path, layers=3, dtype=torch.float32):
    torch.manual_seed(1)
    model = apply_reslora(tiny_llama(dtype, layers=layers), CONFIG)
    randomize_adapters(model)
    save_reslora(model, tmp_path)
    return model


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


# ---------------------------------------------------------------------------- an adapter merged already
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_onto_the_model_it_was_merged_into_is_refused(tmp_path, dtype):
    model = trained_adapter(tmp_path, dtype=dtype)
    merged = merge_and_unload(model)
    expected = logits(merged)
    state = {k: v.clone() for k, v in merged.state_dict().items()}
    with pytest.raises(ValueError, match="already merged into this model's weights.*second time"):
        load_reslora(merged, tmp_path)
    # Nothing changed: no block, the same weights, the same outputs.
    assert not any(isinstance(m, FusedResLoRALinear) for m in merged.modules())
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in state.items())
    assert torch.equal(logits(merged), expected)


def test_merged_model_still_takes_another_adapter(tmp_path):
    trained_adapter(tmp_path / "first")
    torch.manual_seed(1)
    merged = merge_and_unload(load_reslora(tiny_llama(torch.float32), tmp_path / "first"))
    second = apply_reslora(merged, CONFIG)  # a new adapter trained on the merged weights
    randomize_adapters(second)
    save_reslora(second, tmp_path / "second")
    # Stacking: the merged model plus the second adapter, loaded after a merge of the first.
    torch.manual_seed(1)
    again = merge_and_unload(load_reslora(tiny_llama(torch.float32), tmp_path / "first"))
    load_reslora(again, tmp_path / "second")
    assert torch.equal(logits(again), logits(second))
    with pytest.raises(ValueError, match="already merged"):  # ...but not the first one again
        load_reslora(merge_and_unload(again), tmp_path / "first")


def test_a_merged_bfloat16_adapter_is_recognised_in_a_float32_model(tmp_path):
    torch.manual_seed(1)
    model = apply_reslora(tiny_llama(torch.bfloat16), CONFIG)
    randomize_adapters(model)
    save_reslora(model, tmp_path)
    torch.manual_seed(1)
    widened = merge_and_unload(load_reslora(tiny_llama(torch.float32), tmp_path))  # bf16 file, fp32 model
    with pytest.raises(ValueError, match="already merged"):
        load_reslora(widened, tmp_path)


# ---------------------------------------------------------------------------- fewer layers than the model
def test_adapter_of_fewer_layers_is_refused_naming_the_layers_without_one(tmp_path):
    trained_adapter(tmp_path, layers=3)
    torch.manual_seed(1)
    bigger = tiny_llama(torch.float32, layers=4)
    before = logits(bigger)
    with pytest.raises(ValueError, match=r"holds 21 blocks, but its target_modules .* choose 28 here") as err:
        load_reslora(bigger, tmp_path)
    assert "model.layers.3.self_attn.q_proj" in str(err.value) and "model.layers.2" not in str(err.value)
    assert not any(isinstance(m, FusedResLoRALinear) for m in bigger.modules())
    assert torch.equal(logits(bigger), before)
    with pytest.raises(ValueError, match="the model has no module"):  # the other way round, as before
        load_reslora(tiny_llama(torch.float32, layers=2), tmp_path)
    # The same number of layers loads.
    assert len(reslora_summary(load_reslora(tiny_llama(torch.float32, layers=3), tmp_path)).replaced) == 21


# ---------------------------------------------------------------------------- an incomplete config
def rewrite_config(tmp_path, edit):
    """Edit the saved config and re-hash it, as a tool writing its own config would."""
    path = tmp_path / CONFIG_NAME
    meta = json.loads(path.read_text())
    edit(meta)
    meta["sha256"]["config"] = _meta_sha256(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda meta: meta.pop("chains"), "it has no 'chains' entry"),
        (lambda meta: meta.pop("blocks"), "it has no 'blocks' entry"),
        (lambda meta: meta.pop("config"), "it has no 'config' entry"),
        (lambda meta: meta.update(blocks=[]), "'blocks' is not a non-empty list"),
        (lambda meta: meta["blocks"][0].pop("rank"), "the block record .* does not have exactly the fields"),
        (lambda meta: meta.update(chains={}), "'chains' is not a list"),
        (lambda meta: meta["chains"][0].pop("blocks"), r"the chain record .* is not \{'name': str, 'blocks'"),
        (lambda meta: meta.update(config=[1]), "'config' is a list"),
    ],
)
def test_incomplete_config_is_a_clear_error(tmp_path, edit, match):
    trained_adapter(tmp_path)
    rewrite_config(tmp_path, edit)
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME} is not a complete ResLoRA adapter config: {match}"):
        load_reslora(tiny_llama(torch.float32), tmp_path)


# ---------------------------------------------------------------------------- to_empty
def test_to_empty_gives_initialised_adapters(monkeypatch):
    torch.manual_seed(0)
    reference = tiny_llama(torch.float32)
    with torch.device("meta"):
        model = tiny_llama(torch.float32)
    apply_reslora(model, ResLoRAConfig(mode="is", rank=4, alpha=8, target_modules=LLAMA_TARGETS))
    assert all(p.is_meta for p in model.parameters())
    poison_empty_like(monkeypatch)
    model.to_empty(device="cpu")
    base = {key.replace(".base_layer.", "."): key for key in model.state_dict()}
    missing = model.load_state_dict({base[k]: v for k, v in reference.state_dict().items()}, strict=False).missing_keys
    assert all(key.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or ".statistics." in key for key in missing)
    reference_buffers = dict(reference.named_buffers())  # non-persistent ones (rotary inv_freq) too
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in reference_buffers:
                buffer.copy_(reference_buffers[name])
    blocks = [m for m in model.modules() if isinstance(m, FusedResLoRALinear)]
    assert len(blocks) == 21
    for block in blocks:
        bound = 1 / block.in_features**0.5  # kaiming-uniform with a = sqrt(5)
        assert torch.isfinite(block.lora_A).all() and block.lora_A.abs().max() <= bound and block.lora_A.any()
        assert not block.lora_B.any()
        assert int(block.statistics.norm_count) == 0
    # lora_B = 0: the model is its base, and it trains.
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=0)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    assert all(torch.isfinite(b.lora_A.grad).all() and b.lora_B.grad.abs().sum() > 0 for b in blocks)
