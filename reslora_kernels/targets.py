"""Which modules of a model become ResLoRA blocks (names, a regex, all-linear or the defaults of the
model type; whether each chosen module can be a block's base at all) and which are trained in full
beside them (``modules_to_save``, with the heads PEFT adds for a task type)."""

from __future__ import annotations

import re
import sys
import warnings
from collections import defaultdict

import torch.nn as nn
from torch.nn.utils import parametrize

from .base_layers import is_conv1d, is_linear
from .quant import quantized_kind, quantized_problem
from .chaining import chain_key
from .config import ALL_LINEAR, ResLoRAConfig
from .layer import FusedResLoRALinear
from .model_utils import clean_name
from .module_to_save import ModuleToSave

__all__ = ["ALL_LINEAR", "DEFAULT_TARGET_MODULES"]

#: Targets used when ``target_modules`` is omitted, by ``model.config.model_type``: the attention
#: query and value projections, the choice of PEFT's ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``
#: (peft/utils/constants.py, checked against peft 0.21) for the same families.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "gemma", "gemma2", "bart", "opt"), ["q_proj", "v_proj"]),
    "gpt2": ["c_attn"],
    **dict.fromkeys(("bert", "roberta"), ["query", "value"]),
    "t5": ["q", "v"],
}

#: The heads PEFT adds to ``modules_to_save`` for a task type (peft/peft_model.py, checked against
#: peft 0.21: ``PeftModelForSequenceClassification``, ``...ForTokenClassification``, ``...ForQuestionAnswering``).
TASK_MODULES_TO_SAVE = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
#: The classification heads ``all-linear`` leaves out for ``SEQ_CLS`` when the model has no output
#: embeddings: the first of these the model has as an attribute (peft's ``SEQ_CLS_HEAD_NAMES``).
SEQ_CLS_HEAD_NAMES = ("score", "classifier")

#: (every name the module has in the model, the module), in model order.
Targets = list[tuple[list[str], nn.Module]]


def _output_head(model: nn.Module) -> nn.Module | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _excluded_head(model: nn.Module, config: ResLoRAConfig) -> nn.Module | None:
    """What ``all-linear`` leaves out, as PEFT (``_maybe_include_all_linear_layers``): the output
    head; without one, for ``SEQ_CLS``, the first of ``score`` / ``classifier``."""
    head = _output_head(model)
    if head is None and config.task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None)
    return head


def matches(targets: str | list[str], module_name: str) -> bool:
    """Whether ``module_name`` (a full dotted name) is one of ``targets``: a list of names (equal,
    or ending with ``"." + name``) or a regex that must match the whole name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def linear_patterns(model: nn.Module) -> list[str]:
    """The model's linear layers, numeric name parts as ``*``, for error messages."""
    return list(dict.fromkeys(chain_key(name) for name, mod in model.named_modules() if is_linear(mod)))


def resolve_targets(model: nn.Module, config: ResLoRAConfig) -> tuple[str | list[str], str]:
    """``(targets, how)``: what ``config.target_modules`` means for ``model`` (a list of names or
    a regex; for ``"all-linear"`` the list of every linear layer but the output head) and a
    description of where it came from."""
    targets = config.target_modules
    if targets == ALL_LINEAR:
        # PEFT's meaning: every nn.Linear / Conv1D but the output head (get_output_embeddings) or,
        # for SEQ_CLS, the classification head.
        head = _excluded_head(model, config)
        names = [name for name, mod in model.named_modules() if name and is_linear(mod) and mod is not head]
        return names, "all-linear: every linear layer but the output head"
    if targets is not None:
        return targets, "target_modules"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type], f"the default for model_type {model_type!r}"
    raise ValueError(
        f"ResLoRAConfig.target_modules is not set and model_type {model_type!r} has no default targets "
        f"(defaults exist for {', '.join(sorted(DEFAULT_TARGET_MODULES))}); the model's linear layers are: "
        + ", ".join(linear_patterns(model))
    )


def describe_targets(model: nn.Module) -> str:
    """Which targets chose the blocks of ``model`` and where they came from ("" for blocks built by
    hand), for :func:`reslora_kernels.reslora_summary`."""
    config = vars(model).get("reslora_config")
    if config is None:
        return ""
    if config.target_modules == ALL_LINEAR:
        head = "the output head or the classification head" if config.task_type == "SEQ_CLS" else "the output head"
        return f"all-linear (every linear layer but {head})"
    if config.target_modules is not None:
        return f"{config.target_modules!r}"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{DEFAULT_TARGET_MODULES.get(model_type)!r} (the default for model_type {model_type!r})"


def base_layer_problem(name: str, module: nn.Module) -> str | None:
    """Why ``module`` cannot become a ResLoRA block (``None``: it can). The block computes
    ``x W^T + b`` plus the LoRA branch from the module's weight and bias without running its
    forward, so anything the module does beyond that would be lost silently: such modules are
    refused."""
    if isinstance(module, FusedResLoRALinear):
        return f"{name} is already a ResLoRA layer"
    conv = is_conv1d(module)
    if not isinstance(module, nn.Linear) and not conv:
        return f"{name} is a {type(module).__name__}, not an nn.Linear or a transformers Conv1D"
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return (
            f"{name} is the output projection of an nn.MultiheadAttention, which reads its weight "
            "directly and never calls its forward: a LoRA there would be ignored. Exclude it from target_modules"
        )
    if parametrize.is_parametrized(module):
        return (
            f"{name} is parametrized (torch.nn.utils.parametrize, e.g. weight_norm): its weight is computed "
            "on every forward. Remove the parametrization (parametrize.remove_parametrizations) first"
        )
    quantized = quantized_kind(module)
    if quantized:
        problem = quantized_problem(module)
        if problem is not None:
            return f"{name} is a {type(module).__name__} that cannot be read: {problem}"
    base_forward = sys.modules["transformers.pytorch_utils"].Conv1D.forward if conv else nn.Linear.forward
    # A quantized base's forward is bitsandbytes' matmul of the weight it stores, which the block
    # computes from the dequantized weight; any other forward of its own would be lost.
    if quantized:
        base_forward = getattr(sys.modules["bitsandbytes.nn.modules"], quantized).forward
    if type(module).forward is not base_forward or "forward" in vars(module):
        return f"{name} ({type(module).__name__}) has a forward of its own, which a ResLoRA layer would not run"
    hooks = [
        kind
        for kind in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
        if getattr(module, kind, None)
    ]
    if hooks:
        return f"{name} has module hooks ({', '.join(hooks)}), which the ResLoRA layer replacing it would not run"
    if not quantized and (not isinstance(module.weight, nn.Parameter) or not module.weight.is_floating_point()):
        weight = module.weight
        return f"{name}.weight is a {type(weight).__name__} of {weight.dtype}, not a floating-point Parameter"
    return None


#: Modules whose forward may compute with the weights of their linear children directly instead of
#: calling the children: a ResLoRA block in a child's place would be bypassed, silently. (type,
#: what it does); a subclass is taken as its base does.
BYPASSING_PARENTS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.MultiheadAttention, "computes attention from out_proj.weight directly, never calling out_proj"),
    (
        nn.TransformerEncoderLayer,
        "runs PyTorch's fused fast path in eval mode (torch._transformer_encoder_layer_fwd), which reads "
        "linear1.weight and linear2.weight directly instead of calling them: in eval the LoRA would be ignored",
    ),
)


def bypass_problem(model: nn.Module, names: list[str]) -> str | None:
    """Why the module named ``names`` in ``model`` cannot be a block because its parent bypasses its
    forward (:data:`BYPASSING_PARENTS`); ``None``: no parent does."""
    for name in names:
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        for kind, why in BYPASSING_PARENTS:
            if isinstance(parent, kind):
                where = f"its parent {parent_name}" if parent_name else "the model"
                return (
                    f"{name} cannot be adapted: {where} ({type(parent).__name__}) {why}. Exclude it from "
                    "target_modules, or use a model whose layers call their linear layers (a transformers model, "
                    "or your own layer whose forward calls self.linear1(x))"
                )
    return None


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """``id(module)`` -> every name it has in ``model`` (a module reachable under two names must be
    replaced under both)."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, mod in model.named_modules(remove_duplicate=False):
        if name:
            names[id(mod)].append(name)
    return names


def _inside(name: str, saved_names: set[str]) -> bool:
    """Whether ``name`` is one of ``saved_names`` or a module under one."""
    return any(name == saved or name.startswith(saved + ".") for saved in saved_names)


def matched_targets(
    model: nn.Module, names: dict[int, list[str]], config: ResLoRAConfig, saved_names: set[str] = frozenset()
) -> Targets:
    """The modules ``config.target_modules`` chooses, checked (``all-linear`` leaves out, with a
    warning, what it cannot adapt; any other choice raises on it). Modules in or under a module to
    save (``saved_names``) never become blocks, as in PEFT."""
    wanted, how = resolve_targets(model, config)
    lenient = config.target_modules == ALL_LINEAR
    targets: Targets = []
    skipped: list[str] = []
    seen: set[int] = set()
    for name, mod in model.named_modules(remove_duplicate=False):
        if not name or id(mod) in seen or not is_linear(mod) or not matches(wanted, name):
            continue
        if _inside(name, saved_names):
            continue
        seen.add(id(mod))
        problem = base_layer_problem(name, mod) or bypass_problem(model, names[id(mod)])
        if problem is not None and lenient:
            skipped.append(problem)  # all-linear takes what it can, and says what it left
            continue
        if problem is not None:
            raise ValueError(problem)
        targets.append((names[id(mod)], mod))
    if skipped:
        warnings.warn("ResLoRA all-linear leaves out: " + "; ".join(skipped), UserWarning, stacklevel=4)
    if not targets and skipped:
        raise ValueError("all-linear found no linear layer ResLoRA can adapt: " + "; ".join(skipped))
    if not targets:
        raise ValueError(
            f"no linear layer (nn.Linear or Conv1D) in the model matches target_modules={wanted!r} ({how})"
            + (f" outside modules_to_save {sorted(saved_names)}" if saved_names else "")
            + f"; its linear layers are: {', '.join(linear_patterns(model)) or '(none)'}"
        )
    if lenient and config.task_type is None and _output_head(model) is None:
        heads = [n for n in SEQ_CLS_HEAD_NAMES if any(n in target_names for target_names, _ in targets)]
        if heads:
            warnings.warn(
                f"ResLoRA all-linear puts a LoRA on the classification head {heads[0]!r} (as PEFT does without a "
                "task type); a new head should train in full instead: set task_type='SEQ_CLS' (or "
                f"modules_to_save=[{heads[0]!r}]), which leaves it out of all-linear and trains it in full",
                UserWarning,
                stacklevel=4,
            )
    return targets


def _matches_name(entry: str, name: str) -> bool:
    return name == entry or name.endswith("." + entry)


def matched_modules_to_save(model: nn.Module, names: dict[int, list[str]], config: ResLoRAConfig) -> Targets:
    """The modules ``config.modules_to_save`` names, with the heads PEFT adds for ``config.task_type``
    (:data:`TASK_MODULES_TO_SAVE`, those the model has), outermost first: a module inside one chosen
    is not chosen again. A name of ``modules_to_save`` that matches no module raises."""
    requested = list(config.modules_to_save or [])
    added = [n for n in TASK_MODULES_TO_SAVE.get(config.task_type, ()) if n not in requested]
    found: set[str] = set()
    chosen: Targets = []
    chosen_names: set[str] = set()
    chosen_ids: set[int] = set()
    for name, mod in model.named_modules(remove_duplicate=False):
        hits = [entry for entry in requested + added if name and _matches_name(entry, name)]
        found.update(hits)
        if not hits or _inside(name, chosen_names) or id(mod) in chosen_ids:
            continue
        if isinstance(mod, (ModuleToSave, FusedResLoRALinear)):
            raise ValueError(f"modules_to_save: {name} is a {type(mod).__name__} already")
        chosen.append((names[id(mod)], mod))
        chosen_names.update(names[id(mod)])
        chosen_ids.add(id(mod))
    missing = [entry for entry in requested if entry not in found]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module of the model")
    return chosen


def named_modules_to_save(model: nn.Module, names: dict[int, list[str]], saved: list[str]) -> Targets:
    """Exactly the modules named ``saved`` (names in the bare model: what an adapter file lists)."""
    modules = {clean_name(name): mod for name, mod in model.named_modules(remove_duplicate=False)}
    chosen = []
    for name in saved:
        mod = modules.get(name) if name else None
        if mod is None:
            raise ValueError(f"the model has no module {name!r} (a module to save)")
        chosen.append((names[id(mod)], mod))
    return chosen


def named_targets(model: nn.Module, names: dict[int, list[str]], block_names: list[str]) -> Targets:
    """Exactly the modules named ``block_names`` (names in the bare model), checked."""
    modules = {clean_name(name): mod for name, mod in model.named_modules(remove_duplicate=False)}
    targets = []
    for name in block_names:
        mod = modules.get(name) if name else None
        if mod is None:
            raise ValueError(f"the model has no module {name!r}")
        problem = base_layer_problem(name, mod) or bypass_problem(model, names[id(mod)])
        if problem is not None:
            raise ValueError(problem)
        if clean_name(names[id(mod)][0]) != name:
            raise ValueError(f"{name} is the module {clean_name(names[id(mod)][0])} under a second name")
        targets.append((names[id(mod)], mod))
    return targets
