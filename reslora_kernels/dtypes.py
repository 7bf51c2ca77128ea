"""The dtypes each implementation supports: a leaf module, so that the kernels (``ops``) and the
dispatch (``functional``) can both import it without importing each other."""

import torch

#: What the Triton kernels (and the CUDA fold) implement.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
