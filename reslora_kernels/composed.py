"""One ResLoRA block on the vendor GEMMs: ``torch.mm`` / ``addmm`` / ``addmm_`` (cuBLAS on CUDA,
oneDNN/MKL on CPU) in one autograd Function, under the fused path's memory contract.

Forward::

    z   = drop(x [+ x_prev]) A^T * c             # c = input_scale / (1 - p); [M, r]
    u   = z [+ z_prev]                           # ms only: an [M, r] add
    y   = x W^T + b;  y += s u B^T               # addmm, then addmm_ in place

Backward::

    g   = s grad_out B;   dB = s grad_out^T u    # two skinny GEMMs over grad_out
    g_z = g [+ grad_z]                           # ms: later blocks' gradient of this z
    dA  = c g_z^T drop(x [+ x_prev])
    dx  = grad_out W + drop'(c g_z A)            # one [M, K] buffer: the LoRA term, then addmm_

Saved for backward: ``x`` and ``x_prev`` by reference, ``u`` ``[M, r]``, the parameters and the
dropout seed. No ``[M, N]`` tensor is allocated besides ``y`` (forward) and ``dx`` (backward):
the LoRA-up term is accumulated into them in place. The dropout mask is regenerated from its seed
in backward (once, for both ``dx`` and ``dA``), never stored; it is a 0/1 mask and the scale
``1 / (1 - p)`` is applied to the ``[M, r]`` operands, where it costs nothing and, in bfloat16,
is not rounded into every element of the mask.

The input shortcut's ``x + x_prev`` is formed as a transient ``[M, K]`` buffer (one skinny GEMM
over it is cheaper than one over each of ``x`` and ``x_prev``: -120 us per direction at
M=512, K=688 on one CPU core), freed before ``y`` (forward) and before ``dx`` (backward) are
allocated, so it raises neither peak unless K > N in forward.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .dropout_mask import dropout_keep_mask, keep_values_cpu
from .reference import squared_norm

__all__ = ["ComposedResLoRAFunction", "composed_reslora_linear"]


# Every tensor op called from Python costs microseconds of dispatch, as much as the LoRA math at
# small batches: the code below skips reshapes of 2-D tensors and multiplications by 1, and uses
# F.linear where it saves a separate transpose.
def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [M, C], a view whenever the strides allow one."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _shaped(t: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """[M, C] -> [*lead, C]."""
    return t if len(lead) == 1 else t.view(*lead, t.shape[-1])


#: Rows of the CPU mask are hashed in blocks of this many int32 bytes: the hash's ~15 passes then
#: stay in cache (3.8x faster than whole-tensor passes at [2048, 688] on this project's CPU).
MASK_BLOCK_BYTES = 1 << 20


@functools.lru_cache(maxsize=None)
def _device_mask_kernel():
    """The Triton launcher that writes the mask in one kernel
    (:func:`reslora_kernels.ops.dropout_kernel.dropout_keep_values`), or ``None`` where Triton cannot be
    imported (the mask then comes from the torch definition: the same bits, more passes)."""
    try:
        from .ops.dropout_kernel import dropout_keep_values
    except ImportError:
        return None
    return dropout_keep_values


def _keep(x2: torch.Tensor, p: float, seed) -> torch.Tensor:
    """The 0/1 keep-mask of the ``[M, K]`` LoRA input in ``x2``'s dtype (exact in every dtype):
    :func:`reslora_kernels.dropout_mask.dropout_keep_mask`, bit for bit (tested). On CPU it is hashed
    block by block of rows so that its passes stay in cache; on a GPU one Triton kernel writes it
    (the torch definition is a chain of about fifteen elementwise int32 passes, ~136 bytes of
    memory traffic per element)."""
    if torch.compiler.is_compiling():
        # A Python loop over row blocks would specialise the graph on M, and the Triton launch is
        # opaque to Dynamo; Inductor fuses the plain definition into one kernel anyway.
        return dropout_keep_mask(x2.shape, p, seed, x2.device).to(x2.dtype)
    if x2.device.type != "cpu":
        write = _device_mask_kernel() if x2.is_cuda else None
        if write is None:
            return dropout_keep_mask(x2.shape, p, seed, x2.device).to(x2.dtype)
        return write(x2.shape[0], x2.shape[1], p, seed, x2)
    return keep_values_cpu(x2.shape[0], x2.shape[1], p, seed, x2.dtype, MASK_BLOCK_BYTES)


def _lora_input(x2: torch.Tensor, x_prev2: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor:
    """``drop(x [+ x_prev])`` without its scale: ``x`` itself, or a new buffer (the mask's own,
    when ``keep`` is given: the mask is not needed afterwards)."""
    if keep is None:
        return x2 if x_prev2 is None else x2 + x_prev2
    if x_prev2 is None:
        return keep.mul_(x2)
    return torch.add(x2, x_prev2).mul_(keep)


class ComposedResLoRAFunction(torch.autograd.Function):
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
        settings,
    ):
        # The scalars travel as one tuple: each argument of apply() costs a little on every call.
        scaling, input_scale, dropout_p, dropout_seed, compute_x_sqnorm = settings
        x2 = _rows(x)
        x_prev2 = None if x_prev is None else _rows(x_prev)
        lora_scale = input_scale / (1.0 - dropout_p)
        keep = _keep(x2, dropout_p, dropout_seed) if dropout_p > 0.0 else None
        z = F.linear(_lora_input(x2, x_prev2, keep), lora_A)
        del keep  # the mask (or x + x_prev) goes before y is allocated
        if lora_scale != 1.0:
            z.mul_(lora_scale)
        u = z if z_prev is None else z + _rows(z_prev)
        y = F.linear(x2, weight, bias)
        y.addmm_(u, lora_B.t(), alpha=scaling)

        ctx.save_for_backward(x, x_prev, weight, lora_A, lora_B, u)
        ctx.scaling, ctx.lora_scale = scaling, lora_scale
        ctx.dropout_p, ctx.dropout_seed = dropout_p, dropout_seed
        ctx.has_bias, ctx.has_z_prev = bias is not None, z_prev is not None
        ctx.set_materialize_grads(False)  # an unused z (every mode but ms) brings no zero tensor
        lead = x.shape[:-1]
        outputs = (_shaped(y, lead), _shaped(z, lead))
        if not compute_x_sqnorm:
            return outputs + (None,)
        x_sqnorm = squared_norm(x)
        ctx.mark_non_differentiable(x_sqnorm)
        return outputs + (x_sqnorm,)

    @staticmethod
    def backward(ctx, grad_y, grad_z, _grad_sqnorm):
        x, x_prev, weight, lora_A, lora_B, u = ctx.saved_tensors
        needs = ctx.needs_input_grad
        x2 = _rows(x)
        x_prev2 = None if x_prev is None else _rows(x_prev)
        if grad_y is None:  # only z is used downstream (ms): y's gradient is zero
            grad_y2 = x2.new_zeros((x2.shape[0], weight.shape[0]))
        else:
            grad_y2 = _rows(grad_y)
        scaling, lora_scale, p = ctx.scaling, ctx.lora_scale, ctx.dropout_p

        g = torch.mm(grad_y2, lora_B)
        grad_B = torch.mm(grad_y2.t(), u) if needs[4] else None
        if scaling != 1.0:
            g.mul_(scaling)
            if grad_B is not None:
                grad_B.mul_(scaling)
        lead = x.shape[:-1]
        grad_z_prev = _shaped(g, lead) if ctx.has_z_prev and needs[6] else None
        g_z = g if grad_z is None else g + _rows(grad_z)
        # The input gradients and dA see the LoRA input through its scale c: fold c into the
        # [M, r] g_z once rather than into [M, K] products.
        g_in = g_z * lora_scale if lora_scale != 1.0 else g_z

        keep = _keep(x2, p, ctx.dropout_seed) if p > 0.0 and (needs[0] or needs[3] or needs[5]) else None
        grad_A = None
        if needs[3] and keep is None:
            # First, so that its [M, K] temporary (x + x_prev) is gone before dx is allocated.
            grad_A = torch.mm(g_in.t(), _lora_input(x2, x_prev2, None))
        want_prev = x_prev is not None and needs[5]
        grad_x = grad_x_prev = None
        if needs[0] or want_prev:
            # drop'(c g_z A) is one [M, K] buffer; dx accumulates grad_out W onto it in place
            # (or, when x_prev needs its own copy of that term, in a new tensor).
            lora_dx = None
            if keep is not None or want_prev:
                lora_dx = torch.mm(g_in, lora_A)
                if keep is not None:
                    lora_dx.mul_(keep)
            if want_prev:
                grad_x_prev = _shaped(lora_dx, lead)
                if needs[0]:
                    grad_x = _shaped(torch.addmm(lora_dx, grad_y2, weight), lead)
            elif lora_dx is not None:
                grad_x = _shaped(lora_dx.addmm_(grad_y2, weight), lead)
            else:
                grad_x = _shaped(torch.mm(grad_y2, weight).addmm_(g_in, lora_A), lead)
        if needs[3] and keep is not None:
            grad_A = torch.mm(g_in.t(), _lora_input(x2, x_prev2, keep))
        # The base layer is frozen in ResLoRA, but a user may unfreeze it.
        grad_W = torch.mm(grad_y2.t(), x2) if needs[1] else None
        grad_bias = grad_y2.sum(0) if ctx.has_bias and needs[2] else None
        return (
            grad_x,
            grad_W,
            grad_bias,
            grad_A,
            grad_B,
            grad_x_prev,
            grad_z_prev,
            None,
        )


def composed_reslora_linear(
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
    """The vendor-GEMM counterpart of :func:`reslora_kernels.reference.reslora_linear`, same
    signature::

        z = drop(x [+ x_prev]) A^T;   y = x W^T + b + s * (z [+ z_prev]) B^T
    """
    input_scale = 1.0
    if x_prev is x:
        # First block of an input-shortcut chain: x_{-1} := x_0, so the LoRA input is 2 x.
        # A scale of 2 avoids reading x twice and summing two gradients of x.
        x_prev, input_scale = None, 2.0
    if dropout_p > 0.0 and dropout_seed is None:
        raise ValueError("dropout_p > 0 needs a dropout_seed")
    return ComposedResLoRAFunction.apply(
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        x_prev,
        z_prev,
        (float(scaling), input_scale, float(dropout_p), dropout_seed, compute_x_sqnorm),
    )
