"""FusedResLoRALinear: a drop-in ``nn.Linear`` carrying a ResLoRA block."""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from . import functional, reference
from .chain import ResLoRAChain
from .config import validate_settings, warn_settings

__all__ = ["FusedResLoRALinear", "FusedResLoRAConv1D", "is_conv1d"]


def is_conv1d(module: object) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layer, weight ``[in, out]``).
    Checked without importing transformers: a model holding one has imported it already."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


class FusedResLoRALinear(nn.Linear):
    """``nn.Linear`` with a frozen base weight and a trainable ResLoRA block.

    ``y = x W^T + b + s * (drop(x [+ x_prev]) A^T [+ z_prev]) B^T`` with ``s = alpha / rank``;
    the shortcut terms come from the block's predecessors in its :class:`ResLoRAChain` (see
    docs/design.md section 2). A block that is not linked behaves as the first block of a chain.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        rank: LoRA rank ``r`` (>= 1).
        alpha: LoRA alpha; ``scaling = alpha / rank``.
        dropout: dropout probability on the LoRA input, training mode only.
        mode: ``"none"``, ``"is"``, ``"bs"`` or ``"ms"``.
        pre_num: previous blocks summed over by ``bs``/``ms`` (``-1``: all).
        norm_window: training forwards averaged by the input-norm merge statistics.

    ``weight`` and ``bias`` are frozen; ``lora_A`` ``[rank, in]`` (kaiming-uniform) and ``lora_B``
    ``[out, rank]`` (zeros) are trained, in the weight's dtype. Inputs must match the weight's
    dtype and device; any number of leading dimensions is accepted.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        mode: str = "none",
        pre_num: int = 1,
        norm_window: int = 100,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        bias_param = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self._setup(weight, bias_param, rank, alpha, dropout, mode, pre_num, norm_window)
        self.reset_parameters()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        mode: str = "none",
        pre_num: int = 1,
        norm_window: int = 100,
    ) -> "FusedResLoRALinear":
        """Wrap ``linear``: its ``weight`` and ``bias`` Parameters are reused (not copied) and frozen;
        :func:`reslora_kernels.merge_and_unload` gives ``linear`` itself back, folded."""
        if is_conv1d(linear) or cls.fan_in_fan_out:
            raise TypeError("a transformers Conv1D (weight [in, out]) is wrapped by FusedResLoRAConv1D.from_conv1d")
        if not isinstance(linear, nn.Linear) or isinstance(linear, FusedResLoRALinear):
            raise TypeError(f"from_linear needs a plain nn.Linear, got {type(linear).__name__}")
        return cls._wrap(linear, rank, alpha, dropout, mode, pre_num, norm_window)

    @classmethod
    def _wrap(cls, base, rank, alpha, dropout, mode, pre_num, norm_window) -> "FusedResLoRALinear":
        weight = base.weight
        if not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
            raise TypeError(
                f"a ResLoRA base layer needs a floating-point weight Parameter, got a {type(weight).__name__} "
                f"of {getattr(weight, 'dtype', None)}"
            )
        layer = cls.__new__(cls)
        layer._setup(weight, base.bias, rank, alpha, dropout, mode, pre_num, norm_window)
        # Kept, unregistered (its Parameters are the layer's), so that a merge puts this very module
        # back: its type, attributes and hooks.
        object.__setattr__(layer, "_original_module", base)
        layer.reset_lora_parameters()
        return layer

    #: How the base weight Parameter is stored: ``False`` as ``nn.Linear`` (``[out, in]``), ``True``
    #: as transformers' ``Conv1D`` (``[in, out]``, :class:`FusedResLoRAConv1D`).
    fan_in_fan_out = False

    def _setup(self, weight, bias, rank, alpha, dropout, mode, pre_num, norm_window) -> None:
        validate_settings(rank=rank, alpha=alpha, dropout=dropout, mode=mode, pre_num=pre_num, norm_window=norm_window)
        warn_settings(alpha=alpha, stacklevel=4)
        # nn.Linear.__init__ would allocate a weight we may not want (from_linear reuses one).
        nn.Module.__init__(self)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = weight.shape
        else:
            self.out_features, self.in_features = weight.shape
        weight.requires_grad_(False)
        self.weight = weight
        if bias is not None:
            bias.requires_grad_(False)
        self.bias = bias
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.dropout = float(dropout)
        self.mode = mode
        self.pre_num = pre_num
        self.norm_window = norm_window
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty((rank, self.in_features), **factory))
        self.lora_B = nn.Parameter(torch.empty((self.out_features, rank), **factory))
        if mode in ("is", "ms"):
            # Ring buffer of ||x||^2 (is) or ||z||^2 (ms) per training forward, kept on the device
            # so that recording never waits for the GPU; read only when merging. norm_nonfinite
            # counts the forwards whose norm was Inf/NaN and was therefore left out.
            on = {"device": weight.device}
            self.register_buffer("norm_sq_window", torch.zeros(norm_window, dtype=torch.float32, **on))
            self.register_buffer("norm_count", torch.zeros((), dtype=torch.int64, **on))
            self.register_buffer("norm_nonfinite", torch.zeros((), dtype=torch.int64, **on))
        self._shortcut_hooks: OrderedDict[int, Callable] = OrderedDict()  # RemovableHandle needs a weakref-able dict
        ResLoRAChain([self])

    # ------------------------------------------------------------------ parameters
    def reset_parameters(self) -> None:
        """Re-initialise the base weight and bias as ``nn.Linear`` does, and the LoRA block."""
        super().reset_parameters()
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """``lora_A`` kaiming-uniform (a = sqrt(5)), ``lora_B`` zeros: the block starts as identity;
        the merge statistics start empty."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        self._reset_statistics()

    @torch.no_grad()
    def _reset_statistics(self) -> None:
        for name in ("norm_sq_window", "norm_count", "norm_nonfinite"):
            buffer = self._buffers.get(name)
            if buffer is not None:
                buffer.zero_()

    def _apply(self, fn, recurse=True):
        # Values materialised from the meta device (to_empty, as FSDP and init_empty_weights use)
        # are whatever memory held: statistics coming from meta start empty instead.
        count = self._buffers.get("norm_count")
        from_meta = count is not None and count.is_meta
        super()._apply(fn, recurse)
        # model.half() / .to(dtype) cast float buffers too; squared norms of a whole batch overflow
        # float16 (65504), so the ring buffer stays float32 whatever the module's dtype.
        window = self._buffers.get("norm_sq_window")
        if window is not None and window.dtype != torch.float32:
            self._buffers["norm_sq_window"] = window.float()
        if from_meta and not self._buffers["norm_count"].is_meta:
            self._reset_statistics()
        # The original module (what a merge gives back) follows the Parameters, should _apply have
        # replaced them instead of changing them in place.
        original = self.__dict__.get("_original_module")
        if original is not None:
            for name in ("weight", "bias"):
                if self._parameters.get(name) is not None:
                    original._parameters[name] = self._parameters[name]
        return self

    @property
    def chain(self) -> ResLoRAChain:
        """The chain this block belongs to (its own one-block chain when not linked)."""
        return self._chain

    @property
    def chain_index(self) -> int:
        """Position ``n`` of this block in its chain."""
        return self._chain_index

    # ------------------------------------------------------------------ forward
    def register_shortcut_hook(self, hook: Callable) -> RemovableHandle:
        """Call ``hook(block, x, x_prev, z_prev)`` in every forward, once the chain has supplied the
        block's shortcut inputs (``x_prev`` for is, ``z_prev`` for ms, else ``None``) and before the
        block computes. For tools that observe the shortcut (the lstsq merge's calibration);
        returns a handle whose ``remove()`` unregisters it."""
        handle = RemovableHandle(self._shortcut_hooks)
        self._shortcut_hooks[handle.id] = hook
        return handle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Attribute lookups on an nn.Module cost microseconds each: read everything once.
        weight, bias, lora_A, lora_B, chain, mode = (
            self.weight,
            self.bias,
            self.lora_A,
            self.lora_B,
            self._chain,
            self.mode,
        )
        # Under autocast the block computes in the autocast dtype, as nn.Linear would; the adapter
        # keeps its own dtype (the casts are differentiable, gradients arrive in it).
        dtype = functional.autocast_dtype(x)
        # Fail on a bad input (or a misspelled RESLORA_BACKEND) before the chain's pass state is touched.
        try:
            functional.check_inputs(x, weight, bias, lora_A, lora_B, compute_dtype=dtype)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{self._where()}: {err}") from None
        functional.requested_backend()
        x_prev = z_prev = None
        if mode != "none":
            own_A = lora_A
            x_prev, z_prev, lora_A, lora_B = chain.shortcut_inputs(self, x)
            if self._shortcut_hooks:
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
        elif self._shortcut_hooks:
            for hook in tuple(self._shortcut_hooks.values()):
                hook(self, x, None, None)
        if dtype is not None:
            x, weight, bias, lora_A, lora_B, x_prev, z_prev = functional.cast_to(
                dtype, x, weight, bias, lora_A, lora_B, x_prev, z_prev
            )
        training = self.training
        record = training and mode in ("is", "ms")
        y, z, x_sqnorm = functional.run_reslora_linear(
            x,
            weight,
            bias,
            lora_A,
            lora_B,
            self.scaling,
            x_prev=x_prev,
            z_prev=z_prev,
            dropout_p=self.dropout if training else 0.0,
            compute_x_sqnorm=record and mode == "is",
        )
        if mode != "none":
            chain.after_forward(self, x, z, y)
        if record:
            self._record_norm(x_sqnorm if mode == "is" else reference.squared_norm(z))
        return y

    @torch.no_grad()
    def _record_norm(self, sqnorm: torch.Tensor) -> None:
        # Device-side slot arithmetic: no .item(), so a CUDA forward never waits for the host.
        # A non-finite norm (an overflowing step) is not recorded: its slot keeps the value it had,
        # norm_count does not advance, and norm_nonfinite counts it instead.
        sqnorm = sqnorm.reshape(1).to(self.norm_sq_window.dtype)
        finite = torch.isfinite(sqnorm)
        slot = torch.remainder(self.norm_count, self.norm_window).view(1)
        kept = torch.where(finite, sqnorm, self.norm_sq_window.index_select(0, slot))
        self.norm_sq_window.index_copy_(0, slot, kept)
        self.norm_count.add_(finite.view(()).to(self.norm_count.dtype))
        self.norm_nonfinite.add_((~finite).view(()).to(self.norm_nonfinite.dtype))

    def recorded_norm_mean(self) -> float:
        """Mean Frobenius norm of the block's input (is) or down-projection ``z`` (ms) over the
        last ``norm_window`` training forwards whose norm was finite (Inf/NaN norms are left out
        and counted in ``norm_nonfinite``); zero norms are skipped as in the authors' code, and
        0.0 means nothing was recorded. Reads the device (merge time only)."""
        if self.mode not in ("is", "ms"):
            raise ValueError(f"mode {self.mode!r} records no norm statistics")
        filled = min(int(self.norm_count), self.norm_window)
        norms = self.norm_sq_window[:filled].double().sqrt()
        norms = norms[norms > 0]
        return float(norms.mean()) if norms.numel() else 0.0

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
        if self.fan_in_fan_out:
            text += ", fan_in_fan_out=True"
        if len(self._chain) > 1:
            text += f", chain={self._chain.name!r}[{self._chain_index}/{len(self._chain)}]"
        return text


class FusedResLoRAConv1D(FusedResLoRALinear):
    """transformers' ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``) with a ResLoRA block.

    The base weight Parameter keeps Conv1D's ``[in, out]`` layout, so state dicts keep the
    model's shapes; ``weight`` reads as its transposed ``[out, in]`` view, which is what the
    ResLoRA op, the merge and everything else of :class:`FusedResLoRALinear` take (the backends
    take strides: nothing is copied). Build one with :meth:`from_conv1d`;
    :func:`reslora_kernels.merge_and_unload` gives the Conv1D back.
    """

    fan_in_fan_out = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        mode: str = "none",
        pre_num: int = 1,
        norm_window: int = 100,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        weight = nn.Parameter(torch.empty((in_features, out_features), **factory))
        bias = nn.Parameter(torch.empty(out_features, **factory))  # Conv1D always has one
        self._setup(weight, bias, rank, alpha, dropout, mode, pre_num, norm_window)
        self.reset_parameters()

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as ``[out, in]``: a view of the ``[in, out]`` Parameter."""
        param = self._parameters.get("weight")
        if param is None:  # not registered yet (nn.Module.__setattr__ probes with hasattr)
            raise AttributeError("weight")
        return param.t()

    @classmethod
    def from_conv1d(
        cls,
        conv: nn.Module,
        *,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        mode: str = "none",
        pre_num: int = 1,
        norm_window: int = 100,
    ) -> "FusedResLoRAConv1D":
        """Wrap ``conv`` (a transformers ``Conv1D``): its Parameters are reused (not copied) and
        frozen; :func:`reslora_kernels.merge_and_unload` gives ``conv`` itself back, folded."""
        if not is_conv1d(conv):
            raise TypeError(f"from_conv1d needs a transformers Conv1D, got {type(conv).__name__}")
        return cls._wrap(conv, rank, alpha, dropout, mode, pre_num, norm_window)

    def reset_parameters(self) -> None:
        """Re-initialise the base weight and bias as ``Conv1D`` does (normal, std 0.02; zeros),
        and the LoRA block."""
        with torch.no_grad():
            nn.init.normal_(self._parameters["weight"], std=0.02)
            nn.init.zeros_(self.bias)
        self.reset_lora_parameters()
