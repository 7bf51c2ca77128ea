"""apply_reslora, load_reslora, merge_and_unload, save and export either succeed or leave the model
(and the files) exactly as they were: every failure below is checked against a full snapshot."""

import json

import pytest
import torch
import torch.nn as nn
from helpers import Net
from safetensors.torch import load_file, save_file

import reslora_kernels.apply as apply_module
import reslora_kernels.transaction as transaction
from reslora_kernels import (
    FusedResLoRALinear,
    ResLoRAConfig,
    apply_reslora,
    export_peft_adapter,
    load_reslora,
    merge_and_unload,
    save_reslora,
)
from reslora_kernels.io import CONFIG_NAME, WEIGHTS_NAME, _meta_sha256, _sha256


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Bytes, so that NaN compares equal to itself.
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


def snapshot(model: nn.Module) -> dict:
    """Everything a failed operation must leave alone: the module tree (names, types, objects),
    every parameter (object, dtype, shape, bytes, requires_grad), every buffer, the chains and the
    model's attributes."""
    blocks = [m for m in model.modules() if isinstance(m, FusedResLoRALinear)]
    return {
        "tree": [(name, type(mod), id(mod)) for name, mod in model.named_modules(remove_duplicate=False)],
        "params": {
            name: (id(p), p.dtype, tuple(p.shape), _bits(p), p.requires_grad)
            for name, p in model.named_parameters(remove_duplicate=False)
        },
        "buffers": {name: (b.dtype, tuple(b.shape), _bits(b)) for name, b in model.named_buffers()},
        "chains": [(id(b.chain), b.chain_index, len(b.chain)) for b in blocks],
        "attrs": sorted(vars(model)),
        "config": vars(model).get("reslora_config"),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["tree"] == before["tree"]
    assert after["params"].keys() == before["params"].keys()
    for name, (pid, dtype, shape, bits, grad) in before["params"].items():
        apid, adtype, ashape, abits, agrad = after["params"][name]
        assert (apid, adtype, ashape, agrad) == (pid, dtype, shape, grad), name
        assert torch.equal(abits, bits), name
    assert after["buffers"].keys() == before["buffers"].keys()
    for name, (dtype, shape, bits) in before["buffers"].items():
        assert after["buffers"][name][:2] == (dtype, shape) and torch.equal(after["buffers"][name][2], bits), name
    assert after["chains"] == before["chains"]
    assert after["attrs"] == before["attrs"] and after["config"] is before["config"]


def trained(mode="is", autocast_adapter_dtype=True, **kwargs):
    torch.manual_seed(0)
    config = ResLoRAConfig(
        mode=mode, rank=2, target_modules=["proj", "out"], autocast_adapter_dtype=autocast_adapter_dtype
    )
    model = apply_reslora(Net(**kwargs), config)
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, FusedResLoRALinear):
                block.lora_B.normal_(0.0, 0.3)
    model.train()
    for _ in range(2):
        model(torch.randn(4, 6, dtype=model.layers[0]["proj"].weight.dtype))
    return model


# ---------------------------------------------------------------------------- apply_reslora
def _weight_norm(model):
    torch.nn.utils.parametrizations.weight_norm(model.layers[1]["proj"])


def _forward_hook(model):
    model.layers[2]["proj"].register_forward_hook(lambda *args: None)


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def _own_forward(model):
    model.layers[1]["proj"] = OwnForward(6, 6, dtype=torch.float64)


@pytest.mark.parametrize(
    "break_model, match",
    [
        (_weight_norm, r"layers.1.proj is parametrized .*remove_parametrizations"),
        (_forward_hook, r"layers.2.proj has module hooks \(_forward_hooks\)"),
        (_own_forward, r"layers.1.proj \(OwnForward\) has a forward of its own"),
    ],
)
def test_apply_refuses_unsupported_targets_and_changes_nothing(break_model, match):
    model = Net()
    break_model(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        apply_reslora(model, ResLoRAConfig(mode="is", target_modules=["proj"]))
    assert_unchanged(model, before)


def test_apply_failing_half_way_is_rolled_back(monkeypatch):
    model = Net()
    model.head.weight.requires_grad_(False)  # a flag the rollback must restore as it was, not to True
    before = snapshot(model)
    calls = []

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("link failed")
        return link_chain(*args, **kwargs)

    link_chain = apply_module.link_chain
    monkeypatch.setattr(apply_module, "link_chain", fail_on_second)
    with pytest.raises(RuntimeError, match="link failed"):
        apply_reslora(model, ResLoRAConfig(mode="ms", target_modules=["proj", "out"]))
    assert_unchanged(model, before)
    monkeypatch.undo()
    apply_reslora(model, ResLoRAConfig(mode="ms", target_modules=["proj", "out"]))  # and it still works


# ---------------------------------------------------------------------------- save / load
def rewrite_adapter(path, tensors=None, meta=None):
    """Change an adapter's tensors and/or config and re-sign it, to reach the checks behind the checksums."""
    meta = json.loads((path / CONFIG_NAME).read_text()) if meta is None else meta
    if tensors is not None:
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    meta["sha256"] = {"weights": _sha256((path / WEIGHTS_NAME).read_bytes())}
    meta["sha256"]["config"] = _meta_sha256(meta)
    (path / CONFIG_NAME).write_text(json.dumps(meta))


def _drop_tensor(path):
    tensors = load_file(str(path / WEIGHTS_NAME))
    del tensors["layers.2.out.lora_B"]
    rewrite_adapter(path, tensors)


def _bad_shape(path):
    tensors = load_file(str(path / WEIGHTS_NAME))
    tensors["layers.1.proj.lora_A"] = torch.zeros(3, 6, dtype=torch.float64)
    rewrite_adapter(path, tensors)


def _nan_adapter(path):
    tensors = load_file(str(path / WEIGHTS_NAME))
    tensors["layers.1.out.lora_B"][0, 0] = float("nan")
    rewrite_adapter(path, tensors)


def _negative_statistics(path):
    tensors = load_file(str(path / WEIGHTS_NAME))
    tensors["layers.0.proj.norm_sq_window"][0] = -1.0
    rewrite_adapter(path, tensors)


def _lossy_dtype(path):
    tensors = load_file(str(path / WEIGHTS_NAME))
    tensors["layers.0.proj.lora_A"] = tensors["layers.0.proj.lora_A"].to(torch.int64)
    rewrite_adapter(path, tensors)


def _flip_a_bit(path):
    data = bytearray((path / WEIGHTS_NAME).read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes
    (path / WEIGHTS_NAME).write_bytes(bytes(data))


def _edit_config(path):
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta["config"]["alpha"] = 17.0
    (path / CONFIG_NAME).write_text(json.dumps(meta))


def _not_json(path):
    (path / CONFIG_NAME).write_text("{ not json")


def _unknown_block(path):
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta["blocks"][0]["name"] = "layers.7.proj"
    rewrite_adapter(path, meta=meta)


LOAD_FAILURES = [
    (_drop_tensor, r"tensors missing \['layers.2.out.lora_B'\]"),
    (_bad_shape, r"layers.1.proj.lora_A is \(3, 6\), the model's is \(2, 6\)"),
    (_nan_adapter, r"layers.1.out.lora_B holds Inf/NaN"),
    (_negative_statistics, r"layers.0.proj.norm_sq_window holds negative values"),
    (_lossy_dtype, r"layers.0.proj.lora_A is torch.int64 but the model's is torch.float64"),
    (_flip_a_bit, r"does not match the SHA-256 checksum recorded in .*corrupted"),
    (_edit_config, r"does not match its SHA-256 checksum: the file is corrupted or was edited"),
    (_not_json, r"is not valid JSON"),
]


@pytest.mark.parametrize(
    "corrupt, match", LOAD_FAILURES + [(_unknown_block, r"the model has no module 'layers.7.proj'")]
)
def test_failed_load_into_a_fresh_model_changes_nothing(tmp_path, corrupt, match):
    save_reslora(trained(), tmp_path)
    corrupt(tmp_path)
    fresh = Net()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        load_reslora(fresh, tmp_path)
    assert_unchanged(fresh, before)


@pytest.mark.parametrize("corrupt, match", LOAD_FAILURES)
def test_failed_load_into_a_model_with_blocks_changes_nothing(tmp_path, corrupt, match):
    save_reslora(trained(), tmp_path)
    corrupt(tmp_path)
    torch.manual_seed(5)
    target = trained()  # other adapters and statistics, that must survive the failed load
    before = snapshot(target)
    with pytest.raises(ValueError, match=match):
        load_reslora(target, tmp_path)
    assert_unchanged(target, before)


@pytest.mark.parametrize("fresh", [True, False])
def test_load_failing_half_way_is_rolled_back(tmp_path, monkeypatch, fresh):
    save_reslora(trained(), tmp_path)
    torch.manual_seed(5)
    target = Net() if fresh else trained()
    before = snapshot(target)
    copy_ = transaction.ModelTransaction.copy_
    calls = []

    def fail_late(self, target_tensor, source):
        calls.append(1)
        if len(calls) == 10:
            raise RuntimeError("copy failed")
        copy_(self, target_tensor, source)

    monkeypatch.setattr(transaction.ModelTransaction, "copy_", fail_late)
    with pytest.raises(RuntimeError, match="copy failed"):
        load_reslora(target, tmp_path)
    assert_unchanged(target, before)


def test_lossless_dtype_widening_loads(tmp_path):
    model = trained(dtype=torch.bfloat16, autocast_adapter_dtype=False)  # bfloat16 adapters
    assert model.layers[1]["out"].lora_B.dtype == torch.bfloat16
    save_reslora(model, tmp_path)
    wide = Net(dtype=torch.float32)
    load_reslora(wide, tmp_path)
    assert torch.equal(wide.layers[1]["out"].lora_B, model.layers[1]["out"].lora_B.float())
    # float32 adapters load into a bfloat16 model whose adapters are float32 (the default) ...
    save_reslora(trained(dtype=torch.float32), tmp_path)
    kept = load_reslora(Net(dtype=torch.bfloat16), tmp_path)
    assert kept.layers[1]["out"].lora_B.dtype == torch.float32
    # ... and not into bfloat16 adapters.
    config = ResLoRAConfig(mode="is", rank=2, target_modules=["proj", "out"], autocast_adapter_dtype=False)
    narrow = apply_reslora(Net(dtype=torch.bfloat16), config)
    with pytest.raises(ValueError, match=r"is torch.float32 but the model's is torch.bfloat16, which cannot hold it"):
        load_reslora(narrow, tmp_path)


def test_save_refuses_non_finite_adapters_and_writes_nothing(tmp_path):
    model = trained()
    with torch.no_grad():
        model.layers[1]["proj"].lora_A[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"cannot save: layers.1.proj.lora_A holds Inf/NaN"):
        save_reslora(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_save_replaces_a_previous_adapter_whole(tmp_path):
    save_reslora(trained(), tmp_path)
    torch.manual_seed(3)
    second = trained()
    save_reslora(second, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temporaries left
    fresh = load_reslora(Net(), tmp_path)
    assert torch.equal(fresh.layers[0]["proj"].lora_B, second.layers[0]["proj"].lora_B)


def test_old_format_is_refused_with_its_reason(tmp_path):
    save_reslora(trained(), tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["format_version"] = 1
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(
        ValueError, match=r"format_version 1, expected 2 \(written before adapter files carried checksums"
    ):
        load_reslora(Net(), tmp_path)


# ---------------------------------------------------------------------------- merge_and_unload
def test_non_finite_adapter_refuses_to_merge_naming_the_block():
    model = trained("bs")
    with torch.no_grad():
        model.layers[1]["out"].lora_A[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"merging layers.1.out gives non-finite weights: its lora_A or lora_B holds Inf/NaN"
    ):
        merge_and_unload(model)
    assert_unchanged(model, before)
    merged = merge_and_unload(model, safe_merge=False)  # asked for: merged as it comes
    assert merged.layers[1]["out"].weight.isnan().any() and type(merged.layers[1]["out"]) is nn.Linear


def test_non_finite_statistics_refuse_to_merge_naming_the_block():
    model = trained("is")
    with torch.no_grad():
        model.layers[1]["proj"].statistics.norm_sq_window[0] = float("inf")  # a statistic gone bad by hand
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"the norm statistics of layers.1.proj \(chain 'layers.\*.proj'\) hold Inf/NaN"
    ):
        merge_and_unload(model)
    assert_unchanged(model, before)
    merge_and_unload(model, method="weight_norm")  # a method that does not read them merges


def test_overflowing_fold_refuses_to_merge():
    model = trained("none", dtype=torch.float16)
    with torch.no_grad():
        model.layers[0]["out"].lora_B.fill_(200.0)
        model.layers[0]["out"].lora_A.fill_(200.0)
    with pytest.raises(
        ValueError, match=r"layers.0.out gives non-finite weights: the folded weight overflows torch.float16"
    ):
        merge_and_unload(model)


def test_merge_failing_half_way_is_rolled_back(monkeypatch):
    model = trained("ms")
    before = snapshot(model)
    set_module = transaction.set_module
    calls = []

    def fail_late(*args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("swap failed")
        set_module(*args)

    monkeypatch.setattr(transaction, "set_module", fail_late)
    with pytest.raises(RuntimeError, match="swap failed"):
        merge_and_unload(model)
    assert_unchanged(model, before)


def test_merge_gives_back_the_original_modules():
    model = Net()
    originals = [layer["proj"] for layer in model.layers]
    weights = [m.weight for m in originals]
    apply_reslora(model, ResLoRAConfig(mode="bs", target_modules=["proj"]))
    merge_and_unload(model)
    assert [layer["proj"] for layer in model.layers] == originals
    assert [m.weight for m in originals] == weights and not any(w.requires_grad for w in weights)


def test_blocks_sharing_a_weight_refuse_to_merge():
    model = trained("none")
    model.layers[1]["proj"].base_layer.weight = model.layers[0]["proj"].base_layer.weight
    with pytest.raises(ValueError, match=r"layers.1.proj.base_layer.weight is tied to layers.0.proj.base_layer.weight"):
        merge_and_unload(model)


# ---------------------------------------------------------------------------- export
def test_export_refuses_a_bare_layer_and_non_finite_terms(tmp_path):
    layer = FusedResLoRALinear(4, 4, mode="none")
    with pytest.raises(ValueError, match=r"bare FusedResLoRALinear has no module name .*nn.Sequential"):
        export_peft_adapter(layer, tmp_path / "bare")
    export_peft_adapter(nn.Sequential(layer), tmp_path / "wrapped")
    assert json.loads((tmp_path / "wrapped" / "adapter_config.json").read_text())["target_modules"] == ["0"]
    model = trained("is")
    with torch.no_grad():
        model.layers[0]["out"].lora_B[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"cannot export layers.0.out: its merged lora_B holds Inf/NaN"):
        export_peft_adapter(model, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
