"""ResLoRA settings: the settings of one block, and the config that puts blocks into a model.

:class:`BlockSettings` is the one settings object a block takes, validated once, with the one set
of defaults; :class:`ResLoRAConfig` extends it with what :func:`reslora_kernels.apply_reslora`
needs to choose and chain the blocks of a model. A leaf: nothing of the package is imported.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

__all__ = ["MODES", "BlockSettings", "ResLoRAConfig"]

#: Residual-shortcut modes, named as in the paper (docs/design.md section 2).
#: ``none`` is plain LoRA, ``is`` input-shortcut, ``bs`` block-shortcut, ``ms`` middle-shortcut.
MODES = ("none", "is", "bs", "ms")

#: PEFT's task types (``peft.TaskType``): ``ResLoRAConfig.task_type`` takes one of them, with PEFT's meaning.
TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")

#: Modes whose blocks keep norm statistics for the input-norm merge (``is``: the input, ``ms``: z).
NORM_MODES = ("is", "ms")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

#: ``target_modules`` shorthand for every linear layer but the output head; matched without regard
#: to case, as PEFT does (peft/tuners/tuners_utils.py, ``_maybe_include_all_linear_layers``).
ALL_LINEAR = "all-linear"


def _integer(name: str, value: Any) -> int:
    """``value`` as a Python int: any integral number (``int``, ``numpy.int64``, ...), never a bool
    (``True`` is an int to Python but no rank) nor a float, even a whole one."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def _outside_the_package() -> int:
    """The ``stacklevel`` of the first frame outside this package and the code dataclasses
    generate, so that a settings warning points at the user's line however it was reached
    (a config, a layer constructor, ``from_linear``)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE_DIR) or frame.f_code.co_filename.startswith("<")
    ):
        frame, level = frame.f_back, level + 1
    return level


@dataclass(frozen=True)
class BlockSettings:
    """The settings of one ResLoRA block, validated when built (a bad value raises, naming it).

    Args:
        mode: ``"none"`` (plain LoRA, the default), ``"is"`` (input-shortcut), ``"bs"``
            (block-shortcut) or ``"ms"`` (middle-shortcut); docs/design.md section 2 has the
            formulas. A shortcut mode is always an explicit choice.
        rank: LoRA rank ``r`` (>= 1).
        alpha: LoRA alpha; the LoRA branch is scaled by ``scaling = alpha / rank``.
        dropout: dropout probability on the LoRA input, in ``[0, 1)`` (identity in eval mode).
        pre_num: for ``bs`` and ``ms``, how many previous blocks a block sums over (``-1``: all
            of them). Ignored by ``none`` and ``is``.
        norm_window: how many recent training forwards the input-norm statistics average over
            (``is``/``ms``; read by the ``input_norm`` merge).
        autocast_adapter_dtype: keep ``lora_A`` / ``lora_B`` in float32 over a float16, bfloat16
            or quantized base (the default, as PEFT does: bf16 optimizer steps round small updates
            away); they are cast to the compute dtype per call, differentiably. ``False`` keeps
            them in the base's dtype.
        use_rslora: scale the LoRA branch by ``alpha / sqrt(rank)`` (rank-stabilised LoRA,
            Kalajdzievski 2023; PEFT's ``use_rslora``) instead of ``alpha / rank``. ``rank`` is the
            rank of one block's adapter in every mode, also in ``bs``, whose blocks sum the adapters
            of several blocks (docs/design.md section 2 says why).

    ``alpha = 0`` is valid but warns: the LoRA branch and its gradients are then zero.
    """

    mode: str = "none"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    pre_num: int = 1
    norm_window: int = 100
    autocast_adapter_dtype: bool = True
    use_rslora: bool = False

    def __post_init__(self) -> None:
        # numpy and other integral types are taken and stored as int (the config is saved as JSON).
        rank, pre_num = _integer("rank", self.rank), _integer("pre_num", self.pre_num)
        object.__setattr__(self, "rank", rank)
        object.__setattr__(self, "pre_num", pre_num)
        alpha, dropout, mode = self.alpha, self.dropout, self.mode
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if not isinstance(alpha, (int, float)):  # numpy.float32 and the like: stored as a Python number
            alpha = float(alpha)
            object.__setattr__(self, "alpha", alpha)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(map(repr, MODES))}")
        # pre_num only means something for the modes that sum over previous blocks.
        if mode in ("bs", "ms") and (pre_num == 0 or pre_num < -1):
            raise ValueError(
                f"pre_num must be >= 1 (that many previous blocks) or -1 (all previous blocks) "
                f"for mode {mode!r}, got {pre_num}"
            )
        window = _integer("norm_window", self.norm_window)
        if window < 1:
            raise ValueError(f"norm_window must be an int >= 1, got {window!r}")
        object.__setattr__(self, "norm_window", window)
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"use_rslora must be a bool, got {type(self.use_rslora).__name__}")
        if not isinstance(self.autocast_adapter_dtype, bool):
            raise TypeError(f"autocast_adapter_dtype must be a bool, got {self.autocast_adapter_dtype!r}")
        object.__setattr__(self, "dropout", float(dropout))
        if alpha == 0:
            warnings.warn(
                "ResLoRA: alpha=0 makes the scaling alpha / rank zero: the LoRA branch adds nothing and "
                "lora_A, lora_B get zero gradients, so nothing trains",
                UserWarning,
                stacklevel=_outside_the_package(),
            )

    @property
    def scaling(self) -> float:
        """The factor of the LoRA branch: ``alpha / rank``, or ``alpha / sqrt(rank)`` with
        ``use_rslora``. The one place it is computed."""
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    @property
    def keeps_norm_statistics(self) -> bool:
        """Whether a block records the norm statistics of the input-norm merge (modes is, ms)."""
        return self.mode in NORM_MODES

    def block_settings(self) -> "BlockSettings":
        """These settings as a plain :class:`BlockSettings` (a :class:`ResLoRAConfig` without its
        model-level fields)."""
        if type(self) is BlockSettings:
            return self
        return BlockSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(BlockSettings)})

    @classmethod
    def of(cls, settings: "BlockSettings | None" = None, **overrides: Any) -> "BlockSettings":
        """The settings a block is built with: ``settings`` (a :class:`BlockSettings` or a
        :class:`ResLoRAConfig`), with ``overrides`` (its field names) replacing its values; the
        defaults when neither is given."""
        if settings is None:
            return BlockSettings(**overrides)
        if not isinstance(settings, BlockSettings):
            raise TypeError(f"settings must be a BlockSettings or a ResLoRAConfig, got {type(settings).__name__}")
        base = settings.block_settings()
        return dataclasses.replace(base, **overrides) if overrides else base


#: A chain-key rule: a regular expression (every match in a module name is replaced by ``*``) or a
#: function from a module name to its chain key (``None``: the module forms no chain), or to
#: ``(key, order)`` to set the order of the blocks in their chain.
ChainKey = Union[str, Callable[[str], Any]]


@dataclass(frozen=True)
class ResLoRAConfig(BlockSettings):
    """How :func:`reslora_kernels.apply_reslora` puts ResLoRA into a model: the
    :class:`BlockSettings` of every block (``mode``, ``rank``, ``alpha``, ``dropout``, ``pre_num``,
    ``norm_window``, ``autocast_adapter_dtype``, ``use_rslora``, with their defaults), which modules
    become blocks and how they chain, and which modules train in full beside them.

    Args:
        target_modules: which linear layers (``nn.Linear``, transformers' ``Conv1D``) to replace.
            A list/tuple of names matches a module whose full name equals an entry or ends with
            ``"." + entry`` (``"q_proj"`` matches ``model.layers.3.self_attn.q_proj``); a single
            string is a regular expression that must match the full module name; ``"all-linear"``
            (in any case, as PEFT reads it) is every linear layer but the output head (PEFT's meaning); ``None`` takes the
            defaults for ``model.config.model_type`` (:data:`reslora_kernels.DEFAULT_TARGET_MODULES`).
        chain_key: which blocks form a chain (is/bs/ms). ``None``: the default rule of
            :func:`reslora_kernels.chain_key` (every layer index becomes ``*``; MoE experts form
            no chain; blocks in model order). A string is a regular expression: every match in a
            module name is replaced by ``*``, and modules with the same result form one chain
            (``r"(?<=block)\\d+"`` chains ``block1.proj``, ``block2.proj``, ...). A function maps a
            module name to its key, to ``None`` (no chain) or to ``(key, order)``; blocks are
            chained in model order, or by ``order`` when given. A regex is saved with the adapter;
            a function is not (the chains it formed are, and :func:`reslora_kernels.load_reslora`
            links those).
        modules_to_save: modules trained in full beside the adapters (a new task head), as PEFT's
            ``modules_to_save``: names matched as ``target_modules`` names are (the full name, or
            its ending after a ``"."``). Each becomes a :class:`reslora_kernels.ModuleToSave`: the
            original module, frozen, and a trainable copy that the model runs; they are saved and
            loaded with the adapter, and no block is put inside them.
        task_type: PEFT's task type (``"SEQ_CLS"``, ``"TOKEN_CLS"``, ``"QUESTION_ANS"``,
            ``"CAUSAL_LM"``, ...), with PEFT's consequences: ``SEQ_CLS`` and ``TOKEN_CLS`` add the
            heads ``classifier`` and ``score``, ``QUESTION_ANS`` adds ``qa_outputs``, to
            ``modules_to_save`` (those the model has), and ``"all-linear"`` then leaves them out.
    """

    target_modules: str | Sequence[str] | None = None
    chain_key: ChainKey | None = None
    modules_to_save: Sequence[str] | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        key = self.chain_key
        if isinstance(key, str):
            try:
                re.compile(key)
            except re.error as err:
                raise ValueError(f"chain_key {key!r} is not a valid regex: {err}") from None
            if re.search(key, "") is not None:
                raise ValueError(f"chain_key {key!r} matches the empty string: it must match the layer index part")
        elif key is not None and not callable(key):
            raise TypeError(f"chain_key must be a regex string, a function or None, got {type(key).__name__}")
        saved = self.modules_to_save
        if saved is not None:
            if isinstance(saved, str) or not all(isinstance(name, str) and name for name in saved):
                raise ValueError(f"modules_to_save must be a list of module names, got {saved!r}")
            object.__setattr__(self, "modules_to_save", list(saved))
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"unknown task_type {self.task_type!r}; choose one of {', '.join(TASK_TYPES)} or None")
        targets = self.target_modules
        if targets is None:
            return
        if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
            object.__setattr__(self, "target_modules", ALL_LINEAR)  # "ALL-LINEAR" too, as PEFT reads it
            return
        if isinstance(targets, str):  # a regular expression
            try:
                re.compile(targets)
            except re.error as err:
                raise ValueError(f"target_modules {targets!r} is not a valid regex: {err}") from None
            return
        targets = tuple(targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(
                f"target_modules must be a regex string or a non-empty list of names, got {self.target_modules!r}"
            )
        object.__setattr__(self, "target_modules", list(targets))

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values; a ``chain_key`` function cannot be saved and becomes
        ``None`` (the chains it formed are saved by :func:`reslora_kernels.save_reslora`)."""
        data = dataclasses.asdict(self)
        if callable(data["chain_key"]):
            data["chain_key"] = None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ResLoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ResLoRAConfig fields: {unknown}")
        return cls(**data)
