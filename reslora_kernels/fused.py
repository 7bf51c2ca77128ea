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

One autograd Function, :class:`FusedResLoRAFunction`, for eager and compiled calls, with the
gradient flags worked out in one place. Its forward and backward bodies are also registered ops,
``torch.ops.reslora_kernels.fused_forward`` and ``fused_backward`` (a ``torch.library`` schema, the
Python body for every device, a fake for tracing): ``torch.compile`` traces the Function and keeps
each op as one opaque node, so there is no graph break at the launchers' Python (autotuners,
allocation, grids). Eager calls run the bodies directly: the dispatcher's round trip through Python
costs more than a launcher (benchmarks/README.md, "Host overhead"; docs/design.md section 6).

The base weight is one operand, ``weight [N, K]``, read through :func:`_dense_weight` in forward and
again in backward: the one place a quantized base will dequantize its packed data (the operand then
carries the quant state's tensors and names the format), so that nothing full-precision of the
weight is saved for backward and no second Function is needed.
"""

from __future__ import annotations

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


def _dense_weight(weight: Tensor) -> Tensor:
    """The base weight as the ``[N, K]`` matrix the GEMMs read. Dense bases pass it as it is."""
    return weight


# ---------------------------------------------------------------------------- the op bodies
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
    y = ops.linear_lora_fwd(x2, _dense_weight(weight), bias, u, lora_B, scaling)
    return _shaped(y, x), _shaped(z, x), x_sqnorm


def _backward(
    grad_y, grad_z, x, x_prev, weight, lora_A, lora_B, z, z_prev, dropout_seed, scaling, input_scale, dropout_p, needs
) -> list[Tensor]:
    """The gradients ``needs`` (seven flags: x, x_prev, weight, bias, lora_A, lora_B, z_prev) asks
    for, in that order; ``grad_y`` may be ``None`` (only z is used downstream)."""
    want_x, want_prev, want_w, want_bias, want_a, want_b, want_z_prev = needs
    x2 = _rows(x)
    if grad_y is None:
        grad_y2 = torch.zeros((x2.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    else:
        grad_y2 = _rows(grad_y)
    u = _rows(z) if z_prev is None else _rows(z) + _rows(z_prev)
    g, grad_B = ops.lora_grad_out(grad_y2, lora_B, u, scaling)
    g_z = g if grad_z is None else g + _rows(grad_z)
    grads = []
    if want_x or want_prev:
        grad_x, grad_x_prev = ops.linear_lora_dx(
            grad_y2,
            _dense_weight(weight),
            g_z,
            lora_A,
            input_scale=input_scale,
            dropout_p=dropout_p,
            dropout_seed=dropout_seed,
            store_prev=want_prev,
        )
        if want_x:
            grads.append(_shaped(grad_x, x))
        if want_prev:
            grads.append(_shaped(grad_x_prev, x))
    # The base layer is frozen in ResLoRA, but a user may unfreeze it: plain PyTorch then.
    if want_w:
        grads.append(grad_y2.t() @ x2)
    if want_bias:
        grads.append(grad_y2.sum(0))
    if want_a:
        grads.append(
            ops.lora_grad_A(
                g_z,
                x2,
                None if x_prev is None else _rows(x_prev),
                input_scale=input_scale,
                dropout_p=dropout_p,
                dropout_seed=dropout_seed,
            )
        )
    if want_b:
        grads.append(grad_B)
    if want_z_prev:
        grads.append(_shaped(g.to(x.dtype), x))
    return grads


# ---------------------------------------------------------------------------- the registered ops
_LIBRARY = torch.library.Library("reslora_kernels", "FRAGMENT")
_LIBRARY.define(
    "fused_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor? x_prev, "
    "Tensor? z_prev, Tensor? dropout_seed, float scaling, float input_scale, float dropout_p, "
    "bool compute_x_sqnorm) -> (Tensor, Tensor, Tensor)"
)
_LIBRARY.define(
    "fused_backward(Tensor? grad_y, Tensor? grad_z, Tensor x, Tensor? x_prev, Tensor weight, Tensor lora_A, "
    "Tensor lora_B, Tensor z, Tensor? z_prev, Tensor? dropout_seed, float scaling, float input_scale, "
    "float dropout_p, bool[7] needs) -> Tensor[]"
)


def _forward_op(x, weight, bias, lora_A, lora_B, x_prev, z_prev, seed, scaling, input_scale, dropout_p, sqnorm):
    y, z, x_sqnorm = _forward(x, weight, bias, lora_A, lora_B, x_prev, z_prev, seed, scaling, input_scale, dropout_p,
                              sqnorm)  # fmt: skip
    # An op returns tensors, never None: an absent ||x||^2 is an empty tensor (mapped back to None).
    return y, z, x_sqnorm if x_sqnorm is not None else x.new_empty(0, dtype=torch.float32)


def _forward_fake(x, weight, bias, lora_A, lora_B, x_prev, z_prev, seed, scaling, input_scale, dropout_p, sqnorm):
    lead = x.shape[:-1]
    y = x.new_empty((*lead, weight.shape[0]))
    z = x.new_empty((*lead, lora_A.shape[0]))
    return y, z, x.new_empty(() if sqnorm else (0,), dtype=torch.float32)


def _backward_fake(grad_y, grad_z, x, x_prev, weight, lora_A, lora_B, z, z_prev, seed, scaling, input_scale, p, needs):
    shapes = (x.shape, x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape, z.shape)
    return [x.new_empty(shape) for shape, need in zip(shapes, needs) if need]


# One body for every device: the launchers run CUDA tensors on the GPU and CPU tensors through
# Triton's interpreter.
_LIBRARY.impl("fused_forward", _forward_op, "CompositeExplicitAutograd")
_LIBRARY.impl("fused_backward", _backward, "CompositeExplicitAutograd")
torch.library.register_fake("reslora_kernels::fused_forward", _forward_fake, lib=_LIBRARY)
torch.library.register_fake("reslora_kernels::fused_backward", _backward_fake, lib=_LIBRARY)
_fused_forward = torch.ops.reslora_kernels.fused_forward.default
_fused_backward = torch.ops.reslora_kernels.fused_backward.default


# ---------------------------------------------------------------------------- autograd
class FusedResLoRAFunction(torch.autograd.Function):
    """``apply(x, weight, bias, lora_A, lora_B, x_prev, z_prev, dropout_seed, scalars) -> (y, z,
    x_sqnorm or None)``, ``scalars = (scaling, input_scale, dropout_p, compute_x_sqnorm)``: one
    tuple, since each argument of ``apply`` costs a little on every call.

    Under ``torch.compile`` (Dynamo traces this Function) forward and backward call the registered
    ops, which the graph keeps as opaque nodes; eager calls run the same bodies without the
    dispatcher's round trip through Python, ~14 us per block (benchmarks/README.md, "Host overhead
    after the dispatch seam")."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, x_prev, z_prev, seed, scalars):
        scaling, input_scale, dropout_p, sqnorm = scalars
        run = _fused_forward if torch.compiler.is_compiling() else _forward
        y, z, x_sqnorm = run(x, weight, bias, lora_A, lora_B, x_prev, z_prev, seed, scaling, input_scale, dropout_p,
                             sqnorm)  # fmt: skip
        ctx.save_for_backward(x, x_prev, weight, lora_A, lora_B, z, z_prev, seed)
        ctx.scalars = scalars
        ctx.set_materialize_grads(False)  # an unused z (every mode but ms) brings no zero tensor
        if not sqnorm:
            return y, z, None
        ctx.mark_non_differentiable(x_sqnorm)
        return y, z, x_sqnorm

    @staticmethod
    def backward(ctx, grad_y, grad_z, _grad_sqnorm):
        x, x_prev, weight, lora_A, lora_B, z, z_prev, seed = ctx.saved_tensors
        scaling, input_scale, dropout_p, _ = ctx.scalars
        # apply()'s order is (x, weight, bias, lora_A, lora_B, x_prev, z_prev); the op's is
        # (x, x_prev, weight, bias, lora_A, lora_B, z_prev). An input that was None (no bias, no
        # shortcut) needs no gradient.
        need = ctx.needs_input_grad
        needs = [need[0], need[5], need[1], need[2], need[3], need[4], need[6]]
        run = _fused_backward if torch.compiler.is_compiling() else _backward
        grads = run(grad_y, grad_z, x, x_prev, weight, lora_A, lora_B, z, z_prev, seed, scaling, input_scale,
                    dropout_p, needs)  # fmt: skip
        out = [None] * 7
        i = 0
        for slot, flag in enumerate(needs):
            if flag:
                out[slot] = grads[i]
                i += 1
        dx, dx_prev, dW, dbias, dA, dB, dz_prev = out
        return dx, dW, dbias, dA, dB, dx_prev, dz_prev, None, None


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
    scalars = (float(scaling), input_scale, float(dropout_p), bool(compute_x_sqnorm))
    return FusedResLoRAFunction.apply(x, weight, bias, lora_A, lora_B, x_prev, z_prev, seed, scalars)
