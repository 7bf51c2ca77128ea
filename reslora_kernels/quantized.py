"""A block over a quantized base (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``): the weight is
dequantized on every call into a workspace shared by all blocks of its shape, and nothing
full-precision of it is saved for backward.

The block runs the same op as over a float base (any backend) on ``W = dequantize(base)``. The op
saves its operands for backward as usual; :func:`weight_not_saved` intercepts the save of the
dequantized weight (``torch.autograd.graph.saved_tensors_hooks``): what is kept is a reference to
the base module, and backward dequantizes again into the workspace. Every other saved tensor goes
to the hooks that were active outside (gradient checkpointing's, or a user's), as it would without
this one. So a model holds one dequantized weight per distinct (device, dtype, shape), never one
per layer: blocks run one after another (one stream), and each reads the workspace right after
filling it.

Under ``torch.compile`` the weight is dequantized into a fresh tensor and no hook is installed
(Inductor plans the memory of the graph it builds).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .quant import dequantize, describe

__all__: list[str] = []  # used by the layer and the merge; nothing here is user-facing

_WORKSPACES: dict[tuple, torch.Tensor] = {}


def compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype a block over the quantized ``base`` computes in for input ``x``:
    ``Linear4bit.compute_dtype``, else the input's dtype (as bitsandbytes' own forward does)."""
    info = describe(base)
    return info.compute_dtype if info.compute_dtype is not None else x.dtype


def workspace(device: torch.device, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    """The ``[out, in]`` buffer of ``dtype`` on ``device`` that every block of that shape
    dequantizes into (allocated once)."""
    key = (device, dtype, tuple(shape))
    buffer = _WORKSPACES.get(key)
    if buffer is None:
        buffer = _WORKSPACES[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffer


def clear_workspaces() -> None:
    """Free every dequantization workspace (they are allocated again at the next call)."""
    _WORKSPACES.clear()


def dequantized_weight(base: nn.Module, dtype: torch.dtype, *, kernel: bool | None = None) -> torch.Tensor:
    """``W [out, in]`` of the quantized ``base`` in ``dtype``, written into the shared workspace
    (a fresh tensor while ``torch.compile`` traces)."""
    if torch.compiler.is_compiling():
        return dequantize(base, dtype, kernel=kernel)
    info = describe(base)
    return dequantize(base, out=workspace(info.device, dtype, info.shape), kernel=kernel)


class _Dequantize:
    """What is saved in place of a view of the dequantized weight: how to make it again."""

    __slots__ = ("base", "dtype", "kernel", "size", "stride", "offset")

    def __init__(self, base, dtype, kernel, view: torch.Tensor) -> None:
        self.base, self.dtype, self.kernel = base, dtype, kernel
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()

    def __call__(self) -> torch.Tensor:
        weight = dequantized_weight(self.base, self.dtype, kernel=self.kernel)
        return weight.as_strided(self.size, self.stride, self.offset)


def _shares_storage(t: torch.Tensor, storage_ptr: int, weight: torch.Tensor) -> bool:
    if t.dtype != weight.dtype or t.device != weight.device or t.requires_grad:
        return False
    try:
        return t.untyped_storage().data_ptr() == storage_ptr
    except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. subclasses)
        return False


@contextlib.contextmanager
def weight_not_saved(base: nn.Module, weight: torch.Tensor, *, kernel: bool | None = None):
    """Within the block, save for backward a recipe instead of any view of ``weight`` (the
    dequantized weight of ``base``): backward dequantizes it again. Other saved tensors go to the
    hooks active outside, or are saved as they are."""
    if torch.compiler.is_compiling():
        yield
        return
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    storage_ptr = weight.untyped_storage().data_ptr()
    dtype = weight.dtype

    def pack(t: torch.Tensor):
        if _shares_storage(t, storage_ptr, weight):
            return _Dequantize(base, dtype, kernel, t)
        return outer[0](t) if outer is not None else t

    def unpack(packed):
        if isinstance(packed, _Dequantize):
            return packed()
        return outer[1](packed) if outer is not None else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
