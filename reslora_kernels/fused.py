"""One ResLoRA block on the fused Triton ops, forward and backward.

Forward (two launches)::

    z, ||x||^2 = lora_down(x, A, x_prev)           # z = drop(x [+ x_prev]) A^T
    u = z [+ z_prev]                                # ms only: an [M, r] add
    y = linear_lora_fwd(x, W, b, u, B, s)          # x W^T + b + s u B^T

Backward (three launches)::

    g, dB   = lora_grad_out(grad_out, B, u, s)     # g = s grad_out B, dB = s grad_out^T u
    g_z     = g [+ grad_z]                          # ms: later blocks' gradient of this z
    dx, dxp = linear_lora_dx(grad_out, W, g_z, A)  # grad_out W + drop'(g_z A); dxp = drop'(g_z A)
    dA      = lora_grad_A(g_z, x, x_prev)          # g_z^T drop(x [+ x_prev])

Saved for backward: ``x``, ``x_prev``, ``z`` and ``z_prev`` by reference (``u = z + z_prev`` is
re-added in backward: an [M, r] add), the parameters and the dropout seed (a 0-d int64 device
tensor: the kernels load it, the host never reads it); never an ``[M, N]`` tensor, a copy of an
input, or a mask.

Two wrappers share :func:`_forward` and :func:`_backward`: an autograd Function in eager mode (the
lowest per-call cost), and the custom ops ``reslora_kernels::fused_forward`` / ``fused_backward``
registered with ``torch.library`` for ``torch.compile``, which sees each as one opaque op (no
graph break at the launchers' Python: autotuners, allocation, grids).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops

__all__ = ["FusedResLoRAFunction", "fused_reslora_linear"]


# Each tensor op called from Python costs microseconds of dispatch, about what a launcher costs:
# 2-D tensors skip the reshapes and views.
def _rows(t: Tensor) -> Tensor:
    """[..., C] -> [M, C], a view whenever the strides allow one."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _shaped(t: Tensor, like: Tensor) -> Tensor:
    """[M, C] -> [*like.shape[:-1], C]."""
    return t if like.dim() == 2 else t.view(*like.shape[:-1], t.shape[-1])


def _forward(x, weight, bias, lora_A, lora_B, x_prev, z_prev, dropout_seed, scaling, input_scale, dropout_p, sqnorm):
    """``(y, z, ||x||^2 or None)`` with the leading dims of ``x``."""
    x2 = _rows(x)
    z, x_sqnorm = ops.lora_down(
        x2,
        lora_A,
        None if x_prev is None else _rows(x_prev),
        input_scale=input_scale,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        compute_x_sqnorm=sqnorm,
    )
    u = z if z_prev is None else z + _rows(z_prev)
    y = ops.linear_lora_fwd(x2, weight, bias, u, lora_B, scaling)
    return _shaped(y, x), _shaped(z, x), x_sqnorm


def _backward(
    grad_y, grad_z, x, x_prev, weight, lora_A, lora_B, z, z_prev, dropout_seed, scaling, input_scale, dropout_p, needs
):
    """``(dx, dx_prev, dW, dbias, dA, dB, dz_prev)``, ``None`` where ``needs`` (the seven flags,
    in that order) says the gradient is not wanted."""
    want_x, want_prev, want_w, want_bias, want_a, want_b, want_z_prev = needs
    x2 = _rows(x)
    if grad_y is None:
        grad_y2 = torch.zeros((x2.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    else:
        grad_y2 = _rows(grad_y)
    u = _rows(z) if z_prev is None else _rows(z) + _rows(z_prev)
    g, grad_B = ops.lora_grad_out(grad_y2, lora_B, u, scaling)
    grad_z_prev = _shaped(g.to(x.dtype), x) if want_z_prev else None
    g_z = g if grad_z is None else g + _rows(grad_z)
    grad_x = grad_x_prev = None
    if want_x or want_prev:
        grad_x, grad_x_prev = ops.linear_lora_dx(
            grad_y2,
            weight,
            g_z,
            lora_A,
            input_scale=input_scale,
            dropout_p=dropout_p,
            dropout_seed=dropout_seed,
            store_prev=want_prev,
        )
        grad_x = _shaped(grad_x, x)
        if grad_x_prev is not None:
            grad_x_prev = _shaped(grad_x_prev, x)
    grad_A = None
    if want_a:
        grad_A = ops.lora_grad_A(
            g_z,
            x2,
            None if x_prev is None else _rows(x_prev),
            input_scale=input_scale,
            dropout_p=dropout_p,
            dropout_seed=dropout_seed,
        )
    # The base layer is frozen in ResLoRA, but a user may unfreeze it: plain PyTorch then.
    grad_W = grad_y2.t() @ x2 if want_w else None
    grad_bias = grad_y2.sum(0) if want_bias else None
    return (
        grad_x,
        grad_x_prev if want_prev else None,
        grad_W,
        grad_bias,
        grad_A,
        grad_B if want_b else None,
        grad_z_prev,
    )


class FusedResLoRAFunction(torch.autograd.Function):
    """The eager wrapper: ``apply(x, weight, bias, lora_A, lora_B, x_prev, z_prev, dropout_seed,
    scaling, input_scale, dropout_p, compute_x_sqnorm) -> (y, z, x_sqnorm or None)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, x_prev, z_prev, seed, scaling, input_scale, p, sqnorm):
        y, z, x_sqnorm = _forward(
            x, weight, bias, lora_A, lora_B, x_prev, z_prev, seed, scaling, input_scale, p, sqnorm
        )
        ctx.save_for_backward(x, x_prev, weight, lora_A, lora_B, z, z_prev, seed)
        ctx.scaling, ctx.input_scale, ctx.dropout_p, ctx.has_bias = scaling, input_scale, p, bias is not None
        ctx.set_materialize_grads(False)  # an unused z (every mode but ms) brings no zero tensor
        if x_sqnorm is not None:
            ctx.mark_non_differentiable(x_sqnorm)
        return y, z, x_sqnorm

    @staticmethod
    def backward(ctx, grad_y, grad_z, _grad_sqnorm):
        x, x_prev, weight, lora_A, lora_B, z, z_prev, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        needs = (need[0], x_prev is not None and need[5], need[1], ctx.has_bias and need[2], need[3], need[4])
        needs += (z_prev is not None and need[6],)
        dx, dx_prev, dW, dbias, dA, dB, dz_prev = _backward(
            grad_y, grad_z, x, x_prev, weight, lora_A, lora_B, z, z_prev, seed, ctx.scaling, ctx.input_scale,
            ctx.dropout_p, needs,
        )  # fmt: skip
        return dx, dW, dbias, dA, dB, dx_prev, dz_prev, None, None, None, None, None


# ---------------------------------------------------------------------------- torch.compile
# Custom ops return tensors, never None: an absent result is an empty tensor, mapped back to None.
def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("reslora_kernels::fused_forward", mutates_args=())
def fused_forward_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    x_prev: Optional[Tensor],
    z_prev: Optional[Tensor],
    dropout_seed: Optional[Tensor],
    scaling: float,
    input_scale: float,
    dropout_p: float,
    compute_x_sqnorm: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, z, ||x||^2)`` of one block (``||x||^2`` is an empty tensor unless asked for)."""
    y, z, x_sqnorm = _forward(
        x, weight, bias, lora_A, lora_B, x_prev, z_prev, dropout_seed, scaling, input_scale, dropout_p,
        compute_x_sqnorm,
    )  # fmt: skip
    # Outputs must not alias each other or an input; z is its own buffer already.
    return y, z, x_sqnorm if x_sqnorm is not None else x.new_empty(0, dtype=torch.float32)


@fused_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, x_prev, z_prev, dropout_seed, scaling, input_scale, dropout_p, sqnorm):
    lead = x.shape[:-1]
    y = x.new_empty((*lead, weight.shape[0]))
    z = x.new_empty((*lead, lora_A.shape[0]))
    return y, z, x.new_empty(() if sqnorm else (0,), dtype=torch.float32)


@torch.library.custom_op("reslora_kernels::fused_backward", mutates_args=())
def fused_backward_op(
    grad_y: Tensor,
    grad_z: Optional[Tensor],
    x: Tensor,
    x_prev: Optional[Tensor],
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    z: Tensor,
    z_prev: Optional[Tensor],
    dropout_seed: Optional[Tensor],
    scaling: float,
    input_scale: float,
    dropout_p: float,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dx_prev, dW, dbias, dA, dB, dz_prev)``, an empty tensor where ``needs`` says no."""
    grads = _backward(
        grad_y, grad_z, x, x_prev, weight, lora_A, lora_B, z, z_prev, dropout_seed, scaling, input_scale, dropout_p,
        tuple(needs),
    )  # fmt: skip
    return tuple(_or_empty(g, x) for g in grads)


@fused_backward_op.register_fake
def _(grad_y, grad_z, x, x_prev, weight, lora_A, lora_B, z, z_prev, seed, scaling, input_scale, p, needs):
    shapes = (x.shape, x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape, z.shape)
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, x_prev, z_prev, seed, scaling, input_scale, p, _ = inputs
    ctx.save_for_backward(x, x_prev, weight, lora_A, lora_B, output[1], z_prev, seed)
    ctx.scaling, ctx.input_scale, ctx.dropout_p, ctx.has_bias = scaling, input_scale, p, bias is not None
    ctx.mark_non_differentiable(output[2])


def _backward_op(ctx, grad_y, grad_z, _grad_sqnorm):
    x, x_prev, weight, lora_A, lora_B, z, z_prev, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = [need[0], x_prev is not None and need[5], need[1], ctx.has_bias and need[2], need[3], need[4]]
    needs.append(z_prev is not None and need[6])
    if grad_y is None:
        grad_y = torch.zeros((*x.shape[:-1], weight.shape[0]), device=x.device, dtype=x.dtype)
    grads = torch.ops.reslora_kernels.fused_backward(
        grad_y, grad_z, x, x_prev, weight, lora_A, lora_B, z, z_prev, seed, ctx.scaling, ctx.input_scale,
        ctx.dropout_p, needs,
    )  # fmt: skip
    dx, dx_prev, dW, dbias, dA, dB, dz_prev = (g if flag else None for g, flag in zip(grads, needs))
    return dx, dW, dbias, dA, dB, dx_prev, dz_prev, None, None, None, None, None


fused_forward_op.register_autograd(_backward_op, setup_context=_setup_context)


def fused_reslora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    *,
    x_prev: Tensor | None = None,
    z_prev: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | Tensor | None = None,
    compute_x_sqnorm: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The fused counterpart of :func:`reslora_kernels.reference.reslora_linear`, same signature::

    z = drop(x [+ x_prev]) A^T;   y = x W^T + b + s * (z [+ z_prev]) B^T

    ``dropout_seed`` is an int or a 0-d integer tensor (ideally already on x's device, e.g. drawn
    there: then no step of the forward or backward reads it on the host).
    """
    input_scale = 1.0
    if x_prev is x:
        # First block of an input-shortcut chain: x_{-1} := x_0, so the LoRA input is 2 x.
        # Folding that into a scale avoids reading x twice and summing two gradients of x.
        x_prev, input_scale = None, 2.0
    seed = None
    if dropout_p > 0.0:
        if dropout_seed is None:
            raise ValueError("dropout_p > 0 needs a dropout_seed")
        seed = ops.seed_tensor(dropout_seed, x.device)
    args = (x, weight, bias, lora_A, lora_B, x_prev, z_prev, seed, float(scaling), input_scale, float(dropout_p))
    if torch.compiler.is_compiling():
        y, z, x_sqnorm = torch.ops.reslora_kernels.fused_forward(*args, compute_x_sqnorm)
        return y, z, x_sqnorm if compute_x_sqnorm else None
    return FusedResLoRAFunction.apply(*args, compute_x_sqnorm)
