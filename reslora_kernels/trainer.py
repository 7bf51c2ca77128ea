"""Adapter-only checkpoints for ``transformers.Trainer`` and the trainers built on it (TRL's).

Trainer writes a ``PeftModel``'s checkpoints as the adapter alone and reloads them on resume; for
any other model it writes the whole state dict. :class:`ResLoRATrainerMixin` gives a model with
ResLoRA layers the same treatment through the three methods Trainer saves and loads weights with
(``_save``, ``_load_from_checkpoint``, ``_load_best_model``): each checkpoint holds the adapter and
the modules to save (:func:`reslora_kernels.save_reslora`), not the base model, beside Trainer's own
optimizer, scheduler, RNG and trainer state, and ``resume_from_checkpoint`` loads it back
(:func:`reslora_kernels.load_reslora`) into the model the trainer holds. transformers is imported
only by :data:`ResLoRATrainer`, on first use.
"""

from __future__ import annotations

import os

import torch

from .io import CONFIG_NAME, WEIGHTS_NAME, load_reslora, save_reslora
from .model_utils import reslora_blocks

__all__ = ["ResLoRATrainerMixin", "is_adapter_checkpoint"]


def is_adapter_checkpoint(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a directory holding a ResLoRA adapter (what :func:`save_reslora` writes)."""
    return path is not None and all(os.path.isfile(os.path.join(path, name)) for name in (CONFIG_NAME, WEIGHTS_NAME))


class ResLoRATrainerMixin:
    """Mix into a ``transformers.Trainer`` class, first: ``class MyTrainer(ResLoRATrainerMixin, Trainer)``
    (or ``DPOTrainer``, ...). For a model with ResLoRA layers:

    * checkpoints (``save_strategy``, ``save_model()``, the end of training) hold the adapter and
      the modules to save (``reslora_config.json``, ``reslora_adapter.safetensors``), the processing
      class and the training arguments, not the base model's weights; Trainer adds the optimizer
      state (the trainable parameters only), scheduler, RNG states and trainer state as usual;
    * ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` load such a checkpoint
      into the model (checked, atomic), so training continues exactly where it stopped.

    A model without ResLoRA layers, or a checkpoint without an adapter, gets Trainer's own behaviour.
    Works in a single process and under DDP; FSDP-sharded models cannot be loaded into
    (:func:`reslora_kernels.load_reslora` refuses them).
    """

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not reslora_blocks(self.model):
            return super()._save(output_dir, state_dict)
        from transformers.trainer import TRAINING_ARGS_NAME

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_reslora(self.model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.model if model is None else model
        if is_adapter_checkpoint(resume_from_checkpoint) and reslora_blocks(model):
            load_reslora(model, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if is_adapter_checkpoint(best) and reslora_blocks(self.model):
            load_reslora(self.model, best)
            return
        super()._load_best_model()


def __getattr__(name: str):
    if name == "ResLoRATrainer":
        # transformers is an optional dependency: the class is made when first asked for.
        import transformers

        trainer = type(
            "ResLoRATrainer",
            (ResLoRATrainerMixin, transformers.Trainer),
            {"__doc__": "``transformers.Trainer`` with adapter-only checkpoints (:class:`ResLoRATrainerMixin`)."},
        )
        trainer.__module__ = __name__
        globals()["ResLoRATrainer"] = trainer
        return trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
