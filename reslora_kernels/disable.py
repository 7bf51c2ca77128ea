"""The model with its adapter switched off: :func:`disable_adapter` (a context) and
:class:`AdapterDisabled` (a module that runs the model so, for trainers that take a reference model).

While disabled, every block runs its base layer only (it reads and writes nothing of its chain and
records no norm statistics) and every module to save runs its original module: the model computes
what the base model computes. Nothing is copied or moved; the switch is a counter on each block,
so nested contexts compose and a ``torch.compile``d model recompiles once for each state.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
import torch.nn as nn

from .layer import FusedResLoRALinear
from .model_utils import unwrap_model
from .module_to_save import ModuleToSave

__all__ = ["disable_adapter", "AdapterDisabled"]

# Entering and leaving are read-modify-writes of the counters of many modules: one at a time.
_SWITCH = threading.Lock()


def _switches(model: nn.Module) -> list[nn.Module]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"disable_adapter needs an nn.Module, got {type(model).__name__}")
    modules = [m for m in unwrap_model(model).modules() if isinstance(m, (FusedResLoRALinear, ModuleToSave))]
    if not modules:
        raise ValueError(
            "the model has no ResLoRA layers (apply_reslora or load_reslora first; after merge_and_unload or "
            "unload there is no adapter left to disable)"
        )
    return modules


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` without its adapter inside the ``with`` block: every block computes its base
    layer alone (``x W^T + b``; nothing of its chain is read or written, no norm statistics are
    recorded) and every module to save runs its original module, so the model is the base model.
    On exit, also by an exception, the adapter is back. Yields ``model``.

    Nested contexts (on the model or on parts of it) compose: the adapter is back when the last one
    exits. The switch is model-wide, as PEFT's ``disable_adapter`` is: while a context is open every
    thread that runs the model runs it without its adapter, so do not open one while another thread
    is in the middle of a forward pass. Run the backward of a forward made inside the context inside
    it too (gradient checkpointing recomputes the forward during backward with the adapter as it is
    then). DDP, FSDP and ``torch.compile`` wrappers are looked through; a compiled model compiles
    once more for the disabled state. Entered inside a compiled function (``fullgraph=True`` too), the
    switch is traced: the blocks traced inside the context run their base layers. A model without
    ResLoRA layers is an error.
    """
    modules = _switches(model)
    _switch(modules, +1)
    try:
        yield model
    finally:
        _switch(modules, -1)


def _switch(modules: list[nn.Module], step: int) -> None:
    if torch.compiler.is_compiling():
        # Traced inside a compiled function: Dynamo replays the counters' changes as side effects
        # and sees their new values in the blocks it traces after them (no lock can be traced).
        for module in modules:
            module._adapter_disabled += step
        return
    with _SWITCH:
        for module in modules:
            module._adapter_disabled += step


class AdapterDisabled(nn.Module):
    """``model`` with its adapter disabled, as a module of its own that shares everything with it:
    calling it runs ``model`` under :func:`disable_adapter`. It holds no parameters (``model`` is not
    its submodule), and attributes it lacks (``config``, ``generation_config``, ``base_model``,
    ``get_output_embeddings``, ...) are read from ``model``.

    For trainers that take a separate reference model: TRL's ``DPOTrainer`` and ``KTOTrainer``
    (``ref_model=AdapterDisabled(model)``) then use the base model as the reference without loading
    a second model, as they do for a PEFT model.
    """

    def __init__(self, model: nn.Module) -> None:
        _switches(model)  # a model without an adapter to disable is an error now, not at the first call
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: its parameters stay the model's own

    def __call__(self, *args, **kwargs):
        # Around the whole call, so that a forward a library patched onto this module (TRL's fused
        # log-prob head reads the model's backbone and head directly) runs disabled too.
        with disable_adapter(self.model):
            return super().__call__(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model" or "model" not in self.__dict__:
                raise
            return getattr(self.__dict__["model"], name)

    def extra_repr(self) -> str:
        return f"model={type(self.model).__name__}"
