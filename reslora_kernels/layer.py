"""FusedResLoRALinear: a linear base layer composed with a trainable ResLoRA block."""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from . import backend, functional, quantized, reference
from .base_layers import adapter_dtype, base_dtype, base_features, base_problem, is_conv1d, is_quantized
from .base_layers import reset_base_parameters
from .chain import ResLoRAChain
from .config import BlockSettings
from .passes import recomputing
from .statistics import NormStatistics

__all__ = ["FusedResLoRALinear"]


class FusedResLoRALinear(nn.Module):
    """A frozen linear base layer and a trainable ResLoRA block, computed together.

    ``y = x W^T + b + s * (drop(x [+ x_prev]) A^T [+ z_prev]) B^T`` with ``s = alpha / rank`` (or
    ``alpha / sqrt(rank)``, ``use_rslora``);
    the shortcut terms come from the block's predecessors in its :class:`ResLoRAChain` (see
    docs/design.md section 2). A block that is not linked behaves as the first block of a chain.

    The base layer is a submodule, ``base_layer`` (as in PEFT): an ``nn.Linear``, transformers'
    ``Conv1D`` (GPT-2), whose ``[in, out]`` weight is read as its transposed ``[out, in]`` view, or
    a quantized bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, whose weight is dequantized on every
    call into a workspace shared by the blocks of its shape, and again in backward (nothing
    full-precision of it is saved; ``reslora_kernels.quantized``). Its forward runs only while the
    adapter is disabled (:func:`reslora_kernels.disable_adapter`); otherwise the block reads its
    weight and bias and computes everything in one op. ``weight`` (always ``[out, in]``; a quantized
    base's dequantized, a new tensor) and ``bias`` read the base's; ``lora_A`` ``[rank, in]``
    (kaiming-uniform) and ``lora_B`` ``[out, rank]`` (zeros) are trained, in float32 over a 16-bit or
    quantized base (``autocast_adapter_dtype``, cast to the compute dtype per call), else in the
    weight's dtype. A quantized base computes in its compute dtype (``Linear4bit.compute_dtype``,
    else the input's) and returns the input's dtype, as bitsandbytes' forward does.
    ``is``/``ms`` blocks own their merge statistics (``statistics``, a :class:`NormStatistics`).
    Inputs must match the weight's dtype and device (or autocast); any number of leading
    dimensions is accepted.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``, whose instance the
            block builds as its base (use :meth:`from_linear` to wrap an existing layer).
        settings: the block's :class:`BlockSettings` (a :class:`ResLoRAConfig` also does).
        **setting_values: ``mode``, ``rank``, ``alpha``, ``dropout``, ``pre_num``, ``norm_window``,
            ``use_rslora``, replacing those of ``settings`` (or of the defaults of :class:`BlockSettings`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        settings: BlockSettings | None = None,
        **setting_values,
    ) -> None:
        settings = BlockSettings.of(settings, **setting_values)
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._compose(base, settings)

    @classmethod
    def from_linear(
        cls, base: nn.Module, settings: BlockSettings | None = None, **setting_values
    ) -> "FusedResLoRALinear":
        """Compose ``base`` (an ``nn.Linear``, a transformers ``Conv1D``, or a quantized bitsandbytes
        ``Linear4bit`` / ``Linear8bitLt``) with a ResLoRA block:
        ``base`` becomes the block's ``base_layer`` (its Parameters are frozen, not copied), and
        :func:`reslora_kernels.merge_and_unload` gives ``base`` itself back, folded."""
        if isinstance(base, FusedResLoRALinear):
            raise TypeError("from_linear needs an nn.Linear or a transformers Conv1D, got a FusedResLoRALinear")
        problem = base_problem(base)
        if problem is not None:
            raise TypeError(f"from_linear needs an nn.Linear or a transformers Conv1D: got {problem}")
        settings = BlockSettings.of(settings, **setting_values)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._compose(base, settings)
        return layer

    def _compose(self, base: nn.Module, settings: BlockSettings) -> None:
        self.settings = settings
        self.in_features, self.out_features = base_features(base)
        #: Whether the base stores its weight ``[in, out]`` (transformers' ``Conv1D``).
        self.fan_in_fan_out = is_conv1d(base)
        #: Whether the base is a quantized bitsandbytes layer (its weight is dequantized per call).
        self.quantized = is_quantized(base)
        for param in (base.weight, base.bias):
            if param is not None:
                param.requires_grad_(False)
        self.base_layer = base
        weight = base.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(base, settings.autocast_adapter_dtype)}
        self.lora_A = nn.Parameter(torch.empty((settings.rank, self.in_features), **factory))
        self.lora_B = nn.Parameter(torch.empty((self.out_features, settings.rank), **factory))
        stats = NormStatistics(settings.norm_window, device=weight.device) if settings.keeps_norm_statistics else None
        self.statistics = stats
        self._shortcut_hooks: OrderedDict[int, Callable] = OrderedDict()  # RemovableHandle needs a weakref-able dict
        #: How many :func:`reslora_kernels.disable_adapter` contexts are open on this block.
        self._adapter_disabled = 0
        ResLoRAChain([self])
        self.reset_lora_parameters()

    # ------------------------------------------------------------------ the base layer and the settings
    @property
    def weight(self) -> torch.Tensor:
        """The base weight as ``[out, in]``: the base's Parameter, its transposed view for a
        ``Conv1D``, or a quantized base's weight dequantized into a new tensor of its dtype
        (:func:`reslora_kernels.base_layers.base_dtype`)."""
        if self.quantized:
            return quantized.dequantize(self.base_layer, base_dtype(self.base_layer))
        weight = self.base_layer.weight
        return weight.t() if self.fan_in_fan_out else weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias

    mode = property(lambda self: self.settings.mode, doc="``none``, ``is``, ``bs`` or ``ms``.")
    rank = property(lambda self: self.settings.rank, doc="The LoRA rank ``r``.")
    alpha = property(lambda self: self.settings.alpha, doc="The LoRA alpha.")
    pre_num = property(lambda self: self.settings.pre_num, doc="Previous blocks summed over by bs/ms.")
    norm_window = property(lambda self: self.settings.norm_window, doc="Forwards the norm statistics average.")
    scaling = property(lambda self: self.settings.scaling, doc="``alpha / rank`` (``alpha / sqrt(rank)``: rsLoRA).")
    use_rslora = property(lambda self: self.settings.use_rslora, doc="Whether the scaling is rsLoRA's.")

    @property
    def dropout(self) -> float:
        """The dropout probability on the LoRA input; settable (the settings are replaced, validated)."""
        return self.settings.dropout

    @dropout.setter
    def dropout(self, p: float) -> None:
        self.settings = dataclasses.replace(self.settings, dropout=p)

    @property
    def chain(self) -> ResLoRAChain:
        """The chain this block belongs to (its own one-block chain when not linked)."""
        return self._chain

    @property
    def chain_index(self) -> int:
        """Position ``n`` of this block in its chain."""
        return self._chain_index

    # ------------------------------------------------------------------ parameters
    def reset_parameters(self) -> None:
        """Re-initialise the base weight and bias as the base's constructor does, and the block."""
        reset_base_parameters(self.base_layer)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """``lora_A`` kaiming-uniform (a = sqrt(5)), ``lora_B`` zeros: the block starts as the base
        layer; the merge statistics start empty."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.statistics is not None:
            self.statistics.reset()

    def _apply(self, fn, recurse=True):
        # Memory materialised from the meta device (model.to_empty(device=...), as FSDP's and
        # accelerate's deferred initialisation use) holds whatever was there, and HF's
        # init_weights() does not know the adapter: an adapter coming from meta is initialised
        # here, as the constructor would, so no block ever trains from garbage. The base layer
        # is left to the model's own initialisation or checkpoint, as for any nn.Linear.
        from_meta = self.lora_A.is_meta or self.lora_B.is_meta
        super()._apply(fn, recurse)
        if from_meta and not (self.lora_A.is_meta or self.lora_B.is_meta):
            self.reset_lora_parameters()
        return self

    def adapter_state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """The block's adapter, as :func:`reslora_kernels.save_reslora` names it after the block's
        name: ``lora_A``, ``lora_B`` and, for is/ms, ``norm_sq_window``, ``norm_count``,
        ``norm_nonfinite``. The base layer is not part of it."""
        state = self.state_dict(keep_vars=keep_vars)
        return {key.rpartition(".")[2]: t for key, t in state.items() if not key.startswith("base_layer.")}

    # ------------------------------------------------------------------ forward
    def register_shortcut_hook(self, hook: Callable) -> RemovableHandle:
        """Call ``hook(block, x, x_prev, z_prev)`` once per forward pass (not again when gradient
        checkpointing recomputes the block in backward), once the chain has supplied the block's
        shortcut inputs (``x_prev`` for is, ``z_prev`` for ms, else ``None``) and before the
        block computes. For tools that observe the shortcut (the lstsq merge's calibration);
        returns a handle whose ``remove()`` unregisters it."""
        handle = RemovableHandle(self._shortcut_hooks)
        self._shortcut_hooks[handle.id] = hook
        return handle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._adapter_disabled:
            # disable_adapter: the base layer alone; the chain is neither read nor written, no statistics.
            return self.base_layer(x)
        # Attribute lookups on an nn.Module cost microseconds each: read everything once.
        settings, base, lora_A, lora_B, chain = self.settings, self.base_layer, self.lora_A, self.lora_B, self._chain
        bias, mode, quantized_base = base.bias, settings.mode, self.quantized
        # Under autocast the block computes in the autocast dtype, as nn.Linear would; the adapter
        # keeps its own dtype (the casts are differentiable, gradients arrive in it).
        dtype = functional.autocast_dtype(x)
        autocast = dtype is not None
        if quantized_base:
            if not x.is_floating_point():
                raise TypeError(f"{self._where()}: input must be a floating-point tensor, got {x.dtype}")
            dtype = dtype or quantized.compute_dtype(base, x)
            # The fused path reads the weight the dequantization kernel wrote (CUDA: always).
            resolved = backend.resolve_backend(x)
            kernel = True if resolved == "fused" else None
            weight = quantized.dequantized_weight(base, dtype, kernel=kernel)
        else:
            weight = base.weight
            if self.fan_in_fan_out:
                weight = weight.t()
            if dtype is None and lora_A.dtype != weight.dtype and x.dtype == weight.dtype:
                dtype = weight.dtype  # float32 adapters over a 16-bit base: cast per call
        # Fail on a bad input, or a backend that cannot run it, before the chain's pass state is touched.
        try:
            functional.check_inputs(x, weight, bias, lora_A, lora_B, compute_dtype=dtype)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{self._where()}: {err}") from None
        if not quantized_base:
            resolved = backend.resolve_backend(x)
        # A block recomputed in backward (gradient checkpointing) records nothing a second time.
        recomputed = recomputing()
        hooks = self._shortcut_hooks and not recomputed
        x_prev = z_prev = None
        if mode != "none":
            own_A = lora_A
            x_prev, z_prev, lora_A, lora_B = chain.shortcut_inputs(self, x)
            if hooks:
                for hook in tuple(self._shortcut_hooks.values()):
                    hook(self, x, x_prev, z_prev)
            if x_prev is not None or z_prev is not None or lora_A is not own_A:
                try:
                    functional.check_shortcuts(x, lora_A, lora_B, x_prev=x_prev, z_prev=z_prev, compute_dtype=dtype)
                except (TypeError, ValueError) as err:
                    # E.g. a predecessor that ran on other tokens (routed experts): say who met whom.
                    raise type(err)(
                        f"{self._where()}: {err}; the shortcut input came from its predecessor "
                        f"{chain.block_names[self._chain_index - 1]}"
                    ) from None
        elif hooks:
            for hook in tuple(self._shortcut_hooks.values()):
                hook(self, x, None, None)
        input_dtype = x.dtype
        if dtype is not None:
            x, weight, bias, lora_A, lora_B, x_prev, z_prev = functional.cast_to(
                dtype, x, weight, bias, lora_A, lora_B, x_prev, z_prev
            )
        training = self.training
        record = training and self.statistics is not None and not recomputed
        saves = quantized.weight_not_saved(base, weight, kernel=kernel) if quantized_base else nullcontext()
        with saves:
            y, z, x_sqnorm = functional.call(
                resolved,
                x,
                weight,
                bias,
                lora_A,
                lora_B,
                settings.scaling,
                x_prev=x_prev,
                z_prev=z_prev,
                dropout_p=settings.dropout if training else 0.0,
                compute_x_sqnorm=record and mode == "is",
                autocast=autocast,
            )
        if mode != "none":
            chain.after_forward(self, x, z, y)
        if record:
            self.statistics.record(x_sqnorm if mode == "is" else reference.squared_norm(z))
        if quantized_base and y.dtype != input_dtype and not autocast:
            y = y.to(input_dtype)  # bitsandbytes' forward returns the input's dtype
        return y

    def _where(self) -> str:
        """The block's name in its chain, for error messages (a shape error in forward should
        start with it): ``"layers.3.q_proj (block 3 of chain 'layers.*.q_proj')"``."""
        chain = self._chain
        name = chain.block_names[self._chain_index] if chain.block_names else "an unlinked block"
        if len(chain) == 1:
            return name if chain.name is None else f"{name} (chain {chain.name!r})"
        return f"{name} (block {self._chain_index} of chain {chain.name!r})"

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}, mode={self.mode!r}"
        )
        if self.mode in ("bs", "ms"):
            text += f", pre_num={self.pre_num}"
        if len(self._chain) > 1:
            text += f", chain={self._chain.name!r}[{self._chain_index}/{len(self._chain)}]"
        return text
