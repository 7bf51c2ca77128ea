"""Test and tool support that the runtime never imports: :mod:`reslora_kernels.testing.fake_gpu`
(a GPU that is not there: Triton's driver with only its lowest level faked)."""
