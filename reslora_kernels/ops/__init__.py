"""Fused Triton kernels, one op per file: the ``@triton.jit`` kernels and the launcher that checks
its inputs, flattens to 2-D, allocates and picks the grid. Nothing model-level lives here; the
autograd Function composing these ops is ``reslora_kernels.fused``.

Tensor names follow docs/design.md: ``x [M, K]`` the block input, ``x_prev`` the previous block's input
(input-shortcut), ``weight [N, K]``, ``lora_A [R, K]``, ``lora_B [N, R]``, ``u [M, R]`` the rank-space
activation multiplied by ``lora_B``, ``grad_out [M, N]``. The dequantization ops (``dequant_4bit``,
``dequant_int8``) decode a quantized base weight into an ``[N, K]`` buffer for the GEMMs.
"""

from ._target import A100, H100, INTERPRETED, Target, capture, simulate
from .dequant_4bit import dequant_4bit
from .dequant_int8 import dequant_int8
from .dropout import dropout_keep_mask, seed_tensor
from .fold import fold_lora_
from .linear_lora_dx import linear_lora_dx
from .linear_lora_fwd import linear_lora_fwd
from .lora_down import lora_down
from .lora_grad_A import lora_grad_A
from .lora_grad_out import lora_grad_out

__all__ = [
    "INTERPRETED",
    "Target",
    "H100",
    "A100",
    "simulate",
    "capture",
    "dropout_keep_mask",
    "seed_tensor",
    "lora_down",
    "linear_lora_fwd",
    "lora_grad_out",
    "linear_lora_dx",
    "lora_grad_A",
    "fold_lora_",
    "dequant_4bit",
    "dequant_int8",
]
