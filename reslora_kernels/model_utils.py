"""Finding one's way in a model: through wrappers (DDP, FSDP, torch.compile), to its ResLoRA
blocks and modules to save, to a module by name; whether its weights are whole in this process;
running a batch."""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Mapping

import torch
import torch.nn as nn

from .layer import FusedResLoRALinear
from .module_to_save import ModuleToSave

__all__ = ["reslora_blocks"]

#: Module names that wrappers insert into the names of what they wrap: FSDP (1) units, activation
#: checkpointing, torch.compile of a submodule.
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def _wrapper_class(name: str, module_path: str):
    # Only look a wrapper class up where its module was imported: a model wrapped in one has
    # imported it, and importing torch.distributed / torch._dynamo just to look is slow.
    module = sys.modules.get(module_path)
    return getattr(module, name, None) if module is not None else None


def _fsdp_class():
    return _wrapper_class("FullyShardedDataParallel", "torch.distributed.fsdp.fully_sharded_data_parallel")


def compiled_classes() -> tuple[type, ...]:
    """The class of ``torch.compile``'s module wrapper, where torch._dynamo is imported."""
    compiled = _wrapper_class("OptimizedModule", "torch._dynamo.eval_frame")
    return () if compiled is None else (compiled,)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / FullyShardedDataParallel
    (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, however nested."""
    while True:
        fsdp = _fsdp_class()
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif fsdp is not None and isinstance(model, fsdp):
            model = model.module
        elif isinstance(model, compiled_classes()):
            model = model._orig_mod
        else:
            return model


def clean_name(name: str) -> str:
    """``name`` without the parts wrappers insert (``_fsdp_wrapped_module``, ``_orig_mod``, ...): the
    name the module has in the bare model."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def sharded_by(model: nn.Module) -> str | None:
    """``"FSDP"`` or ``"FSDP2"`` (fully_shard) if ``model`` or a submodule is sharded, else ``None``."""
    fsdp = _fsdp_class()
    fsdp2 = _wrapper_class("FSDPModule", "torch.distributed.fsdp")
    for mod in model.modules():
        if fsdp is not None and isinstance(mod, fsdp):
            return "FSDP"
        if fsdp2 is not None and isinstance(mod, fsdp2):
            return "FSDP2"
    return None


def refuse_sharded(model: nn.Module, what: str) -> None:
    """Raise if ``model`` is FSDP-sharded: ``what`` needs every weight whole in this process."""
    kind = sharded_by(model)
    if kind is not None:
        raise ValueError(
            f"{what} needs the whole model in one process, but this model is sharded by {kind} (each process "
            "holds a shard of each weight). save_reslora works on the sharded model: save the adapter, "
            f"load_reslora it into an unsharded copy of the base model and call {what} there"
        )


def whole_parameters(model: nn.Module):
    """A context in which every parameter of ``model`` is whole in this process: FSDP (1) gathers
    them (``summon_full_params``, read-only); anything else already is. FSDP2's DTensors are
    gathered where read (``full_tensor``)."""
    fsdp = _fsdp_class()
    if fsdp is not None and any(isinstance(mod, fsdp) for mod in model.modules()):
        return fsdp.summon_full_params(model, writeback=False)
    return contextlib.nullcontext()


def reslora_blocks(model: nn.Module) -> list[tuple[str, FusedResLoRALinear]]:
    """Every ResLoRA block of ``model`` once, under its first name in the bare model (wrappers
    such as DDP, FSDP and torch.compile are looked through), in model order."""
    model = unwrap_model(model)
    return [(clean_name(name), mod) for name, mod in model.named_modules() if isinstance(mod, FusedResLoRALinear)]


def saved_modules(model: nn.Module) -> list[tuple[str, ModuleToSave]]:
    """Every module to save (``modules_to_save``) of ``model`` once, under its first name in the bare
    model, in model order."""
    model = unwrap_model(model)
    return [(clean_name(name), mod) for name, mod in model.named_modules() if isinstance(mod, ModuleToSave)]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def run_batch(model: nn.Module, batch) -> object:
    """Run ``model`` on one batch: a tensor as ``model(t)``, a mapping as ``model(**d)``."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(f"a batch must be a tensor or a dict of model inputs, got {type(batch).__name__}")


#: The attribute :func:`reslora_kernels.merge_and_unload` leaves on a merged model: the
#: :func:`adapter_fingerprint` of every adapter folded into its weights.
MERGED_ADAPTERS_ATTR = "reslora_merged_adapters"


def adapter_fingerprint(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """A SHA-256 of an adapter's factors (block name -> ``(lora_A, lora_B)``), by value in float32
    so that a bfloat16 file and the float32 model it was loaded into agree; the merge statistics
    and the base weights are not part of it."""
    digest = hashlib.sha256()
    for name in sorted(factors):
        digest.update(name.encode() + b"\0")
        for tensor in factors[name]:
            tensor = tensor.detach().to("cpu", torch.float32).contiguous()
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
