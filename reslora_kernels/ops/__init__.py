"""Fused Triton kernels, one op per file (``<op>_kernel.py``: the ``@triton.jit`` kernels and the
launcher ``<op>`` that checks its inputs, flattens to 2-D, allocates and picks the grid), and the
launch, pruning and config helpers they share (``_target``, ``_configs``, ``_common``, ``_jit``).
Nothing model-level and no developer tool lives here; the autograd Function composing these ops
is ``reslora_kernels.fused``.

Tensor names follow docs/design.md: ``x [M, K]`` the block input, ``x_prev`` the previous block's input
(input-shortcut), ``weight [N, K]``, ``lora_A [R, K]``, ``lora_B [N, R]``, ``u [M, R]`` the rank-space
activation multiplied by ``lora_B``, ``grad_out [M, N]``. The dequantization ops (``dequant_4bit``,
``dequant_int8``) decode a quantized base weight into an ``[N, K]`` buffer for the GEMMs.
"""

from .dequant_4bit_kernel import dequant_4bit
from .dequant_int8_kernel import dequant_int8
from .dropout_kernel import dropout_keep_mask, seed_tensor
from .fold_kernel import fold_lora_
from .linear_lora_dx_kernel import linear_lora_dx
from .linear_lora_fwd_kernel import linear_lora_fwd
from .lora_down_kernel import lora_down
from .lora_grad_A_kernel import lora_grad_A
from .lora_grad_out_kernel import lora_grad_out

__all__ = [
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
