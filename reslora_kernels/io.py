"""Adapters on disk: save and load ResLoRA adapters (peft_export.py writes them in PEFT's format)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .apply import check_wrapping, execute_plan, plan_reslora
from .base_layers import base_dtype, base_features
from .targets import matched_targets, module_names
from .config import ResLoRAConfig
from .layer import FusedResLoRALinear
from .merge_methods import chains_of
from .model_utils import (
    MERGED_ADAPTERS_ATTR,
    adapter_fingerprint,
    clean_name,
    reslora_blocks,
    saved_modules,
    sharded_by,
    unwrap_model,
    whole_parameters,
)
from .transaction import ModelTransaction

__all__ = ["save_reslora", "load_reslora", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "reslora_config.json"
WEIGHTS_NAME = "reslora_adapter.safetensors"
_FORMAT_VERSION = 2


def _block_record(name: str, layer: FusedResLoRALinear) -> dict:
    return {
        "name": name,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "rank": layer.rank,
        "alpha": layer.alpha,
        "dropout": layer.dropout,
        "mode": layer.mode,
        "pre_num": layer.pre_num,
        "norm_window": layer.norm_window,
        "use_rslora": layer.use_rslora,
    }



def _chain_records(blocks: list[tuple[str, FusedResLoRALinear]]) -> list[dict]:
    names = {id(layer): name for name, layer in blocks}
    return [
        {"name": chain.name, "blocks": [names.get(id(b), "<outside the model>") for b in chain]}
        for chain in chains_of(blocks)
        if len(chain) > 1
    ]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _meta_sha256(meta: dict) -> str:
    """The checksum of an adapter config: its content without the checksum entry, canonically."""
    return _sha256(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())


def _write_atomically(files: dict[Path, bytes]) -> None:
    """Write every file beside its destination first, then move them into place, so that an
    interrupted write never leaves a truncated file under the final name (a crash between the
    moves leaves a pair whose checksums disagree, which :func:`load_reslora` reports)."""
    staged = []
    try:
        for path, data in files.items():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            staged.append(tmp)
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for tmp, path in zip(staged, files):
            os.replace(tmp, path)
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)


def _check_finite(what: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{what} holds Inf/NaN")


def save_reslora(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter (``lora_A``, ``lora_B`` and the merge statistics of every block, and the
    state of every module to save, under ``<module>.<key>``) to ``path/reslora_adapter.safetensors``
    and the config, block list, chains, modules to save and the SHA-256 of both to
    ``path/reslora_config.json``. :func:`load_reslora` reads them back bit-exactly. The base
    model's weights are not written.

    Refuses (before writing anything) an adapter holding Inf/NaN; the files are written beside
    their destination and moved into place, so an interrupted save never leaves a truncated file.
    A wrapped model (DDP, FSDP or FSDP2, torch.compile) is saved under its bare names, so the
    files load into the bare model; under FSDP every rank gathers the adapters (call it on one rank
    or on all; the files are the same).
    """
    from safetensors.torch import save

    blocks = reslora_blocks(model)
    if not blocks:
        raise ValueError("the model has no ResLoRA layers to save")
    saved = saved_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    with whole_parameters(model):
        states = [(name, layer.adapter_state_dict()) for name, layer in blocks]
        states += [(name, wrapper.trained_module.state_dict()) for name, wrapper in saved]
        for name, state in states:
            for key, tensor in state.items():
                tensor = tensor.detach()
                if hasattr(tensor, "full_tensor"):  # an FSDP2 (DTensor) shard: gather it
                    tensor = tensor.full_tensor()
                _check_finite(f"cannot save: {name}.{key}", tensor)
                # A copy: under FSDP the gathered storage is freed when the context ends.
                tensors[f"{name}.{key}"] = tensor.to("cpu", copy=True).contiguous()
    config = getattr(unwrap_model(model), "reslora_config", None)
    meta = {
        "format_version": _FORMAT_VERSION,
        "config": config.to_dict() if config is not None else None,
        "blocks": [_block_record(name, layer) for name, layer in blocks],
        "chains": _chain_records(blocks),
        "modules_to_save": [name for name, _ in saved],
    }
    weights = save(tensors, metadata={"format": "pt"})
    meta["sha256"] = {"weights": _sha256(weights)}
    meta["sha256"]["config"] = _meta_sha256(meta)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomically({out / WEIGHTS_NAME: weights, out / CONFIG_NAME: (json.dumps(meta, indent=2) + "\n").encode()})


#: The fields of a block record (:func:`_block_record`).
_BLOCK_FIELDS = frozenset(
    ("name", "in_features", "out_features", "rank", "alpha", "dropout", "mode", "pre_num", "norm_window", "use_rslora")
)


def _check_meta(config_file: Path, meta: dict) -> None:
    """The entries :func:`load_reslora` reads are there and of their types (a config written by
    another tool, or edited and re-hashed, must fail here with its name, not with a KeyError)."""

    def bad(what: str) -> ValueError:
        return ValueError(f"{config_file} is not a complete ResLoRA adapter config: {what}")

    for key in ("config", "blocks", "chains"):
        if key not in meta:
            raise bad(f"it has no {key!r} entry")
    if meta["config"] is not None and not isinstance(meta["config"], dict):
        raise bad(f"'config' is a {type(meta['config']).__name__}, not an object or null")
    blocks, chains = meta["blocks"], meta["chains"]
    if not isinstance(blocks, list) or not blocks:
        raise bad("'blocks' is not a non-empty list")
    for record in blocks:
        if not isinstance(record, dict) or set(record) != _BLOCK_FIELDS or not isinstance(record["name"], str):
            raise bad(f"the block record {record!r} does not have exactly the fields {sorted(_BLOCK_FIELDS)}")
    if not isinstance(chains, list):
        raise bad("'chains' is not a list")
    for chain in chains:
        if (
            not isinstance(chain, dict)
            or not isinstance(chain.get("name"), str)
            or not isinstance(chain.get("blocks"), list)
            or not all(isinstance(name, str) for name in chain["blocks"])
        ):
            raise bad(f"the chain record {chain!r} is not {{'name': str, 'blocks': [str, ...]}}")


def _read_adapter(src: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and the tensors of an adapter directory, both checked against their checksums."""
    from safetensors.torch import load

    config_file, weights_file = src / CONFIG_NAME, src / WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"{src} does not hold {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        meta = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}): the file is corrupted") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{config_file} is not a ResLoRA adapter config")
    version = meta.get("format_version")
    if version != _FORMAT_VERSION:
        hint = " (written before adapter files carried checksums: re-save it with that version)" if version == 1 else ""
        raise ValueError(f"{config_file} has format_version {version!r}, expected {_FORMAT_VERSION}{hint}")
    sha = meta.get("sha256")
    if not isinstance(sha, dict) or _meta_sha256(meta) != sha.get("config"):
        raise ValueError(f"{config_file} does not match its SHA-256 checksum: the file is corrupted or was edited")
    # Files written before rsLoRA and modules_to_save existed hold neither: they had none.
    for record in meta.get("blocks") or []:
        if isinstance(record, dict):
            record.setdefault("use_rslora", False)
    _check_meta(config_file, meta)
    data = weights_file.read_bytes()
    if _sha256(data) != sha.get("weights"):
        raise ValueError(
            f"{weights_file} does not match the SHA-256 checksum recorded in {config_file}: "
            "the file is corrupted or belongs to another save"
        )
    meta.setdefault("modules_to_save", [])
    return meta, load(data)


def _loadable(saved: torch.dtype, target: torch.dtype) -> bool:
    """Whether values of dtype ``saved`` fit ``target`` exactly (the same dtype, or a lossless
    widening such as bfloat16 -> float32)."""
    if saved == target:
        return True
    both_float = saved.is_floating_point and target.is_floating_point
    return both_float and torch.promote_types(saved, target) == target


def _expected_tensors(name: str, layer: FusedResLoRALinear) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": t for key, t in layer.adapter_state_dict(keep_vars=True).items()}


def _expected_saved(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a module to save (its trained copy, or the module it will be copied from)."""
    return {f"{name}.{key}": t for key, t in module.state_dict(keep_vars=True).items()}


def _check_tensors(
    file: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], statistics: set[str]
) -> None:
    """Every tensor the model needs is in the file with its shape, a dtype it can take without
    loss, and valid values; nothing else is."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{file}: tensors missing {missing}, unexpected {unexpected}")
    for key, target in expected.items():
        source = tensors[key]
        if source.shape != target.shape:
            raise ValueError(f"{file}: {key} is {tuple(source.shape)}, the model's is {tuple(target.shape)}")
        if not _loadable(source.dtype, target.dtype):
            raise ValueError(
                f"{file}: {key} is {source.dtype} but the model's is {target.dtype}, which cannot hold it "
                f"exactly; convert the model to {source.dtype} (model.to(...)) before loading"
            )
        _check_finite(f"{file}: {key}", source)
        if key in statistics and bool((source < 0).any()):
            raise ValueError(f"{file}: {key} holds negative values; merge statistics are squared norms and counts")


def _check_same_targets(
    model: nn.Module, config: ResLoRAConfig, saved: list[str], to_save_names: set[str], src: Path
) -> None:
    """The saved config's ``target_modules`` choose in ``model`` exactly the blocks the adapter
    holds (the modules to save left out, as apply_reslora leaves them out): an adapter of 3 layers
    does not go into a 4-layer model, leaving the fourth untrained."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # all-linear's notes were given when it was applied
        try:
            matched = matched_targets(model, module_names(model), config, to_save_names)
            chosen = [clean_name(names[0]) for names, _ in matched]
        except ValueError as err:
            raise ValueError(
                f"{src} does not fit this model: its target_modules choose no blocks here ({err})"
            ) from None
    extra, absent = sorted(set(chosen) - set(saved)), sorted(set(saved) - set(chosen))
    if extra or absent:
        raise ValueError(
            f"{src} does not fit this model: it holds {len(saved)} blocks, but its target_modules "
            f"{config.target_modules!r} choose {len(chosen)} here; without an adapter in the file: {extra}; "
            f"not chosen here: {absent}. Load it into the model it was trained on (the same layers)"
        )


@torch.no_grad()
def load_reslora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter written by :func:`save_reslora` into ``model`` and return it.

    A model without ResLoRA layers first gets exactly the blocks, chains and modules to save the
    adapter was saved with (settings from the saved config); a model that has them (built or linked
    by hand) must have the same blocks, settings, chains and modules to save. Any difference is an
    error naming it: a model with more (or other) layers than the adapter's target_modules chose
    when it was saved is refused, and so is a model into which
    :func:`reslora_kernels.merge_and_unload` already merged this adapter (loading it would add it a
    second time). The trained copies of the modules to save get the saved values.

    Atomic: both files' checksums, every block name, setting and base layer, every tensor's
    presence, shape, dtype (the same, or one the model's holds exactly: bfloat16 into float32)
    and values (finite adapters, non-negative statistics) are checked before anything changes;
    should a later step fail the model is left as it was. DDP and torch.compile wrappers are
    looked through (a model without ResLoRA yet must not be in DDP: load, then wrap); FSDP-sharded
    models are refused (load before sharding).
    """
    src = Path(path)
    meta, tensors = _read_adapter(src)
    weights_file = src / WEIGHTS_NAME
    records = meta["blocks"]
    saved = {record["name"]: record for record in records}
    if sharded_by(model) is not None:
        check_wrapping(model)  # raises: load before sharding
    blocks = reslora_blocks(model)
    given, model = model, unwrap_model(model) if blocks else check_wrapping(model)
    merged = getattr(model, MERGED_ADAPTERS_ATTR, ())
    factors = {name: (tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")) for name in saved}
    complete = all(a is not None and b is not None for a, b in factors.values())  # else _check_tensors says
    if merged and complete and adapter_fingerprint(factors) in merged:
        raise ValueError(
            f"the adapter in {src} is already merged into this model's weights (merge_and_unload): loading it "
            "would add it a second time. Load it into the unmerged base model"
        )
    plan = None
    if blocks:
        have = {name for name, _ in blocks}
        missing, unexpected = sorted(set(saved) - have), sorted(have - set(saved))
        if missing or unexpected:
            raise ValueError(
                f"ResLoRA blocks differ from {src}: missing in the model {missing}, not in the adapter {unexpected}"
            )
        for name, layer in blocks:
            if _block_record(name, layer) != saved[name]:
                raise ValueError(f"{name} has settings {_block_record(name, layer)} but the adapter has {saved[name]}")
        chains = sorted(map(json.dumps, _chain_records(blocks)))
        if chains != sorted(map(json.dumps, meta["chains"])):
            raise ValueError(f"the model's ResLoRA chains differ from those saved in {src}")
        to_save = saved_modules(model)
        if [name for name, _ in to_save] != meta["modules_to_save"]:
            raise ValueError(
                f"the model's modules to save {[name for name, _ in to_save]} differ from those saved in {src}: "
                f"{meta['modules_to_save']}"
            )
        expected = {}
        for name, layer in blocks:
            expected.update(_expected_tensors(name, layer))
        statistics = {key for key in expected if key.rsplit(".", 1)[-1].startswith("norm_")}
        for name, wrapper in to_save:
            expected.update(_expected_saved(name, wrapper.trained_module))
    else:
        if meta["config"] is None:
            raise ValueError(
                f"{src} was saved from layers built by hand (no ResLoRAConfig); build and link them, then load"
            )
        config = ResLoRAConfig.from_dict(meta["config"])
        plan = plan_reslora(
            model,
            config,
            block_names=[record["name"] for record in records],
            chains=[(chain["name"], chain["blocks"]) for chain in meta["chains"]],
            saved_names=meta["modules_to_save"],
        )
        _check_same_targets(model, config, [record["name"] for record in records], set(meta["modules_to_save"]), src)
        expected = {}
        for (_, base), record in zip(plan.targets, records):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the config warned about its settings
                layer = FusedResLoRALinear(
                    *base_features(base), bias=False, device="meta", dtype=base_dtype(base), settings=config
                )
            if _block_record(record["name"], layer) != record:
                raise ValueError(
                    f"{record['name']} would get settings {_block_record(record['name'], layer)} "
                    f"but the adapter has {record}"
                )
            expected.update(_expected_tensors(record["name"], layer))
        statistics = {key for key in expected if key.rsplit(".", 1)[-1].startswith("norm_")}
        for name, (_, module) in zip(meta["modules_to_save"], plan.saved):
            expected.update(_expected_saved(name, module))
    _check_tensors(weights_file, tensors, expected, statistics)
    with ModelTransaction(model) as tx:
        if plan is not None:
            blocks = list(execute_plan(model, plan, tx).items())
        for name, layer in blocks:
            for key, target in _expected_tensors(name, layer).items():
                tx.copy_(target, tensors[key])
        for name, wrapper in saved_modules(model):
            for key, target in _expected_saved(name, wrapper.trained_module).items():
                tx.copy_(target, tensors[key])
    return given
