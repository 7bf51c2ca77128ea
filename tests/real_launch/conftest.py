"""Tests on the fake GPU (``reslora_kernels.testing.fake_gpu``): Triton's real autotuner, compiler
and launchers for sm_90a and sm_80, with only libcuda faked.

They need the kernels built for a GPU, so they run in a process of their own with
``TRITON_INTERPRET=0`` (tests/test_real_launch.py starts it; by hand:
``TRITON_INTERPRET=0 python -m pytest tests/real_launch``). In the rest of the suite the kernels are
built for Triton's interpreter and these modules are not collected.
"""

from reslora_kernels.ops import INTERPRETED

collect_ignore_glob = ["test_*.py"] if INTERPRETED else []
