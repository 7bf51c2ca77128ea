"""Developer tools, not part of the installed package: the compile matrix
(``python -m tools.compile_matrix``), the readers of what a kernel build uses (:mod:`tools.resources`)
and a GPU that is not there (:mod:`tools.fake_gpu`, for tests/ops/real_launch/ and the compile matrix).
Run them from the repository root; the runtime never imports them."""
