"""Wrapped models (DDP, FSDP, FSDP2, torch.compile) and meta-device construction: save, load,
merge, report, export and summary work through the wrappers and write files a bare model loads."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from helpers import Net, poison_empty_like

from reslora_kernels import (
    FusedResLoRALinear,
    ResLoRAConfig,
    apply_reslora,
    export_peft_adapter,
    load_reslora,
    merge_and_unload,
    merge_report,
    reslora_summary,
    save_reslora,
)

CONFIG = ResLoRAConfig(mode="is", rank=2, target_modules=["proj", "out"])
PROBE = torch.linspace(-1.0, 1.0, 24).reshape(4, 6)


def base_model() -> Net:
    """The same base weights every time (the workers build theirs the same way)."""
    torch.manual_seed(0)
    return Net(dtype=torch.float32)


def adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ResLoRA tensors of a bare model, by name."""
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "norm_sq_window", "norm_count", "norm_nonfinite")
    }


def train(model: nn.Module, seed: int, steps: int = 2) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    model.train()
    for step in range(steps):
        torch.manual_seed(seed + step)
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _expect_error(fn, match: str) -> None:
    try:
        fn()
    except ValueError as err:
        assert match in str(err), str(err)
    else:
        raise AssertionError(f"no error, expected {match!r}")


def _worker(rank: int, world: int, init_method: str, out: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.nn.parallel import DistributedDataParallel

    out = Path(out)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        # DDP: every entry point on the wrapper.
        model = apply_reslora(base_model(), CONFIG)
        ddp = DistributedDataParallel(model)
        _expect_error(lambda: apply_reslora(DistributedDataParallel(Net()), CONFIG), "apply ResLoRA before wrapping")
        train(ddp, seed=100 + 10 * rank)
        if rank == 0:
            save_reslora(ddp, out / "ddp")
            torch.save(adapters(model), out / "ddp_expected.pt")
            export_peft_adapter(ddp, out / "ddp_peft", "weight_norm")
            results = {
                "summary": reslora_summary(ddp).replaced,
                "report": sorted(merge_report(ddp, [PROBE])),
            }
            merged = merge_and_unload(ddp, "weight_norm")
            results["merged_is_bare"] = merged is model and not any(
                isinstance(m, FusedResLoRALinear) for m in merged.modules()
            )
            with torch.no_grad():
                torch.save(merged.eval()(PROBE), out / "ddp_merged_output.pt")
            (out / "ddp_results.json").write_text(json.dumps(results))

        # FSDP (1), each block its own unit: names carry _fsdp_wrapped_module.
        model = apply_reslora(base_model(), CONFIG)
        fsdp = FullyShardedDataParallel(
            model, auto_wrap_policy=ModuleWrapPolicy({FusedResLoRALinear}), use_orig_params=True, device_id="cpu"
        )
        train(fsdp, seed=200 + 10 * rank)
        save_reslora(fsdp, out / f"fsdp_rank{rank}")
        assert reslora_summary(fsdp).replaced == [f"layers.{i}.{p}" for i in range(3) for p in ("proj", "out")]
        with FullyShardedDataParallel.summon_full_params(fsdp, writeback=False):
            # Per rank: the adapters agree across ranks, the norm statistics are each rank's own.
            torch.save(adapters(model), out / f"fsdp_expected_rank{rank}.pt")
        _expect_error(lambda: merge_and_unload(fsdp), "sharded by FSDP")
        _expect_error(lambda: merge_report(fsdp, [PROBE]), "sharded by FSDP")
        _expect_error(lambda: load_reslora(fsdp, out / f"fsdp_rank{rank}"), "load ResLoRA before sharding")

        # FSDP2 (fully_shard): parameters are DTensors.
        model = apply_reslora(base_model(), CONFIG)
        fully_shard(model)
        train(model, seed=300 + 10 * rank)
        save_reslora(model, out / f"fsdp2_rank{rank}")
        expected = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in adapters(model).items()}
        torch.save(expected, out / f"fsdp2_expected_rank{rank}.pt")
        _expect_error(lambda: export_peft_adapter(model, out / "no"), "sharded by FSDP2")
    finally:
        dist.destroy_process_group()


def _rendezvous(tmp_path: Path) -> str:
    """A file rendezvous for the process group: a fresh file per test, so no two runs (or tests
    running at once) can race for a TCP port."""
    return (tmp_path / "rendezvous").resolve().as_uri()


def _assert_adapters_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys() and got
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_ddp_and_fsdp_wrapped_models_on_gloo(tmp_path):
    """Two CPU processes: DDP, FSDP and FSDP2 train, save and (DDP) merge, report and export
    through their wrappers; every file loads into a bare model bit-exactly."""
    mp.spawn(_worker, args=(2, _rendezvous(tmp_path), str(tmp_path)), nprocs=2, join=True)

    bare = load_reslora(base_model(), tmp_path / "ddp")
    _assert_adapters_equal(adapters(bare), torch.load(tmp_path / "ddp_expected.pt"))
    meta = json.loads((tmp_path / "ddp" / "reslora_config.json").read_text())
    assert meta["config"] == CONFIG.to_dict()  # not null: read from the model inside DDP
    results = json.loads((tmp_path / "ddp_results.json").read_text())
    assert results["summary"][0] == "layers.0.proj" and results["merged_is_bare"]
    assert results["report"] == ["input_norm", "weight_norm"]
    peft_config = json.loads((tmp_path / "ddp_peft" / "adapter_config.json").read_text())
    assert sorted(peft_config["target_modules"]) == sorted(f"layers.{i}.{p}" for i in range(3) for p in ("proj", "out"))
    merged = merge_and_unload(bare, "weight_norm")  # the wrapped merge is the bare model's merge
    with torch.no_grad():
        assert torch.equal(merged.eval()(PROBE), torch.load(tmp_path / "ddp_merged_output.pt"))

    for kind in ("fsdp", "fsdp2"):
        for rank in range(2):
            loaded = load_reslora(base_model(), tmp_path / f"{kind}_rank{rank}")
            _assert_adapters_equal(adapters(loaded), torch.load(tmp_path / f"{kind}_expected_rank{rank}.pt"))


BS_CONFIG = ResLoRAConfig(mode="bs", rank=2, pre_num=-1, target_modules=["proj", "out"])


def _bs_model() -> nn.Module:
    model = apply_reslora(base_model(), BS_CONFIG)
    with torch.no_grad():
        for block in (m for m in model.modules() if isinstance(m, FusedResLoRALinear)):
            block.lora_B.normal_()  # B = 0 would hide the sum over the earlier blocks
    return model


def _bs_worker(rank: int, world: int, init_method: str, out: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    results = {}
    try:
        x = torch.linspace(-1.0, 1.0, 24).reshape(4, 6)  # the same batch on both ranks
        # One unit per block: a later block's forward finds the earlier blocks resharded.
        per_block = {
            "fsdp": lambda m: FullyShardedDataParallel(
                m, auto_wrap_policy=ModuleWrapPolicy({FusedResLoRALinear}), use_orig_params=True, device_id="cpu"
            ),
            "fsdp2": lambda m: [fully_shard(b) for b in m.modules() if isinstance(b, FusedResLoRALinear)]
            and fully_shard(m),
        }
        for kind, wrap in per_block.items():
            try:
                wrap(_bs_model())(x)
            except RuntimeError as err:
                results[kind] = str(err)
            else:
                results[kind] = None
        # The whole chain in one FSDP2 unit: bs trains, its gradients those of the bare model.
        model = _bs_model()
        bare = _bs_model()
        fully_shard(model)
        model(x).square().mean().backward()
        bare(x).square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results["one_unit_grads"] = len(grads) == 12 and all(
            torch.allclose(g.full_tensor(), bare.get_parameter(n).grad, rtol=1e-5, atol=1e-6) for n, g in grads.items()
        )
        if rank == 0:
            (Path(out) / "bs_results.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_bs_under_per_layer_fsdp_is_refused_and_one_unit_trains(tmp_path):
    """bs sums earlier blocks' adapters; FSDP/FSDP2 with a unit per layer has resharded them by then.
    Before: FSDP2 raised "aten.cat.default got mixed torch.Tensor and DTensor" from inside the block,
    FSDP "Tensors must have same number of dimensions: got 2 and 1"."""
    mp.spawn(_bs_worker, args=(2, _rendezvous(tmp_path), str(tmp_path)), nprocs=2, join=True)
    results = json.loads((tmp_path / "bs_results.json").read_text())
    for kind in ("fsdp", "fsdp2"):
        assert results[kind] is not None, kind
        assert results[kind].startswith(
            "layers.1.proj (block 1 of chain 'layers.*.proj', mode 'bs') sums the adapters of layers.0.proj, "
            "which FSDP has resharded"
        ), results[kind]
        assert "one unit" in results[kind] and "mode 'is' or 'ms'" in results[kind]
    assert results["one_unit_grads"]


def test_torch_compile_wrapped_model(tmp_path):
    model = apply_reslora(base_model(), CONFIG)
    compiled = torch.compile(model, backend="eager")  # the wrapper is what matters, not the codegen
    train(compiled, seed=7)
    assert reslora_summary(compiled).replaced == reslora_summary(model).replaced
    save_reslora(compiled, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "reslora_config.json").read_text())
    assert meta["config"] == CONFIG.to_dict() and meta["blocks"][0]["name"] == "layers.0.proj"
    export_peft_adapter(compiled, tmp_path / "peft", "weight_norm")
    assert "_orig_mod" not in (tmp_path / "peft" / "adapter_config.json").read_text()
    assert set(merge_report(compiled, [PROBE])) == {"input_norm", "weight_norm"}

    bare = load_reslora(base_model(), tmp_path / "adapter")
    _assert_adapters_equal(adapters(bare), adapters(model))
    reloaded = load_reslora(torch.compile(base_model(), backend="eager"), tmp_path / "adapter")
    _assert_adapters_equal(adapters(reloaded._orig_mod), adapters(model))

    merged = merge_and_unload(compiled)
    assert merged is model and not any(isinstance(m, FusedResLoRALinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(PROBE), merge_and_unload(bare).eval()(PROBE), rtol=0, atol=0)


# ---------------------------------------------------------------------------- meta device
def _meta_model():
    with torch.device("meta"):
        model = Net(dtype=torch.float32)
    return apply_reslora(model, ResLoRAConfig(mode="is", rank=2, target_modules=["proj", "out"]))


def _materialised(monkeypatch):
    model = _meta_model()
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    poison_empty_like(monkeypatch)
    return model.to_empty(device="cpu")  # every value poisoned: NaN floats, -1 ints


def test_to_empty_alone_gives_empty_statistics(monkeypatch):
    model = _materialised(monkeypatch)
    for block in (m for m in model.modules() if isinstance(m, FusedResLoRALinear)):
        assert int(block.statistics.norm_count) == 0 and int(block.statistics.norm_nonfinite) == 0
        assert torch.equal(block.statistics.norm_sq_window, torch.zeros_like(block.statistics.norm_sq_window))
        # The adapter is initialised as the constructor does (no reset_parameters() call needed).
        assert torch.isfinite(block.lora_A).all() and block.lora_A.any() and not block.lora_B.any()


def test_meta_init_materialise_train_merge(monkeypatch):
    model = _materialised(monkeypatch)
    with torch.no_grad():
        for block in (m for m in model.modules() if isinstance(m, FusedResLoRALinear)):
            block.statistics.norm_count.fill_(123456)  # garbage a reset must clear too
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    blocks = [m for m in model.modules() if isinstance(m, FusedResLoRALinear)]
    assert all(int(b.statistics.norm_count) == 0 and not b.statistics.norm_sq_window.any() for b in blocks)
    assert all(torch.isfinite(b.lora_A).all() and not b.lora_B.any() for b in blocks)
    with pytest.warns(UserWarning, match="no training forward recorded norm statistics"):
        merge_report(model, [PROBE], ["input_norm"])

    twin = apply_reslora(Net(dtype=torch.float32), ResLoRAConfig(mode="is", rank=2, target_modules=["proj", "out"]))
    twin.load_state_dict(model.state_dict())
    train(model, seed=11, steps=3)
    train(twin, seed=11, steps=3)
    assert all(int(b.statistics.norm_count) == 3 for b in blocks)
    merge_and_unload(model)
    merge_and_unload(twin)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.isfinite(a).all() and torch.equal(a, b), name
