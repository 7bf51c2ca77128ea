"""The dtypes each implementation supports: a leaf module, so that the kernels (``ops``) and the
backend selection (``backend``) can both import it without importing each other."""

import torch

__all__ = ["KERNEL_DTYPES"]

#: What the Triton kernels (and the CUDA fold) implement.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
