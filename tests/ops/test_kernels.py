"""Every Triton op alone against a float64 formula, on odd shapes, with NaN-poisoned outputs.

On a CPU machine these run through Triton's interpreter (float32, float16); on a GPU the same
tests run the compiled kernels and add bfloat16.
"""

import contextlib

import pytest
import torch
from helpers import (
    KERNEL_DEVICE,
    KERNEL_DTYPES,
    assert_fp32_bounded,
    assert_lowp_close,
    assert_maxabs_close,
    rel_err,
)

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from reslora_kernels import ops, reference  # noqa: E402
from reslora_kernels.ops import _common, _configs, _jit, _target  # noqa: E402
from reslora_kernels.ops import linear_lora_dx_kernel as linear_lora_dx  # noqa: E402
from reslora_kernels.ops import linear_lora_fwd_kernel as linear_lora_fwd  # noqa: E402
from reslora_kernels.ops import lora_down_kernel as lora_down  # noqa: E402
from reslora_kernels.ops import lora_grad_A_kernel as lora_grad_A  # noqa: E402
from reslora_kernels.ops import lora_grad_out_kernel as lora_grad_out  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_empty")

# (M, K, N, R): no dimension a multiple of any block (the unaligned config tables); ranks 1..16
# and multi-tile ranks 80, 130; and one shape whose K and N are multiples of 16 (aligned tables).
SHAPES = [
    (45, 48, 80, 8),
    (1, 24, 40, 1),
    (17, 40, 72, 8),
    (70, 72, 24, 16),
    (17, 24, 24, 16),
    (70, 40, 40, 1),
    (33, 24, 40, 80),
    (9, 40, 24, 130),
]
DROPOUT = [0.0, 0.3]


def rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=KERNEL_DEVICE, dtype=torch.float64) * scale).to(dtype)


def strided(t):
    """The same values as a non-contiguous view (every other column of a wider buffer)."""
    wide = torch.empty(t.shape[0], 2 * t.shape[1], device=t.device, dtype=t.dtype)
    wide[:, ::2] = t
    return wide[:, ::2]


def seed(value):
    """A dropout seed as the launchers take it: a 0-d int64 tensor on the kernels' device."""
    return torch.tensor(value, dtype=torch.int64, device=KERNEL_DEVICE)


def keep(shape, p, seed):
    """The one dropout mask every backend draws: the reference's definition."""
    return reference.dropout_keep_mask(shape, p, seed, KERNEL_DEVICE)


@contextlib.contextmanager
def deterministic(on):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def lora_input(x, x_prev, input_scale, mask, p):
    lora_in = x if x_prev is None else x + x_prev
    return lora_in * input_scale * mask / (1 - p)


@pytest.mark.parametrize("p", DROPOUT)
@pytest.mark.parametrize("shortcut", ["none", "x_prev", "self"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_lora_down(dtype, shape, shortcut, p):
    M, K, _, R = shape
    x, A = rand(M, K, dtype=dtype), rand(R, K, dtype=dtype, scale=0.2)
    x_prev = rand(M, K, dtype=dtype) if shortcut == "x_prev" else None
    input_scale = 2.0 if shortcut == "self" else 1.0
    z, sqnorm = ops.lora_down(
        x, A, x_prev, input_scale=input_scale, dropout_p=p, dropout_seed=seed(11), compute_x_sqnorm=True
    )
    mask = keep((M, K), p, 11)

    def formula(dt, absolute=False):
        cast = lambda t: None if t is None else (t.abs() if absolute else t).to(dt)
        return lora_input(cast(x), cast(x_prev), input_scale, mask, p) @ cast(A).T

    assert z.dtype == dtype and z.shape == (M, R)
    assert_lowp_close(z, formula(torch.float64), formula(dtype), "z", formula(torch.float64, True), depth=K + 4)
    assert rel_err(sqnorm, x.double().square().sum()) < 1e-5


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_linear_lora_fwd(dtype, shape, bias):
    M, K, N, R = shape
    x, W = rand(M, K, dtype=dtype), rand(N, K, dtype=dtype, scale=0.2)
    b = rand(N, dtype=dtype) if bias else None
    u, B = rand(M, R, dtype=dtype), rand(N, R, dtype=dtype, scale=0.2)
    y = ops.linear_lora_fwd(strided(x), W, b, u, B, 1.5)

    def formula(dt, absolute=False):
        cast = lambda t: (t.abs() if absolute else t).to(dt)
        out = cast(x) @ cast(W).T + 1.5 * (cast(u) @ cast(B).T)
        return out + cast(b) if bias else out

    assert_lowp_close(y, formula(torch.float64), formula(dtype), "y", formula(torch.float64, True), depth=K + R + 3)


@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_lora_grad_out(dtype, shape, det):
    M, _, N, R = shape
    grad_out, B, u = rand(M, N, dtype=dtype), rand(N, R, dtype=dtype, scale=0.2), rand(M, R, dtype=dtype)
    with deterministic(det):
        g, dB = ops.lora_grad_out(strided(grad_out), B, u, 0.5)
    assert g.dtype == torch.float32 and dB.dtype == dtype
    go64, B64, u64 = grad_out.double(), B.double(), u.double()
    assert_lowp_close(g, 0.5 * go64 @ B64, (0.5 * grad_out @ B), "g", 0.5 * go64.abs() @ B64.abs(), depth=N + 2)
    assert_lowp_close(dB, 0.5 * go64.T @ u64, (0.5 * grad_out.T @ u), "dB", 0.5 * go64.abs().T @ u64.abs(), depth=M + 2)


@pytest.mark.parametrize("p", DROPOUT)
@pytest.mark.parametrize("input_scale", [1.0, 2.0])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_linear_lora_dx(dtype, shape, input_scale, p):
    M, K, N, R = shape
    grad_out, W = rand(M, N, dtype=dtype), rand(N, K, dtype=dtype, scale=0.2)
    g, A = rand(M, R, dtype=torch.float32), rand(R, K, dtype=dtype, scale=0.2)
    dx, dx_prev = ops.linear_lora_dx(
        grad_out, W, g, A, input_scale=input_scale, dropout_p=p, dropout_seed=seed(3), store_prev=True
    )
    mask = keep((M, K), p, 3)

    def v(dt, absolute=False):
        cast = lambda t: (t.abs() if absolute else t).to(dt)
        return (cast(g) @ cast(A)) * input_scale * mask / (1 - p)

    assert_lowp_close(dx_prev, v(torch.float64), v(dtype), "dx_prev", v(torch.float64, True), depth=R + 4)
    dx_ref = grad_out.double() @ W.double() + v(torch.float64)
    dx_magnitude = grad_out.double().abs() @ W.double().abs() + v(torch.float64, True)
    assert_lowp_close(dx, dx_ref, grad_out @ W + v(dtype), "dx", dx_magnitude, depth=N + R + 5)
    dx_only, none = ops.linear_lora_dx(grad_out, W, g, A, input_scale=input_scale, dropout_p=p, dropout_seed=seed(3))
    assert none is None and torch.equal(dx_only, dx)


@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("p", DROPOUT)
@pytest.mark.parametrize("has_prev", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_lora_grad_A(dtype, shape, has_prev, p, det):
    M, K, _, R = shape
    g, x = rand(M, R, dtype=torch.float32), rand(M, K, dtype=dtype)
    x_prev = rand(M, K, dtype=dtype) if has_prev else None
    with deterministic(det):
        dA = ops.lora_grad_A(g, strided(x), x_prev, input_scale=1.0, dropout_p=p, dropout_seed=seed(5))
    mask = keep((M, K), p, 5)

    def formula(dt, absolute=False):
        cast = lambda t: None if t is None else (t.abs() if absolute else t).to(dt)
        return cast(g).T @ lora_input(cast(x), cast(x_prev), 1.0, mask, p)

    assert dA.dtype == dtype
    assert_lowp_close(dA, formula(torch.float64), formula(dtype), "dA", formula(torch.float64, True), depth=M + 4)


def test_empty_batch():
    x = torch.empty(0, 24, device=KERNEL_DEVICE)
    A, W, B = rand(4, 24, dtype=torch.float32), rand(8, 24, dtype=torch.float32), rand(8, 4, dtype=torch.float32)
    z, sq = ops.lora_down(x, A, compute_x_sqnorm=True)
    assert z.shape == (0, 4) and float(sq) == 0.0
    assert ops.linear_lora_fwd(x, W, None, z, B, 1.0).shape == (0, 8)
    g, dB = ops.lora_grad_out(torch.empty(0, 8, device=KERNEL_DEVICE), B, z, 1.0)
    assert g.shape == (0, 4) and torch.equal(dB, torch.zeros_like(B))
    dx, _ = ops.linear_lora_dx(torch.empty(0, 8, device=KERNEL_DEVICE), W, g, A)
    assert dx.shape == (0, 24)
    assert torch.equal(ops.lora_grad_A(g, x), torch.zeros_like(A))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("value", [0, 1, 12345, 2**31 - 2])
@pytest.mark.parametrize("shape", [(1, 1), (37, 53), (2, 3, 17), (70, 129), (5, 300)])
def test_dropout_mask_is_the_reference_bit_for_bit(shape, value, p):
    """The Triton mask (every kernel evaluates the same jit function on its tile) is the torch
    definition of reference.dropout_keep_mask, element for element; int and tensor seeds agree."""
    expected = reference.dropout_keep_mask(shape, p, value, KERNEL_DEVICE)
    assert torch.equal(ops.dropout_keep_mask(shape, p, value, KERNEL_DEVICE), expected)
    assert torch.equal(ops.dropout_keep_mask(shape, p, seed(value), KERNEL_DEVICE), expected)


def test_dropout_mask_statistics_and_determinism():
    p = 0.25
    mask = ops.dropout_keep_mask((64, 96), p, 42, KERNEL_DEVICE)
    assert mask.dtype == torch.bool and mask.shape == (64, 96)
    n = mask.numel()
    assert abs(int((~mask).sum()) - n * p) < 6 * (n * p * (1 - p)) ** 0.5
    assert torch.equal(mask, ops.dropout_keep_mask((64, 96), p, 42, KERNEL_DEVICE))
    assert not torch.equal(mask, ops.dropout_keep_mask((64, 96), p, 43, KERNEL_DEVICE))
    # Rows and columns are not correlated: the mask is not a shifted copy of itself.
    assert not torch.equal(mask[1:], mask[:-1]) and not torch.equal(mask[:, 1:], mask[:, :-1])
    # Leading dims flatten into rows, as the kernels see them.
    assert torch.equal(ops.dropout_keep_mask((4, 16, 96), p, 42, KERNEL_DEVICE).reshape(64, 96), mask)


def test_launcher_errors():
    x = rand(8, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"lora_A must be \[4, 16\]"):
        ops.lora_down(x, rand(4, 15, dtype=torch.float32))
    with pytest.raises(TypeError, match="dtype mismatch: lora_A is torch.float16"):
        ops.lora_down(x, rand(4, 16, dtype=torch.float16))
    with pytest.raises(TypeError, match="support float16, bfloat16 and float32"):
        ops.lora_down(x.double(), rand(4, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="g must be float32"):
        ops.lora_grad_A(rand(8, 4, dtype=torch.float16), x)


def test_dropout_seed_errors():
    x, A = rand(8, 16, dtype=torch.float32), rand(4, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="dropout_p > 0 needs a dropout_seed"):
        ops.lora_down(x, A, dropout_p=0.1)
    with pytest.raises(TypeError, match=r"dropout_seed must be a 0-d int64 tensor, got int"):
        ops.lora_down(x, A, dropout_p=0.1, dropout_seed=3)
    with pytest.raises(TypeError, match=r"dropout_seed must be a 0-d int64 tensor, got torch.int32 \(1,\)"):
        ops.lora_grad_A(rand(8, 4, dtype=torch.float32), x, dropout_p=0.1, dropout_seed=torch.tensor([3]).int())
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.0"):
        ops.linear_lora_dx(
            rand(8, 6, dtype=torch.float32),
            rand(6, 16, dtype=torch.float32),
            rand(8, 4, dtype=torch.float32),
            A,
            dropout_p=1.0,
        )
    with pytest.raises(TypeError, match="dropout_seed must be an int or a 0-d integer tensor, got float"):
        ops.seed_tensor(1.5, KERNEL_DEVICE)
    with pytest.raises(TypeError, match=r"dropout_seed must be an int or a 0-d integer tensor, got torch.float32 \(\)"):
        ops.seed_tensor(torch.tensor(1.0), KERNEL_DEVICE)
    if KERNEL_DEVICE == "cuda":
        with pytest.raises(ValueError, match="device mismatch: dropout_seed is on cpu"):
            ops.lora_down(x, A, dropout_p=0.1, dropout_seed=torch.tensor(3))


# ------------------------------------------------------------------ Hopper path and launch plans
#: A Hopper as the launchers see it, with 3 SMs so that each persistent program walks several tiles.
SMALL_HOPPER = _target.Target("small sm_90", 90, 3, 232448)
# (M, K, N, R) with K and N multiples of 16 (tensor descriptors need 16-byte strides): tails in
# every dimension past the 32-wide interpreter tiles, and more tiles than programs.
TMA_SHAPES = [(70, 48, 80, 8), (33, 96, 16, 130), (1, 16, 112, 1)]


@pytest.mark.skipif(KERNEL_DEVICE == "cuda", reason="the interpreter's run of the Hopper kernels")
@pytest.mark.parametrize("shape", TMA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_hopper_tma_kernels_in_the_interpreter(dtype, shape):
    """The persistent TMA kernels (what sm_90 runs) against the float64 formula, outputs poisoned,
    in Triton's interpreter (it implements tensor descriptors)."""
    M, K, N, R = shape
    x, W, b = rand(M, K, dtype=dtype), rand(N, K, dtype=dtype, scale=0.2), rand(N, dtype=dtype)
    u, B = rand(M, R, dtype=dtype), rand(N, R, dtype=dtype, scale=0.2)
    grad_out, g, A = rand(M, N, dtype=dtype), rand(M, R, dtype=torch.float32), rand(R, K, dtype=dtype, scale=0.2)
    with _target.simulate(SMALL_HOPPER), _target.capture() as plan:
        ops.linear_lora_fwd(x, W, b, u, B, 1.5)
        ops.linear_lora_dx(grad_out, W, g, A, dropout_p=0.3, dropout_seed=seed(9), store_prev=True)
    assert [launch.kernel for launch in plan] == [
        linear_lora_fwd._linear_lora_fwd_tma_kernel,
        linear_lora_dx._linear_lora_dx_tma_kernel,
    ]
    with _target.simulate(SMALL_HOPPER):
        y = ops.linear_lora_fwd(x, W, b, u, B, 1.5)
        dx, dx_prev = ops.linear_lora_dx(
            grad_out, W, g, A, input_scale=2.0, dropout_p=0.3, dropout_seed=seed(9), store_prev=True
        )

    def y_formula(dt, absolute=False):
        cast = lambda t: (t.abs() if absolute else t).to(dt)
        return cast(x) @ cast(W).T + 1.5 * (cast(u) @ cast(B).T) + cast(b)

    mask = keep((M, K), 0.3, 9)

    def v(dt, absolute=False):
        cast = lambda t: (t.abs() if absolute else t).to(dt)
        return (cast(g) @ cast(A)) * 2.0 * mask / 0.7

    f64 = torch.float64
    assert_lowp_close(y, y_formula(f64), y_formula(dtype), "y", y_formula(f64, True), depth=K + R + 3)
    assert_lowp_close(dx_prev, v(f64), v(dtype), "dx_prev", v(f64, True), depth=R + 4)
    dx_magnitude = grad_out.double().abs() @ W.double().abs() + v(f64, True)
    assert_lowp_close(
        dx, grad_out.double() @ W.double() + v(f64), grad_out @ W + v(dtype), "dx", dx_magnitude, depth=N + R + 5
    )


@triton.jit
def _count_tiles_kernel(count_ptr, num_m, num_n, NUM_SMS: tl.constexpr, GROUP_M: tl.constexpr):
    # The persistent kernels' schedule: program p takes tiles p, p + NUM_SMS, ... in grouped order.
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _jit.grouped_tile(tile, num_m, num_n, GROUP_M)
        tl.atomic_add(count_ptr + pid_m * num_n + pid_n, 1)


@pytest.mark.parametrize("num_m, num_n, programs, group", [(5, 7, 3, 2), (9, 2, 4, 8), (1, 1, 3, 8), (16, 3, 5, 4)])
def test_persistent_schedule_covers_every_tile_exactly_once(num_m, num_n, programs, group):
    counts = torch.zeros(num_m * num_n, dtype=torch.int32, device=KERNEL_DEVICE)
    _count_tiles_kernel[(min(programs, num_m * num_n),)](
        count_ptr=counts, num_m=num_m, num_n=num_n, NUM_SMS=programs, GROUP_M=group
    )
    assert torch.equal(counts, torch.ones_like(counts))


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def test_launch_plans_follow_the_target_and_alignment():
    """Hopper + aligned: the TMA kernels with one program per SM at most; A100 or an unaligned
    shape: the pointer kernels (unaligned: their small-tile table)."""
    M, K, N, R = 8192, 4096, 1024, 16
    x, W, u, B = _meta(M, K), _meta(N, K), _meta(M, R), _meta(N, R)
    for target, expected in [
        (_target.H100, linear_lora_fwd._linear_lora_fwd_tma_kernel),
        (_target.A100, linear_lora_fwd._linear_lora_fwd_kernel),
    ]:
        with _target.simulate(target), _target.capture() as plan:
            ops.linear_lora_fwd(x, W, None, u, B, 1.0)
        (launch,) = plan
        assert launch.kernel is expected
        grid = launch.grid({"BLOCK_M": 128, "BLOCK_N": 128})
        assert grid == ((min(target.sm_count, 64 * 8),) if target is _target.H100 else (64 * 8,))
    with _target.simulate(_target.H100), _target.capture() as plan:
        ops.linear_lora_fwd(_meta(M, 1000), _meta(N, 1000), None, u, B, 1.0)
        ops.linear_lora_dx(_meta(M, N), _meta(N, 1000), _meta(M, R, dtype=torch.float32), _meta(R, 1000))
    assert [launch.kernel for launch in plan] == [
        linear_lora_fwd._linear_lora_fwd_unaligned_kernel,
        linear_lora_dx._linear_lora_dx_unaligned_kernel,
    ]


def test_autotune_keys_hold_every_flag_that_changes_the_build():
    """A config tuned without the input shortcut (block 0 of an is-chain) must not be reused
    with it (block 1): every constexpr flag and the rank bucket are in each kernel's key."""
    for kernel, flags in [
        (lora_down._lora_down_kernel, ["HAS_PREV", "DROPOUT", "SQNORM", "DOT_PRECISION", "BLOCK_R", "R_BUCKET"]),
        (linear_lora_fwd._linear_lora_fwd_kernel, ["HAS_BIAS", "DOT_PRECISION", "BLOCK_R", "R_BUCKET"]),
        (linear_lora_fwd._linear_lora_fwd_tma_kernel, ["HAS_BIAS", "NUM_SMS", "BLOCK_R", "R_BUCKET"]),
        (linear_lora_dx._linear_lora_dx_kernel, ["DROPOUT", "STORE_PREV", "DOT_PRECISION", "BLOCK_R", "R_BUCKET"]),
        (linear_lora_dx._linear_lora_dx_tma_kernel, ["DROPOUT", "STORE_PREV", "NUM_SMS", "R_BUCKET"]),
        (lora_grad_A._lora_grad_a_kernel, ["HAS_PREV", "DROPOUT", "DETERMINISTIC", "R_BUCKET"]),
        (lora_grad_out._lora_grad_out_kernel, ["DETERMINISTIC", "BLOCK_R", "R_BUCKET"]),
    ]:
        assert set(flags) <= set(kernel.keys), kernel.fn
        assert "R" not in kernel.keys  # the rank is bucketed: a growing bs rank tunes once per power of two
    # A bs chain with pre_num = -1 and r = 16: concatenated ranks 16, 32, ..., 128 tune 4 times.
    assert len({lora_down.rank_bucket(16 * n) for n in range(1, 9)}) == 4


def test_block_minimums_come_from_the_config_table(monkeypatch):
    """The norm partials are sized by the smallest BLOCK_M of the configs the tuner may pick: a
    table with BLOCK_M = 16 gets twice the partials of one whose smallest is 32."""
    M, K, R = 100, 32, 4
    for block_m in (16, 32):
        configs = [triton.Config({"BLOCK_M": block_m, "BLOCK_K": 32})]
        monkeypatch.setattr(lora_down, "_CONFIGS", configs)
        # The tables are constants of a process; the launch plans made from them are cached.
        monkeypatch.setattr(lora_down, "_PLANS", _common.PlanCache())
        with _target.capture() as plan:
            ops.lora_down(_meta(M, K), _meta(R, K), compute_x_sqnorm=True)
        assert plan[0].kwargs["sqnorm_ptr"].shape == (triton.cdiv(M, block_m),)
    assert _configs.smallest([triton.Config({"BLOCK_M": 64}), triton.Config({"BLOCK_M": 16})], "BLOCK_M") == 16


def test_maxabs_rule_catches_one_wrong_tile():
    """At 4096 x 4096 a single 64 x 64 tile off by 1% passes the normwise rule (it is 1/4096 of the
    output) and fails the max-abs rule."""
    torch.manual_seed(0)
    ref64 = torch.randn(4096, 4096, dtype=torch.float64)
    torch_half = ref64.to(torch.float16)
    out = torch_half.clone()
    out[1024:1088, 2048:2112] *= 1.01
    assert rel_err(out, ref64) < 2 * rel_err(torch_half, ref64) + 1e-4
    with pytest.raises(AssertionError, match="max abs err"):
        assert_maxabs_close(out, ref64, torch_half, "y")
    assert_maxabs_close(torch_half, ref64, torch_half, "y")


def test_fp32_rule_does_not_depend_on_the_machine_and_catches_one_wrong_element():
    """float32's elementwise rule bounds the error a priori (gamma_K |x| |A|): every summation
    order passes it, at any thread count, and a single element off by three times its bound fails
    it while the normwise rule still passes."""
    torch.manual_seed(0)
    x, A = torch.randn(2048, 256, dtype=torch.float64), 0.2 * torch.randn(16, 256, dtype=torch.float64)
    ref64, magnitude = x @ A.T, x.abs() @ A.abs().T
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert_fp32_bounded(x.float() @ A.float().T, ref64, magnitude, depth=256, what="z")
    finally:
        torch.set_num_threads(before)
    # Summed one product at a time, from the last k down: the worst order for rounding.
    backwards = torch.zeros(2048, 16)
    for k in reversed(range(256)):
        backwards += x[:, k : k + 1].float() * A[:, k].float()
    assert_fp32_bounded(backwards, ref64, magnitude, depth=256, what="z")
    out = (x.float() @ A.float().T).clone()
    slack = 2 * (256 * 2.0**-24) * magnitude[7, 3] + 2 * (ref64.float().double() - ref64).abs().max()
    out[7, 3] += 3 * float(slack)
    assert rel_err(out, ref64) < 1e-5
    with pytest.raises(AssertionError, match="exceeds the a-priori bound"):
        assert_fp32_bounded(out, ref64, magnitude, depth=256, what="z")
