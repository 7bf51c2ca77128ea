"""A module trained in full beside the adapters (PEFT's ``modules_to_save``): a new task head, say.

:func:`reslora_kernels.apply_reslora` puts a :class:`ModuleToSave` in the place of each module that
``ResLoRAConfig.modules_to_save`` names. It keeps the original module, frozen, and runs a trainable
copy; :func:`reslora_kernels.disable_adapter` runs the original instead, so that the model with its
adapter disabled is the base model, head included. A leaf: only torch is imported.
"""

from __future__ import annotations

import copy

import torch.nn as nn

__all__ = ["ModuleToSave"]


class ModuleToSave(nn.Module):
    """``original_module`` (frozen) and ``trained_module``, its trainable copy, which the forward
    runs (the original while the adapter is disabled). Attributes the wrapper does not have (a
    head's ``weight``, ``out_features``) are read from the module that runs, as PEFT's
    ``ModulesToSaveWrapper`` does. Merging or unloading the model puts the trained copy in its place.
    """

    def __init__(self, module: nn.Module) -> None:
        if isinstance(module, ModuleToSave):
            raise TypeError("the module is a ModuleToSave already")
        super().__init__()
        self.trained_module = copy.deepcopy(module)
        self.original_module = module
        module.requires_grad_(False)
        self.trained_module.requires_grad_(True)
        #: How many :func:`reslora_kernels.disable_adapter` contexts are open on this module.
        self._adapter_disabled = 0

    @property
    def active_module(self) -> nn.Module:
        """The module the forward runs: the trained copy, or the original while the adapter is disabled."""
        return self.original_module if self._adapter_disabled else self.trained_module

    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if not modules or "trained_module" not in modules:
                raise
            active = modules["original_module" if self.__dict__.get("_adapter_disabled") else "trained_module"]
            return getattr(active, name)
