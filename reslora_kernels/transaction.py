"""The undo log through which the model-level operations change a model, so that a failed
operation leaves it exactly as it was (apply, load and merge are all-or-nothing)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .model_utils import set_module

__all__: list[str] = []  # the machinery of the model-level operations; nothing here is user-facing


class ModelTransaction:
    """An undo log for changes to a model. Used as ``with ModelTransaction(model) as tx:``; every
    change made through it (module swaps, ``requires_grad`` flags, tensor values, attributes) is
    undone, newest first, if the block raises, so that a failed operation leaves the model as it was."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._undo: list = []

    def __enter__(self) -> "ModelTransaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            for undo in reversed(self._undo):
                undo()
        self._undo.clear()
        return False

    def set_module(self, name: str, module: nn.Module) -> None:
        old = self.model.get_submodule(name)
        set_module(self.model, name, module)
        self._undo.append(lambda: set_module(self.model, name, old))

    def freeze_all(self) -> None:
        """``requires_grad_(False)`` on every parameter of the model."""
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self._undo.append(lambda: [p.requires_grad_(flag) for p, flag in flags])
        self.model.requires_grad_(False)

    @torch.no_grad()
    def copy_(self, target: torch.Tensor, source: torch.Tensor) -> None:
        old = target.detach().clone()
        self._undo.append(lambda: target.copy_(old))
        target.copy_(source)

    def set_data(self, param: torch.Tensor, data: torch.Tensor) -> None:
        """``param.data = data``: the Parameter object (and whoever holds it) stays, its values change."""
        old = param.data
        self._undo.append(lambda: setattr(param, "data", old))
        param.data = data

    def on_undo(self, undo) -> None:
        """Run ``undo()`` should the transaction fail (for changes made outside the log)."""
        self._undo.append(undo)

    def setattr(self, obj: object, name: str, value: object) -> None:
        missing = object()
        old = obj.__dict__.get(name, missing)

        def undo():
            if old is missing:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = old

        self._undo.append(undo)
        obj.__dict__[name] = value

    def delattr(self, obj: object, name: str) -> None:
        if name in obj.__dict__:
            self.setattr(obj, name, None)
            del obj.__dict__[name]
