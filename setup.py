"""Build script: everything but the optional CUDA extension is declared in pyproject.toml.

The CUDA C++ fold kernel (csrc/) is built as ``reslora_kernels/_C*.so`` only where it can be:
torch with CUDA importable in the build environment and nvcc found. It is a plain shared library
that registers ``torch.ops.reslora_kernels.fold_lora_`` with PyTorch's dispatcher
(``TORCH_LIBRARY``), not a Python module: ``reslora_kernels.fold`` loads it with
``torch.ops.load_library`` on first use. ``RESLORA_BUILD_CUDA``
decides: ``auto`` (default) builds when possible and says why not otherwise, ``1`` requires the
build (an error if impossible), ``0`` skips it. An isolated build (plain ``pip install .``)
never sees torch, so it installs the pure-Python package; build the extension with
``RESLORA_BUILD_CUDA=1 pip install --no-build-isolation .``. The package works without it and
``reslora_kernels.fold_report()`` says which fold implementation runs, and why the CUDA kernel does
not where it does not.
"""

import os
import sys

from setuptools import setup

SOURCES = ["csrc/fold_binding.cpp", "csrc/fold_kernel.cu"]


def cuda_build():
    """``(ext_modules, cmdclass)`` for setup(), empty when the extension is not built."""
    mode = os.environ.get("RESLORA_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"RESLORA_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        reason = "torch is not importable here (an isolated build; use pip install --no-build-isolation)"
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} has no CUDA"
        elif CUDA_HOME is None:
            reason = "nvcc was not found (set CUDA_HOME)"
        else:
            extension = CUDAExtension(
                "reslora_kernels._C",
                SOURCES,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
            return [extension], {"build_ext": BuildExtension}
    if mode == "1":
        raise SystemExit(f"RESLORA_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    print(f"reslora_kernels: not building the CUDA fold extension: {reason}", file=sys.stderr)
    return [], {}


ext_modules, cmdclass = cuda_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
