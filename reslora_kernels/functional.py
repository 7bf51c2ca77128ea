"""The functional ResLoRA op: check, cast, call. Inputs are checked (shapes, dtypes, devices)
before anything runs, cast to the autocast dtype where autocast is on (as ``nn.Linear`` does), and
handed to the op :mod:`reslora_kernels.backend` selects.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from . import backend

__all__ = [
    "check_inputs",
    "check_shortcuts",
    "autocast_dtype",
    "cast_to",
    "draw_dropout_seed",
    "reslora_linear",
    "call",
]


_NO_CONTEXT = nullcontext()


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    *,
    x_prev: torch.Tensor | None = None,
    z_prev: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """Raise a clear error for inconsistent shapes, dtypes or devices, before any compute.
    With ``compute_dtype`` (autocast, see :func:`autocast_dtype`) the floating tensors only need
    to be castable to it, as autocast casts them; otherwise every dtype must equal the input's."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got {_describe(weight)}")
    out_features, in_features = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"input last dim must be in_features={in_features}, got input {_describe(x)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must be [rank, in_features={in_features}], got {_describe(lora_A)}")
    rank = lora_A.shape[0]
    if lora_B.dim() != 2 or lora_B.shape != (out_features, rank):
        raise ValueError(f"lora_B must be [out_features={out_features}, rank={rank}], got {_describe(lora_B)}")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must be [out_features={out_features}], got {_describe(bias)}")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {x.dtype}")
    _check_alike(x, {"weight": weight, "bias": bias}, compute_dtype)
    check_shortcuts(x, lora_A, lora_B, x_prev=x_prev, z_prev=z_prev, compute_dtype=compute_dtype)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _check_alike(x: torch.Tensor, named: dict, compute_dtype: torch.dtype | None = None) -> None:
    for name, t in named.items():
        if t is None:
            continue
        if compute_dtype is not None and _autocast_eligible(t):
            pass  # autocast casts it to compute_dtype
        elif t.dtype != x.dtype:
            raise TypeError(f"dtype mismatch: input is {x.dtype} but {name} is {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"device mismatch: input is on {x.device} but {name} is on {t.device}")


def check_shortcuts(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    *,
    x_prev: torch.Tensor | None = None,
    z_prev: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """The part of :func:`check_inputs` about the adapter and the shortcut inputs: what a layer
    still has to check once its chain has supplied them."""
    rank = lora_A.shape[0]
    named = {"lora_A": lora_A, "lora_B": lora_B}
    if x_prev is not None:
        if x_prev.shape != x.shape:
            raise ValueError(f"x_prev must have the input's shape {tuple(x.shape)}, got {_describe(x_prev)}")
        named["x_prev"] = x_prev
    if z_prev is not None:
        expected = (*x.shape[:-1], rank)
        if tuple(z_prev.shape) != expected:
            raise ValueError(f"z_prev must be {expected} (input's leading dims, rank), got {_describe(z_prev)}")
        named["z_prev"] = z_prev
    _check_alike(x, named, compute_dtype)


def draw_dropout_seed(device: torch.device | str) -> torch.Tensor:
    """A fresh dropout seed: a 0-d int64 tensor on ``device`` drawn from that device's generator
    (``torch.manual_seed`` makes it repeatable, gradient checkpointing's RNG replay redraws the
    same one, and nothing is read back to the host)."""
    return torch.randint(0, 2**31 - 1, (), device=device)


def _autocast_eligible(t: torch.Tensor) -> bool:
    # What autocast casts to its low-precision dtype: floating tensors other than float64.
    return t.is_floating_point() and t.dtype != torch.float64


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the block computes in under ``torch.autocast`` (as ``nn.Linear`` would: the
    autocast dtype for an eligible input), or ``None`` when autocast is off for x's device."""
    device_type = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return None
    if not enabled or not _autocast_eligible(x):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_to(dtype: torch.dtype | None, *tensors: torch.Tensor | None) -> tuple:
    """``tensors`` with every autocast-eligible one cast to ``dtype`` (differentiably: gradients
    reach the originals in their own dtype); identity preserved between equal inputs (the first
    block of an input-shortcut chain passes ``x_prev is x``)."""
    if dtype is None:
        return tensors
    done: dict[int, torch.Tensor] = {}
    out = []
    for t in tensors:
        if t is None or not _autocast_eligible(t):
            out.append(t)
            continue
        if id(t) not in done:
            done[id(t)] = t.to(dtype)
        out.append(done[id(t)])
    return tuple(out)


def reslora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    x_prev: torch.Tensor | None = None,
    z_prev: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    compute_x_sqnorm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One ResLoRA block on the selected backend (:func:`reslora_kernels.backend.requested_backend`)::

        z = drop(x [+ x_prev]) A^T;   y = x W^T + b + s * (z [+ z_prev]) B^T

    Returns ``(y, z, x_sqnorm)``; see :func:`reslora_kernels.reference.reslora_linear`. Under
    ``torch.autocast`` it computes in the autocast dtype, as ``nn.Linear`` does.
    """
    dtype = autocast_dtype(x)
    check_inputs(
        x, weight, bias, lora_A, lora_B, x_prev=x_prev, z_prev=z_prev, dropout_p=dropout_p, compute_dtype=dtype
    )
    resolved = backend.resolve_backend(x)
    if dtype is not None:
        x, weight, bias, lora_A, lora_B, x_prev, z_prev = cast_to(dtype, x, weight, bias, lora_A, lora_B, x_prev,
                                                                  z_prev)  # fmt: skip
    return call(
        resolved,
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        scaling,
        x_prev=x_prev,
        z_prev=z_prev,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        compute_x_sqnorm=compute_x_sqnorm,
        autocast=dtype is not None,
    )


def call(
    resolved: str,
    x,
    weight,
    bias,
    lora_A,
    lora_B,
    scaling,
    *,
    x_prev=None,
    z_prev=None,
    dropout_p=0.0,
    dropout_seed=None,
    compute_x_sqnorm=False,
    autocast=False,
):
    """:func:`reslora_linear` on inputs already checked and cast, on backend ``resolved`` (what
    :func:`reslora_kernels.backend.resolve_backend` said for ``x``: the layer resolves it before
    its chain is touched). With ``autocast`` the op runs with autocast off: its inputs are in the
    compute dtype already, and autocast inside it would recast its matmuls."""
    if dropout_p > 0.0 and dropout_seed is None:
        dropout_seed = draw_dropout_seed(x.device)
    impl = backend.select(
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        x_prev=x_prev,
        z_prev=z_prev,
        dropout_p=dropout_p,
        compute_x_sqnorm=compute_x_sqnorm,
        resolved=resolved,
    )
    with torch.autocast(x.device.type, enabled=False) if autocast else _NO_CONTEXT:
        return impl(
            x,
            weight,
            bias,
            lora_A,
            lora_B,
            float(scaling),
            x_prev=x_prev,
            z_prev=z_prev,
            dropout_p=float(dropout_p),
            dropout_seed=dropout_seed,
            compute_x_sqnorm=compute_x_sqnorm,
        )
