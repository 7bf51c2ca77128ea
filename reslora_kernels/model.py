"""Model-level API: put ResLoRA into a model, summarise it, merge it away, save and load it."""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import functional, merging
from .chain import ResLoRAChain, link_chain
from .config import ResLoRAConfig
from .layer import FusedResLoRALinear

__all__ = [
    "apply_reslora",
    "chain_key",
    "reslora_summary",
    "ResLoRASummary",
    "merge_and_unload",
    "merge_report",
    "save_reslora",
    "load_reslora",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]

CONFIG_NAME = "reslora_config.json"
WEIGHTS_NAME = "reslora_adapter.safetensors"
_FORMAT_VERSION = 1


def chain_key(module_name: str) -> str:
    """The chain a module belongs to: its name with every layer index replaced by ``*``
    (``model.layers.3.self_attn.q_proj`` -> ``model.layers.*.self_attn.q_proj``), so that each
    repeated position of a model (every q_proj, every BERT ``attention.output.dense``) is one chain."""
    return ".".join("*" if part.isdigit() else part for part in module_name.split("."))


def _linear_patterns(model: nn.Module) -> list[str]:
    patterns = dict.fromkeys(chain_key(name) for name, mod in model.named_modules() if isinstance(mod, nn.Linear))
    return list(patterns)


def _named_blocks(model: nn.Module) -> list[tuple[str, FusedResLoRALinear]]:
    """Every ResLoRA block of ``model`` once, under its first name, in model order."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, FusedResLoRALinear)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def apply_reslora(model: nn.Module, config: ResLoRAConfig) -> nn.Module:
    """Put ResLoRA into ``model`` in place and return it.

    Every ``nn.Linear`` whose name matches ``config.target_modules`` becomes a
    :class:`FusedResLoRALinear` reusing its weight and bias; every other parameter is frozen.
    For modes is/bs/ms the blocks are linked into one chain per :func:`chain_key` (one per target
    position), in model order; where a block's (in, out) shape differs from its predecessor's a new
    chain starts, with a warning naming both modules. Works on any ``nn.Module``, HuggingFace
    models included. :func:`reslora_summary` reports what was replaced.
    """
    if not isinstance(config, ResLoRAConfig):
        raise TypeError(f"config must be a ResLoRAConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if config.target_modules is None:
        raise ValueError(
            "ResLoRAConfig.target_modules is not set; the model's nn.Linear modules are: "
            + ", ".join(_linear_patterns(model))
        )
    if any(isinstance(mod, FusedResLoRALinear) for mod in model.modules()):
        raise ValueError("the model already has ResLoRA layers; merge_and_unload it first or load into it")
    if isinstance(model, nn.Linear):
        raise TypeError(
            "apply_reslora replaces submodules; wrap a single nn.Linear with FusedResLoRALinear.from_linear"
        )

    # remove_duplicate=False: a Linear reachable under two names must be replaced under both.
    targets: dict[int, list[str]] = {}
    modules: dict[int, nn.Linear] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if name and isinstance(mod, nn.Linear) and config.matches(name):
            if isinstance(mod, nn.modules.linear.NonDynamicallyQuantizableLinear):
                raise ValueError(
                    f"{name} is the output projection of an nn.MultiheadAttention, which reads its weight "
                    "directly and never calls its forward: a LoRA there would be ignored. "
                    "Exclude it from target_modules"
                )
            targets.setdefault(id(mod), []).append(name)
            modules[id(mod)] = mod
    if not targets:
        raise ValueError(
            f"no nn.Linear in the model matches target_modules={config.target_modules!r}; "
            f"its nn.Linear modules are: {', '.join(_linear_patterns(model)) or '(none)'}"
        )

    model.requires_grad_(False)
    ordered: list[tuple[str, FusedResLoRALinear]] = []
    for key, names in targets.items():
        layer = FusedResLoRALinear.from_linear(modules[key], **config.layer_kwargs())
        for name in names:
            _set_module(model, name, layer)
        ordered.append((names[0], layer))

    if config.mode != "none":
        groups: dict[str, list[tuple[str, FusedResLoRALinear]]] = defaultdict(list)
        for name, layer in ordered:
            groups[chain_key(name)].append((name, layer))
        for key, members in groups.items():
            runs = [[members[0]]]
            for prev, cur in zip(members, members[1:]):
                prev_layer, cur_layer = prev[1], cur[1]
                if (cur_layer.in_features, cur_layer.out_features) != (prev_layer.in_features, prev_layer.out_features):
                    warnings.warn(
                        f"ResLoRA: {cur[0]} ({cur_layer.in_features}->{cur_layer.out_features}) differs in shape "
                        f"from {prev[0]} ({prev_layer.in_features}->{prev_layer.out_features}); "
                        f"a new chain starts at {cur[0]}",
                        stacklevel=2,
                    )
                    runs.append([])
                runs[-1].append(cur)
            for i, run in enumerate(runs):
                name = key if i == 0 else f"{key}#{i}"
                link_chain([layer for _, layer in run], name=name, block_names=[n for n, _ in run])
    model.reslora_config = config
    return model


@dataclass
class ResLoRASummary:
    """What :func:`apply_reslora` did to a model."""

    replaced: list[str]
    chains: dict[str, list[str]] = field(default_factory=dict)
    trainable_params: int = 0
    total_params: int = 0

    def __str__(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        lines = [
            f"ResLoRA: {len(self.replaced)} linear layers replaced, {len(self.chains)} chains",
            f"trainable params: {self.trainable_params:,} of {self.total_params:,} ({pct:.4f}%)",
        ]
        for name, members in self.chains.items():
            lines.append(f"  chain {name}: {len(members)} blocks ({members[0]} ... {members[-1]})")
        return "\n".join(lines)


def reslora_summary(model: nn.Module) -> ResLoRASummary:
    """The replaced layers, the chains (name -> block names in order) and the parameter counts."""
    blocks = _named_blocks(model)
    names = {id(layer): name for name, layer in blocks}
    chains: dict[str, list[str]] = {}
    for _, layer in blocks:
        chain = layer.chain
        if len(chain) > 1 and chain.name not in chains:
            chains[chain.name] = [names.get(id(b), n) for b, n in zip(chain, chain.block_names)]
    params = list(model.parameters())
    return ResLoRASummary(
        replaced=[name for name, _ in blocks],
        chains=chains,
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
    )


def _chains_of(blocks: list[tuple[str, FusedResLoRALinear]]) -> list[ResLoRAChain]:
    chains: dict[int, ResLoRAChain] = {}
    for _, layer in blocks:
        chains.setdefault(id(layer.chain), layer.chain)
    return list(chains.values())


def _merge_terms(
    model: nn.Module, method: str, calibration=None, ridge: float = 1e-3
) -> list[tuple[FusedResLoRALinear, merging.MergeTerm]]:
    """Every block's merge term under ``method``, computed before anything changes."""
    blocks = _named_blocks(model)
    if not blocks:
        raise ValueError("the model has no ResLoRA layers to merge")
    chains = _chains_of(blocks)
    # Every method/mode pair is checked before anything is computed.
    resolved = {merging.resolve_method(method, chain.mode) for chain in chains}
    if "lstsq" in resolved:
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0:
            raise ValueError(f"ridge must be a positive number, got {ridge!r}")
        lstsq = merging.calibrate_lstsq(model, [layer for _, layer in blocks], calibration)
    elif calibration is not None:
        raise ValueError(f"calibration is only used by method 'lstsq', not {method!r}")
    else:
        lstsq = None
    in_model = {id(layer) for _, layer in blocks}
    terms = []
    for chain in chains:
        for block, term in zip(chain, merging.chain_merge_terms(chain, method, lstsq, ridge)):
            if id(block) in in_model:
                terms.append((block, term))
    return terms


def _check_untied(model: nn.Module, blocks: list[tuple[str, FusedResLoRALinear]]) -> None:
    holders: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        holders[id(param)].append(name)
    own: dict[int, set[str]] = defaultdict(set)
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, FusedResLoRALinear):
            own[id(mod.weight)].add(f"{name}.weight" if name else "weight")
    for name, layer in blocks:
        others = [n for n in holders[id(layer.weight)] if n not in own[id(layer.weight)]]
        if others:
            raise ValueError(
                f"{name}.weight is tied to {', '.join(others)}: merging would change those too. "
                "Untie the weights (clone the parameter) before merging"
            )


@torch.no_grad()
def merge_and_unload(model: nn.Module, method: str = "auto", *, calibration=None, ridge: float = 1e-3) -> nn.Module:
    """Fold every ResLoRA block into its base weight and put plain ``nn.Linear`` modules back.

    Args:
        method: ``auto`` (``exact`` for none/bs, ``input_norm`` for is/ms), ``exact``,
            ``input_norm``, ``weight_norm`` or ``lstsq`` (DESIGN.md section 3).
        calibration: for ``lstsq`` only, an iterable of model inputs (a tensor is run as
            ``model(t)``, a dict as ``model(**d)``); see below.
        ridge: for ``lstsq``, the ridge ``lambda`` relative to the mean eigenvalue of each
            block's input Gram matrix.

    ``lstsq`` runs one streaming pass over ``calibration`` (eval mode, no grad) and accumulates
    per block the float32 sums ``sum x x^T`` ``[in, in]`` and ``sum S x^T`` ``[r, in]`` on the
    block's device; no activation is kept. Memory: ``4 * (in^2 + r * in)`` bytes per is/ms block
    after the first of its chain, all held until the pass ends. Cost: the model's forward over
    the calibration data, plus ``2 * (in + r) * in`` flops per token and block, plus one float64
    Cholesky solve of size ``in`` per block.

    The base weight Parameters are updated in place (the product accumulated in float32, on the
    fastest fold for their device: :func:`reslora_kernels.fold_report`) and reused by the new
    ``nn.Linear`` modules, which stay frozen. Returns the model (the new ``nn.Linear`` if
    ``model`` itself was a single :class:`FusedResLoRALinear`); nothing of ResLoRA is left in it.
    """
    blocks = _named_blocks(model)
    terms = _merge_terms(model, method, calibration, ridge)
    _check_untied(model, blocks)
    for block, term in terms:
        functional.fold_lora_(block.weight, term.lora_B, term.lora_A, term.coef)
    replacements = {id(layer): _plain_linear(layer) for _, layer in blocks}
    for chain in _chains_of(blocks):
        chain.reset()
    root = replacements.get(id(model))
    if root is not None:
        return root
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        if name and id(mod) in replacements:
            _set_module(model, name, replacements[id(mod)])
    if "reslora_config" in vars(model):
        del model.reslora_config
    return model


def _output_tensor(output) -> torch.Tensor:
    """The tensor a model's output is judged by: itself, ``.logits``, ``.last_hidden_state``, or
    the first tensor of a tuple / ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    for attr in ("logits", "last_hidden_state"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find an output tensor in a {type(output).__name__}")


@torch.no_grad()
def merge_report(model: nn.Module, batches, methods=None, *, calibration=None, ridge: float = 1e-3) -> dict[str, float]:
    """How far each merge method's merged model is from the unmerged one, without changing it.

    For every method (default: every method that applies to all of the model's chains; lstsq
    only when ``calibration`` is given), returns ``||y_merged - y|| / ||y||`` over ``batches``
    (held-out model inputs, run as in :func:`merge_and_unload`), where ``y`` is the model's
    output tensor (``.logits``, ``.last_hidden_state`` or the first tensor) in eval mode. Each
    merged weight is built on the fly, one block at a time, with the same rounding as a real
    merge; the model's weights, adapters and mode are left as they were.
    """
    blocks = _named_blocks(model)
    if not blocks:
        raise ValueError("the model has no ResLoRA layers to merge")
    modes = {layer.chain.mode for _, layer in blocks}
    if methods is None:
        methods = [
            m
            for m in ("exact", "input_norm", "weight_norm", "lstsq")
            if all(mode in merging.METHOD_MODES[m] for mode in modes) and (m != "lstsq" or calibration is not None)
        ]
    methods = list(methods)
    if not methods:
        raise ValueError("no merge method to report")
    terms = {m: _merge_terms(model, m, calibration if m == "lstsq" else None, ridge) for m in methods}
    sums = {m: [0.0, 0.0] for m in methods}
    was_training = model.training
    model.eval()
    count = 0
    try:
        for batch in batches:
            reference_out = _output_tensor(merging.run_batch(model, batch)).double()
            for m in methods:
                for block, term in terms[m]:
                    block._merge_preview = term
                try:
                    merged_out = _output_tensor(merging.run_batch(model, batch)).double()
                finally:
                    for block, _ in terms[m]:
                        block._merge_preview = None
                sums[m][0] += float((merged_out - reference_out).square().sum())
                sums[m][1] += float(reference_out.square().sum())
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("batches is empty: merge_report needs held-out model inputs")
    return {m: (num / den) ** 0.5 if den > 0 else num**0.5 for m, (num, den) in sums.items()}


def _plain_linear(layer: FusedResLoRALinear) -> nn.Linear:
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = layer.weight
    linear.bias = layer.bias
    return linear


# ---------------------------------------------------------------------------- save / load
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
    }


def _chain_records(blocks: list[tuple[str, FusedResLoRALinear]]) -> list[dict]:
    names = {id(layer): name for name, layer in blocks}
    return [
        {"name": chain.name, "blocks": [names.get(id(b), "<outside the model>") for b in chain]}
        for chain in _chains_of(blocks)
        if len(chain) > 1
    ]


def save_reslora(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter (``lora_A``, ``lora_B`` and the merge statistics of every block) to
    ``path/reslora_adapter.safetensors`` and the config, block list and chains to
    ``path/reslora_config.json``. :func:`load_reslora` reads them back bit-exactly."""
    from safetensors.torch import save_file

    blocks = _named_blocks(model)
    if not blocks:
        raise ValueError("the model has no ResLoRA layers to save")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in blocks:
        for key, tensor in layer.state_dict().items():
            if key not in ("weight", "bias"):
                tensors[f"{name}.{key}"] = tensor.detach().cpu().contiguous()
    config = getattr(model, "reslora_config", None)
    meta = {
        "format_version": _FORMAT_VERSION,
        "config": config.to_dict() if config is not None else None,
        "blocks": [_block_record(name, layer) for name, layer in blocks],
        "chains": _chain_records(blocks),
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")


@torch.no_grad()
def load_reslora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter written by :func:`save_reslora` into ``model`` and return it.

    A model without ResLoRA layers first gets :func:`apply_reslora` with the saved config; a model
    that has them (built or linked by hand) must have the same blocks, settings and chains.
    Any difference is an error naming it.
    """
    from safetensors.torch import load_file

    src = Path(path)
    if not (src / CONFIG_NAME).is_file() or not (src / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{src} does not hold {CONFIG_NAME} and {WEIGHTS_NAME}")
    meta = json.loads((src / CONFIG_NAME).read_text())
    if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"{src / CONFIG_NAME} has format_version {meta.get('format_version')!r}, expected {_FORMAT_VERSION}"
        )
    if not _named_blocks(model):
        if meta["config"] is None:
            raise ValueError(
                f"{src} was saved from layers built by hand (no ResLoRAConfig); build and link them, then load"
            )
        apply_reslora(model, ResLoRAConfig.from_dict(meta["config"]))
    blocks = _named_blocks(model)
    saved = {record["name"]: record for record in meta["blocks"]}
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
    tensors = load_file(str(src / WEIGHTS_NAME))
    for name, layer in blocks:
        for key, target in layer.state_dict(keep_vars=True).items():
            if key in ("weight", "bias"):
                continue
            source = tensors.pop(f"{name}.{key}", None)
            if source is None or source.shape != target.shape:
                raise ValueError(f"{src / WEIGHTS_NAME}: {name}.{key} is missing or has the wrong shape")
            target.copy_(source)
    if tensors:
        raise ValueError(f"{src / WEIGHTS_NAME} holds unexpected tensors: {sorted(tensors)}")
    return model
