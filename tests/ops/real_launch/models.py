"""What the fake-GPU tests run: a small model, the precisions, and the kernels each phase launches.

The tests of this folder need the kernels built for a GPU, so they run in a process of their own
with ``TRITON_INTERPRET=0`` (tests/ops/test_real_launch.py starts it; by hand:
``TRITON_INTERPRET=0 python -m pytest tests/ops/real_launch``); the rest of the suite builds the kernels
for Triton's interpreter and does not collect them (tests/conftest.py).
"""

import torch
import torch.nn as nn

#: precision name -> (dtype, TF32 for float32 dots)
PRECISIONS = {
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
    "fp32-tf32": (torch.float32, True),
    "fp32-ieee": (torch.float32, False),
}

#: The kernels one block runs, per phase (the names Triton loads them by).
TRAIN = {"_lora_down_kernel", "_linear_lora_fwd_kernel", "_lora_grad_out_kernel", "_linear_lora_dx_kernel"}
TRAIN |= {"_lora_grad_a_kernel"}
EVAL = {"_lora_down_kernel", "_linear_lora_fwd_kernel"}
MERGE = {"_fold_kernel"}
#: On Hopper with aligned operands the two GEMMs are the persistent TMA kernels.
HOPPER = {
    "_linear_lora_fwd_kernel": "_linear_lora_fwd_tma_kernel",
    "_linear_lora_dx_kernel": "_linear_lora_dx_tma_kernel",
}


def on_hopper(kernels: set[str]) -> set[str]:
    return {HOPPER.get(name, name) for name in kernels}


class Layer(nn.Module):
    def __init__(self, features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.proj = nn.Linear(features, features, bias=bias, dtype=dtype)


class Stack(nn.Module):
    """``layers`` blocks ``x <- tanh(proj(x))``: one chain of ``proj`` layers once ResLoRA is applied."""

    def __init__(self, layers: int, features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(features, bias, dtype) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer.proj(x))
        return x
