"""The autograd Function composing the fused ops: one ResLoRA block, forward and backward.

Forward (two launches)::

    z, ||x||^2 = lora_down(x, A, x_prev)           # z = drop(x [+ x_prev]) A^T
    u = z [+ z_prev]                                # ms only: an [M, r] add
    y = linear_lora_fwd(x, W, b, u, B, s)          # x W^T + b + s u B^T

Backward (three launches)::

    g, dB   = lora_grad_out(grad_out, B, u, s)     # g = s grad_out B, dB = s grad_out^T u
    g_z     = g [+ grad_z]                          # ms: later blocks' gradient of this z
    dx, dxp = linear_lora_dx(grad_out, W, g_z, A)  # grad_out W + drop'(g_z A); dxp = drop'(g_z A)
    dA      = lora_grad_A(g_z, x, x_prev)          # g_z^T drop(x [+ x_prev])

Saved for backward: ``x`` and ``x_prev`` by reference, ``u`` ``[M, r]``, the parameters and the
dropout seed (a 0-d int64 device tensor: the kernels load it, the host never reads it); never an
``[M, N]`` tensor, a copy of an input, or a mask.
"""

from __future__ import annotations

import torch

from . import ops

__all__ = ["FusedResLoRAFunction", "fused_reslora_linear"]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [M, C], a view whenever the strides allow one."""
    return t.reshape(-1, t.shape[-1])


class FusedResLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        x_prev,
        z_prev,
        scaling,
        input_scale,
        dropout_p,
        dropout_seed,
        compute_x_sqnorm,
    ):
        x2 = _rows(x)
        x_prev2 = None if x_prev is None else _rows(x_prev)
        z, x_sqnorm = ops.lora_down(
            x2,
            lora_A,
            x_prev2,
            input_scale=input_scale,
            dropout_p=dropout_p,
            dropout_seed=dropout_seed,
            compute_x_sqnorm=compute_x_sqnorm,
        )
        u = z if z_prev is None else z + _rows(z_prev)
        y = ops.linear_lora_fwd(x2, weight, bias, u, lora_B, scaling)

        ctx.save_for_backward(x, x_prev, weight, lora_A, lora_B, u, dropout_seed)
        ctx.scaling, ctx.input_scale, ctx.dropout_p = scaling, input_scale, dropout_p
        ctx.has_bias, ctx.has_z_prev = bias is not None, z_prev is not None
        ctx.set_materialize_grads(False)  # an unused z (every mode but ms) brings no zero tensor
        lead = x.shape[:-1]
        outputs = (y.view(*lead, y.shape[-1]), z.view(*lead, z.shape[-1]))
        if x_sqnorm is None:
            return outputs + (None,)
        ctx.mark_non_differentiable(x_sqnorm)
        return outputs + (x_sqnorm,)

    @staticmethod
    def backward(ctx, grad_y, grad_z, _grad_sqnorm):
        x, x_prev, weight, lora_A, lora_B, u, dropout_seed = ctx.saved_tensors
        needs = ctx.needs_input_grad
        x2 = _rows(x)
        x_prev2 = None if x_prev is None else _rows(x_prev)
        if grad_y is None:
            grad_y2 = torch.zeros((x2.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
        else:
            grad_y2 = _rows(grad_y)
        g, grad_B = ops.lora_grad_out(grad_y2, lora_B, u, ctx.scaling)
        grad_z_prev = g.to(x.dtype).view(*x.shape[:-1], -1) if ctx.has_z_prev and needs[6] else None
        g_z = g if grad_z is None else g + _rows(grad_z)
        want_prev = x_prev is not None and needs[5]
        grad_x = grad_x_prev = None
        if needs[0] or want_prev:
            grad_x, grad_x_prev = ops.linear_lora_dx(
                grad_y2,
                weight,
                g_z,
                lora_A,
                input_scale=ctx.input_scale,
                dropout_p=ctx.dropout_p,
                dropout_seed=dropout_seed,
                store_prev=want_prev,
            )
            grad_x = grad_x.view(x.shape)
            if grad_x_prev is not None:
                grad_x_prev = grad_x_prev.view(x.shape)
        grad_A = None
        if needs[3]:
            grad_A = ops.lora_grad_A(
                g_z, x2, x_prev2, input_scale=ctx.input_scale, dropout_p=ctx.dropout_p, dropout_seed=dropout_seed
            )
        # The base layer is frozen in ResLoRA, but a user may unfreeze it: plain PyTorch then.
        grad_W = grad_y2.t() @ x2 if needs[1] else None
        grad_bias = grad_y2.sum(0) if ctx.has_bias and needs[2] else None
        return (
            grad_x,
            grad_W,
            grad_bias,
            grad_A,
            grad_B if needs[4] else None,
            grad_x_prev,
            grad_z_prev,
            None,
            None,
            None,
            None,
            None,
        )


def fused_reslora_linear(
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
    dropout_seed: int | torch.Tensor | None = None,
    compute_x_sqnorm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
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
    y, z, x_sqnorm = FusedResLoRAFunction.apply(
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        x_prev,
        z_prev,
        float(scaling),
        input_scale,
        float(dropout_p),
        seed,
        compute_x_sqnorm,
    )
    return y, z, x_sqnorm
