"""The launchers' plan cache: a call whose key was seen reuses the per-shape work (checks, kernel,
grid, constexpr and key arguments, descriptors' shapes and strides) and rebuilds only what is per
call. These tests make sure a cached plan is never stale: everything the plan depends on is in the
key, a hit launches exactly what a cold call would, and no tensor descriptor outlives its call.

The launches are captured (nothing runs); on a CPU machine the tensors are CPU tensors planned for
a simulated GPU.
"""

import gc
import weakref

import pytest
import torch
from helpers import KERNEL_DEVICE

pytest.importorskip("triton")
from reslora_kernels import ops  # noqa: E402
from reslora_kernels.ops import _common, _target  # noqa: E402
from reslora_kernels.ops import linear_lora_dx_kernel as dx_mod  # noqa: E402
from reslora_kernels.ops import linear_lora_fwd_kernel as fwd_mod  # noqa: E402
from reslora_kernels.ops import lora_down_kernel as down_mod  # noqa: E402
from reslora_kernels.ops import lora_grad_A_kernel as grad_a_mod  # noqa: E402
from reslora_kernels.ops import lora_grad_out_kernel as grad_out_mod  # noqa: E402
ALL_PLANS = [fwd_mod._PLANS, dx_mod._PLANS, down_mod._PLANS, grad_out_mod._PLANS, grad_a_mod._PLANS]


@pytest.fixture(autouse=True)
def _cold_caches():
    for plans in ALL_PLANS:
        plans.clear()
    yield
    for plans in ALL_PLANS:
        plans.clear()


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=KERNEL_DEVICE, dtype=dtype)


def fwd_args(M=40, K=64, N=48, R=8, dtype=torch.float32):
    return t(M, K, dtype=dtype), t(N, K, dtype=dtype), t(N, dtype=dtype), t(M, R, dtype=dtype), t(N, R, dtype=dtype)


def capture_one(target, fn, *args, **kwargs):
    with _target.simulate(target), _target.capture() as launches:
        out = fn(*args, **kwargs)
    (launch,) = launches
    return launch, out


def static_kwargs(launch) -> dict:
    """The launch's keyword arguments that are not tensors or descriptors (what a plan holds)."""
    return {k: v for k, v in launch.kwargs.items() if not isinstance(v, torch.Tensor) and not k.endswith("_desc")}


def test_a_repeated_call_reuses_its_plan_with_fresh_descriptors():
    """Same key twice: one plan; each call's descriptors are new objects on that call's tensors
    (inputs and the output it returns)."""
    first, second = fwd_args(), fwd_args()
    launch1, y1 = capture_one(_target.H100, ops.linear_lora_fwd, *first, 1.5)
    launch2, y2 = capture_one(_target.H100, ops.linear_lora_fwd, *second, 1.5)
    assert len(fwd_mod._PLANS) == 1
    assert launch1.kernel is launch2.kernel is fwd_mod._linear_lora_fwd_tma_kernel
    for name, (base1, base2) in {"x_desc": (first[0], second[0]), "w_desc": (first[1], second[1]),
                                 "y_desc": (y1, y2)}.items():  # fmt: skip
        d1, d2 = launch1.kwargs[name], launch2.kwargs[name]
        assert d1 is not d2 and d1.block_shape is not d2.block_shape, name
        assert d1.base is base1 and d2.base is base2, name
        assert (tuple(d1.shape), tuple(d1.strides)) == (tuple(base1.shape), tuple(base1.stride())), name
    assert launch2.kwargs["bias_ptr"] is second[2] and launch2.kwargs["u_ptr"] is second[3]
    assert static_kwargs(launch1) == static_kwargs(launch2)


def test_dx_descriptors_name_the_outputs_of_their_own_call():
    M, K, N, R = 40, 64, 48, 8
    for _ in range(2):
        launch, (dx, dx_prev) = capture_one(
            _target.H100, ops.linear_lora_dx, t(M, N), t(N, K), t(M, R), t(R, K), store_prev=True
        )
        assert launch.kwargs["dx_desc"].base is dx and launch.kwargs["dx_prev_desc"].base is dx_prev
        assert dx.data_ptr() != dx_prev.data_ptr()
    assert len(dx_mod._PLANS) == 1


def test_strides_make_their_own_plan():
    """The same shape as a strided view (every other column of a wider buffer) on the pointer
    kernel: its own plan, with its own strides."""
    x, w, b, u, B = fwd_args()
    wide = t(x.shape[0], 2 * x.shape[1])
    contiguous, _ = capture_one(_target.A100, ops.linear_lora_fwd, x, w, b, u, B, 1.0)
    strided, _ = capture_one(_target.A100, ops.linear_lora_fwd, wide[:, ::2], w, b, u, B, 1.0)
    assert len(fwd_mod._PLANS) == 2
    assert (contiguous.kwargs["stride_xm"], contiguous.kwargs["stride_xk"]) == (x.shape[1], 1)
    assert (strided.kwargs["stride_xm"], strided.kwargs["stride_xk"]) == (2 * x.shape[1], 2)
    assert strided.kernel is fwd_mod._linear_lora_fwd_unaligned_kernel


def test_alignment_makes_its_own_plan():
    """The same shape and strides one element further along a buffer (4 bytes: not 16-byte
    aligned) must not reuse the aligned call's TMA plan."""
    M, K, N, R = 40, 64, 48, 8
    buffer = t(M * K + 1)
    aligned_x, shifted_x = buffer[: M * K].view(M, K), buffer[1:].view(M, K)
    assert aligned_x.stride() == shifted_x.stride() and shifted_x.data_ptr() % 16
    _, w, b, u, B = fwd_args(M, K, N, R)
    first, _ = capture_one(_target.H100, ops.linear_lora_fwd, aligned_x, w, b, u, B, 1.0)
    second, _ = capture_one(_target.H100, ops.linear_lora_fwd, shifted_x, w, b, u, B, 1.0)
    assert first.kernel is fwd_mod._linear_lora_fwd_tma_kernel
    assert second.kernel is fwd_mod._linear_lora_fwd_unaligned_kernel
    assert second.kwargs["x_ptr"] is shifted_x
    # And back: the aligned call still finds its TMA plan.
    third, _ = capture_one(_target.H100, ops.linear_lora_fwd, aligned_x, w, b, u, B, 1.0)
    assert third.kernel is fwd_mod._linear_lora_fwd_tma_kernel and len(fwd_mod._PLANS) == 2


def test_dtype_makes_its_own_plan():
    """float32 without TF32 runs its dots in IEEE precision, float16 on tensor cores."""
    first, _ = capture_one(_target.A100, ops.linear_lora_fwd, *fwd_args(dtype=torch.float32), 1.0)
    second, _ = capture_one(_target.A100, ops.linear_lora_fwd, *fwd_args(dtype=torch.float16), 1.0)
    assert (first.kwargs["DOT_PRECISION"], second.kwargs["DOT_PRECISION"]) == ("ieee", "tf32")
    assert len(fwd_mod._PLANS) == 2


def test_target_makes_its_own_plan():
    """The same tensors planned for an H100 and an A100: TMA with one program per SM, then the
    pointer kernel with one program per tile."""
    args = fwd_args(M=256, K=64, N=256)
    hopper, _ = capture_one(_target.H100, ops.linear_lora_fwd, *args, 1.0)
    ampere, _ = capture_one(_target.A100, ops.linear_lora_fwd, *args, 1.0)
    small = _target.Target("small sm_90", 90, 3, 232448)
    small_hopper, _ = capture_one(small, ops.linear_lora_fwd, *args, 1.0)
    meta = {"BLOCK_M": 32, "BLOCK_N": 32}
    assert hopper.kernel is fwd_mod._linear_lora_fwd_tma_kernel and hopper.grid(meta) == (64,)
    assert hopper.kwargs["NUM_SMS"] == _target.H100.sm_count
    assert ampere.kernel is fwd_mod._linear_lora_fwd_kernel and ampere.grid(meta) == (64,)
    assert "NUM_SMS" not in ampere.kwargs
    assert small_hopper.grid(meta) == (3,) and small_hopper.kwargs["NUM_SMS"] == 3
    assert len(fwd_mod._PLANS) == 3


def test_global_switches_make_their_own_plans():
    """torch's TF32 switch changes float32 dots; deterministic mode changes the dB reduction."""
    M, N, R = 100, 48, 8
    args = (t(M, N), t(N, R), t(M, R), 0.5)
    plain, _ = capture_one(_target.A100, ops.lora_grad_out, *args)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        tf32, _ = capture_one(_target.A100, ops.lora_grad_out, *args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(True)
    try:
        det, _ = capture_one(_target.A100, ops.lora_grad_out, *args)
    finally:
        torch.use_deterministic_algorithms(False)
    assert (plain.kwargs["DOT_PRECISION"], tf32.kwargs["DOT_PRECISION"]) == ("ieee", "tf32")
    assert not plain.kwargs["DETERMINISTIC"] and det.kwargs["DETERMINISTIC"]
    num_m = plain.grid[0]
    assert plain.kwargs["db_ptr"].shape == (N, R) and det.kwargs["db_ptr"].shape == (num_m, N, R)
    assert len(grad_out_mod._PLANS) == 3


def block_launches(shape, p, det, x_prev):
    """Every launch of one block's forward and backward (the five ops), planned for an H100."""
    M, K, N, R = shape
    x, w, b, u, B = fwd_args(M, K, N, R)
    A, grad_out, g = t(R, K), t(M, N), t(M, R)
    prev = t(M, K) if x_prev else None
    seed = torch.tensor(3, device=KERNEL_DEVICE)
    torch.use_deterministic_algorithms(det)
    try:
        with _target.simulate(_target.H100), _target.capture() as launches:
            ops.lora_down(x, A, prev, dropout_p=p, dropout_seed=seed, compute_x_sqnorm=True)
            ops.linear_lora_fwd(x, w, b, u, B, 2.0)
            ops.lora_grad_out(grad_out, B, u, 2.0)
            ops.linear_lora_dx(grad_out, w, g, A, dropout_p=p, dropout_seed=seed, store_prev=x_prev)
            ops.lora_grad_A(g, x, prev, dropout_p=p, dropout_seed=seed)
    finally:
        torch.use_deterministic_algorithms(False)
    return [(launch.kernel, launch.grid if isinstance(launch.grid, tuple) else None, static_kwargs(launch))
            for launch in launches]  # fmt: skip


def test_a_warm_call_launches_what_a_cold_call_launches():
    """For calls that differ in one thing at a time (rows, alignment of K, rank tiles, dropout,
    deterministic mode, input shortcut), made in turn so that every later call finds the caches
    full: each launches exactly what it launched with empty caches."""
    cases = [
        ((40, 64, 48, 8), 0.0, False, False),
        ((41, 64, 48, 8), 0.0, False, False),
        ((40, 72, 48, 8), 0.0, False, False),
        ((40, 64, 48, 80), 0.0, False, False),
        ((40, 64, 48, 8), 0.1, False, False),
        ((40, 64, 48, 8), 0.0, True, False),
        ((40, 64, 48, 8), 0.1, True, True),
    ]
    cold = []
    for case in cases:
        for plans in ALL_PLANS:
            plans.clear()
        cold.append(block_launches(*case))
    for plans in ALL_PLANS:
        plans.clear()
    for case in cases + cases[::-1]:
        assert block_launches(*case) == cold[cases.index(case)], case


def test_a_cached_plan_still_checks_new_inputs():
    x, w, b, u, B = fwd_args()
    capture_one(_target.A100, ops.linear_lora_fwd, x, w, b, u, B, 1.0)
    with pytest.raises(ValueError, match=r"lora_B must be \[48, 8\]"):
        with _target.simulate(_target.A100), _target.capture():
            ops.linear_lora_fwd(x, w, b, u, t(48, 9), 1.0)
    with pytest.raises(TypeError, match="dtype mismatch: u is torch.float16"):
        with _target.simulate(_target.A100), _target.capture():
            ops.linear_lora_fwd(x, w, b, u.half(), B, 1.0)
    with pytest.raises(ValueError, match="dropout_p > 0 needs a dropout_seed"):
        with _target.simulate(_target.A100), _target.capture():
            ops.linear_lora_dx(t(40, 48), w, t(40, 8), t(8, 64), dropout_p=0.1)


def test_a_plan_keeps_no_tensor_alive():
    """Descriptor templates hold shapes and strides, not the tensor they were made from."""
    x, w, b, u, B = fwd_args()
    capture_one(_target.H100, ops.linear_lora_fwd, x, w, b, u, B, 1.0)
    refs = [weakref.ref(tensor) for tensor in (x, w, b, u, B)]
    del x, w, b, u, B
    gc.collect()
    assert [ref() for ref in refs] == [None] * 5


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(_common, "PLAN_CACHE_SIZE", 3)
    for M in range(1, 7):
        capture_one(_target.A100, ops.lora_grad_out, t(M, 48), t(48, 8), t(M, 8), 1.0)
    assert len(grad_out_mod._PLANS) == 3
    assert sorted(key[0][0][0] for key in grad_out_mod._PLANS) == [4, 5, 6]  # the newest are kept


def test_host_integer_helpers_match_triton():
    """The launchers' plain-Python cdiv and next_power_of_2 (triton's are constexpr functions,
    microseconds per host call) give triton's values."""
    import triton

    for n in range(1, 300):
        assert _common.next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 16, 32, 64, 128):
            assert _common.cdiv(n, d) == triton.cdiv(n, d)
