"""The fake driver refuses what CUDA would refuse, one test per rule, fed through Triton's real
launcher where Triton can produce the fault (small kernels defined here) and directly where only
a hand-made call can (Triton itself never asks for such a tensor map or launch)."""

from __future__ import annotations

import contextvars
import dataclasses

import pytest
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from reslora_kernels.ops._target import A100, H100
from tools.fake_gpu import ARG_CONSTEXPR, ARG_KERNEL, KernelArg, LaunchRejected, TensorMap, fake_gpu


@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


@triton.jit
def _copy_tiles(in_desc, out_desc, BLOCK_M: tl.constexpr):
    tile = in_desc.load([tl.program_id(0) * BLOCK_M, 0])
    out_desc.store([tl.program_id(0) * BLOCK_M, 0], tile)


@triton.jit
def _device_descriptor(x_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # A descriptor made on the device lives in global scratch memory the launch must allocate.
    desc = tl.make_tensor_descriptor(x_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    desc.store([0, 0], desc.load([0, 0]) + 1)


def copy_tiles(src_desc, dst_desc, block_m=16):
    _copy_tiles[(1,)](src_desc, dst_desc, BLOCK_M=block_m)


# ------------------------------------------------------------------------------- what is accepted
def test_an_accepted_launch_is_recorded_as_cuda_would_see_it():
    """Pointers reach the kernel as the tensors' addresses, scalars as numbers (constexprs gone),
    and the grid as launched; the binary was loaded with its registers."""
    x = torch.zeros(1000, dtype=torch.float16)
    with fake_gpu(A100) as gpu:
        _add_one[(8,)](x, 1000, BLOCK=128)
    (launch,) = gpu.launches
    assert launch.kernel == "_add_one" and launch.grid == (8, 1, 1) and launch.num_warps == 4
    assert launch.params == [x.data_ptr(), 1000]
    (loaded,) = gpu.utils.loaded.values()
    assert loaded.name == "_add_one" and 0 < loaded.registers <= 255 and loaded.spills == 0
    assert [c.kernel for c in gpu.compiles] == ["_add_one"]


def test_host_descriptors_become_tensor_maps():
    """Triton's own conversion of a TensorDescriptor: a tensor map at the tensor's address, with its
    shape, byte strides and the box the compiler chose."""
    src, dst = torch.zeros(64, 64, dtype=torch.bfloat16), torch.zeros(64, 64, dtype=torch.bfloat16)
    with fake_gpu(H100) as gpu:
        copy_tiles(TensorDescriptor.from_tensor(src, [16, 64]), TensorDescriptor.from_tensor(dst, [16, 64]))
    (launch,) = gpu.launches
    first, second = launch.tensor_maps
    assert (first.address, second.address) == (src.data_ptr(), dst.data_ptr())
    assert first.shape == (64, 64) and first.strides == (128,) and first.box == (16, 64) and first.elem_size == 2


# ----------------------------------------------------------------- cuTensorMapEncodeTiled's rules
def test_misaligned_descriptor_base_is_rejected():
    buffer = torch.zeros(64 * 64 + 8, dtype=torch.bfloat16)
    good = buffer[:4096].view(64, 64)
    desc = TensorDescriptor.from_tensor(good, [16, 64])
    desc.base = buffer[1:4097].view(64, 64)  # 2 bytes past a 16-byte boundary
    with fake_gpu(H100), pytest.raises(LaunchRejected, match="global address is not 16-byte aligned"):
        copy_tiles(desc, TensorDescriptor.from_tensor(torch.zeros(64, 64, dtype=torch.bfloat16), [16, 64]))


def test_stride_not_a_multiple_of_16_bytes_is_rejected():
    wide = torch.zeros(64, 72, dtype=torch.bfloat16)
    desc = TensorDescriptor.from_tensor(wide[:, :64], [16, 64])
    desc.strides = [68, 1]  # 136 B rows
    with fake_gpu(H100), pytest.raises(LaunchRejected, match="global stride of 136 B"):
        copy_tiles(desc, TensorDescriptor.from_tensor(torch.zeros(64, 64, dtype=torch.bfloat16), [16, 64]))


def test_inner_box_of_fewer_than_16_bytes_is_rejected():
    """A [16, 4] bfloat16 block: 8-byte rows, which no tensor map can move."""
    src, dst = torch.zeros(64, 64, dtype=torch.bfloat16), torch.zeros(64, 64, dtype=torch.bfloat16)
    with fake_gpu(H100), pytest.raises(LaunchRejected, match="inner box dimension is 8 B"):
        copy_tiles(TensorDescriptor.from_tensor(src, [16, 4]), TensorDescriptor.from_tensor(dst, [16, 4]))


@pytest.mark.parametrize(
    "box, match",
    [([512, 16], "box dimension of 512 is not 1..256"), ([0, 16], "box dimension of 0"), ([16, 24], "48 B")],
)
def test_box_rules(box, match):
    """Triton splits blocks larger than 256 into several copies, so only a direct call asks for
    such a box; a 24-element bfloat16 row (48 B) is a multiple of 16 but exceeds the 32 B swizzle."""
    with fake_gpu(H100) as gpu, pytest.raises(LaunchRejected, match=match):
        gpu.utils.fill_tma_descriptor_tiled(1 << 20, 1, 2, 9, box, [1024, 1024], [1024, 1], 0)


def test_a_valid_direct_encoding_is_accepted():
    with fake_gpu(H100) as gpu:
        tensor_map = gpu.utils.fill_tma_descriptor_tiled(1 << 20, 3, 2, 9, [256, 64], [1024, 1024], [1024, 1], 0)
    assert tensor_map == TensorMap(1 << 20, 2, 9, 3, (256, 64), (1024, 1024), (2048,), 0)


# --------------------------------------------------------------------------- cuLaunchKernelEx's rules
@pytest.mark.parametrize(
    "grid, error, match",
    [
        ((2**31,), OverflowError, "grid = 2147483648 does not fit in int32"),  # the C launcher's int
        ((1, 65536), LaunchRejected, "grid y = 65536 exceeds 65535"),
        ((1, 1, 65536), LaunchRejected, "grid z = 65536 exceeds 65535"),
        ((-1, -1), LaunchRejected, "negative"),
    ],
)
def test_grid_limits(grid, error, match):
    x = torch.zeros(16)
    with fake_gpu(A100) as gpu:
        with pytest.raises(error, match=match):
            _add_one[grid](x, 16, BLOCK=16)
        _add_one[(2**31 - 1, 65535, 65535)](x, 16, BLOCK=16)  # the largest grid CUDA takes
        _add_one[(0,)](x, 16, BLOCK=16)  # no program: Triton's launcher launches nothing
    assert [la.grid for la in gpu.launches] == [(2**31 - 1, 65535, 65535)]
    assert gpu.empty_launches == [("_add_one", (0, 1, 1))]


def test_grid_x_times_the_cluster_is_limited():
    x = torch.zeros(16)
    with fake_gpu(H100) as gpu:
        _add_one[(1,)](x, 16, BLOCK=16)
        (function,) = gpu.utils.loaded
        with pytest.raises(LaunchRejected, match="grid x = 4294967294 exceeds 2147483647"):
            gpu.launch_kernel((2**31 - 1, 1, 1), 4, 2, 0, function, [x.data_ptr(), 16])


def test_shared_memory_over_the_opt_in_maximum_is_rejected():
    """Triton refuses to load a binary that needs more shared memory than the device reports (the
    fake reports the target's opt-in maximum); the driver refuses such a launch on its own too."""
    x = torch.zeros(16)
    with fake_gpu(A100) as gpu:
        _add_one[(1,)](x, 16, BLOCK=16)
        (function,) = gpu.utils.loaded
        with pytest.raises(LaunchRejected, match="166913 B of shared memory exceed the 166912 B"):
            gpu.launch_kernel((1, 1, 1), 4, 1, A100.max_shared + 1, function, [x.data_ptr(), 16])
        with pytest.raises(LaunchRejected, match="loaded for 0 B"):
            gpu.launch_kernel((1, 1, 1), 4, 1, 65536, function, [x.data_ptr(), 16])


@triton.jit
def _square(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ptrs = x_ptr + offs[:, None] * BLOCK + offs[None, :]
    tile = tl.load(ptrs)
    tl.store(ptrs, tl.dot(tile, tile).to(tile.dtype))


def test_a_build_too_big_for_the_target_never_loads():
    """Triton's own check at load time, against the shared memory the fake device reports."""
    small = dataclasses.replace(A100, name="A100 with 1 KiB of shared memory", max_shared=1024)
    x = torch.zeros(64 * 64, dtype=torch.float16)
    with fake_gpu(small) as gpu, pytest.raises(triton.runtime.errors.OutOfResources, match="shared memory"):
        _square[(1,)](x, BLOCK=64)
    assert gpu.launches == [] and gpu.utils.loaded == {}


def test_threads_over_the_block_limit_are_rejected():
    x = torch.zeros(16)
    with fake_gpu(A100) as gpu:
        _add_one[(1,)](x, 16, BLOCK=16)
        (function,) = gpu.utils.loaded
        gpu.utils.loaded[function].max_threads = 64  # as a register-hungry binary would report
        with pytest.raises(LaunchRejected, match="128 threads per block, the kernel allows 64"):
            _add_one[(1,)](x, 16, BLOCK=16)


def test_global_scratch_needs_an_allocator():
    """A descriptor made on the device needs global scratch: without ``triton.set_allocator``
    Triton's launcher refuses; with one, the launch gets a real buffer; and a null scratch pointer
    is refused by the driver itself."""
    x = torch.zeros(64, 64, dtype=torch.bfloat16)
    with fake_gpu(H100) as gpu:
        with pytest.raises(RuntimeError, match="triton.set_allocator"):
            _device_descriptor[(1,)](x, 64, 64, BLOCK_M=16, BLOCK_N=64)

        def with_allocator():
            buffers = []

            def allocate(size, alignment, stream):
                buffers.append(torch.empty(size, dtype=torch.int8))
                return buffers[-1]

            triton.set_allocator(allocate)
            _device_descriptor[(1,)](x, 64, 64, BLOCK_M=16, BLOCK_N=64)
            return buffers

        (buffer,) = contextvars.copy_context().run(with_allocator)  # the allocator does not outlive the test
        (launch,) = gpu.launches
        assert launch.global_scratch == buffer.data_ptr()
        (function,) = gpu.scratch_needs
        needed = gpu.scratch_needs[function][0]
        assert needed > 0 and buffer.numel() >= needed
        with pytest.raises(LaunchRejected, match=f"needs {needed} B of global scratch"):
            gpu.launch_kernel((1, 1, 1), 4, 1, launch.shared, function, launch.params, 0, 0)


def test_arguments_are_checked_as_the_c_launcher_converts_them():
    x = torch.zeros(16)
    with fake_gpu(A100):
        with pytest.raises(ValueError, match="meta tensor has no memory"):
            _add_one[(1,)](torch.empty(16, device="meta"), 16, BLOCK=16)
    with fake_gpu(A100) as gpu:  # Triton 3.9's entry point: an int argument that does not fit its type
        _add_one[(1,)](x, 16, BLOCK=16)
        (function,) = gpu.utils.loaded
        signature = gpu.utils.build_signature_metadata(["*fp32", "i32"])
        annotations = [KernelArg(type=ARG_KERNEL), KernelArg(type=ARG_KERNEL), KernelArg(type=ARG_CONSTEXPR)]
        with pytest.raises(OverflowError, match="argument 1 = 4294967296 does not fit in int32"):
            gpu.utils.launch(1, 1, 1, 0, function, False, False, (4, 1, 0), None, None, None, None, None,
                             annotations, signature, (x, 2**32, 16))  # fmt: skip
        with pytest.raises(RuntimeError, match="Unknown data type"):
            gpu.utils.build_signature_metadata(["*fp32", "q7"])
