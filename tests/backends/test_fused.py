"""The fused path end to end: FusedResLoRALinear chains on the Triton kernels against the float64
oracle, every mode x pre_num x dropout; what is saved for backward; that the kernels ran."""

import pytest
import torch
from helpers import KERNEL_DEVICE, KERNEL_DTYPES, SeedRecorder, ToyStack, assert_lowp_close, oracle_params
from oracle import oracle_grads, toy_stack

pytest.importorskip("triton")
import reslora_kernels.ops as ops  # noqa: E402
from reslora_kernels import backend, functional, fused, reference, set_backend  # noqa: E402
from reslora_kernels.ops import _target  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_empty")


@pytest.fixture
def triton_backend(monkeypatch):
    set_backend("fused")


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("pre_num", [1, 2, -1])
@pytest.mark.parametrize("mode", ["none", "is", "bs", "ms"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_fused_chain_matches_oracle(triton_backend, monkeypatch, dtype, mode, pre_num, p):
    length, features = 4, 40
    recorder = SeedRecorder(monkeypatch)
    model = ToyStack(length, features, mode, pre_num, rank=8, dropout=p, dtype=dtype, device=KERNEL_DEVICE)
    params = oracle_params(model)
    x0 = torch.randn(3, 7, features, device=KERNEL_DEVICE, dtype=dtype, requires_grad=True)
    ys = model(x0)
    probes = [torch.randn_like(y) for y in ys]
    sum((y * w).sum() for y, w in zip(ys, probes)).backward()

    masks = None
    if p > 0:
        assert len(recorder.seeds) == length
        # The one mask definition: the reference's, which the kernels reproduce bit for bit.
        masks = [reference.dropout_keep_mask(x0.shape, p, seed, KERNEL_DEVICE) for seed in recorder.seeds]
    scaling = model.blocks[0].scaling
    ys64, grads64, gx64 = oracle_grads(params, x0, scaling, mode, pre_num, masks, p, probes, torch.float64)
    ysl, gradsl, gxl = oracle_grads(params, x0, scaling, mode, pre_num, masks, p, probes, dtype)
    for n in range(length):
        assert_lowp_close(ys[n], ys64[n], ysl[n], f"y_{n}")
        assert_lowp_close(model.blocks[n].lora_A.grad, grads64[n][0], gradsl[n][0], f"dA_{n}")
        assert_lowp_close(model.blocks[n].lora_B.grad, grads64[n][1], gradsl[n][1], f"dB_{n}")
    assert_lowp_close(x0.grad, gx64, gxl, "dx")


def test_kernels_actually_run(triton_backend, monkeypatch):
    """No silent fallback: the reference is never called and every fused op launches."""
    calls = {}
    for name in ("lora_down", "linear_lora_fwd", "lora_grad_out", "linear_lora_dx", "lora_grad_A"):
        original = getattr(ops, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)

    def forbidden(*args, **kwargs):
        raise AssertionError("the reference ran under the fused backend")

    monkeypatch.setattr(reference, "reslora_linear", forbidden)
    model = ToyStack(3, 24, "is", dtype=torch.float32, device=KERNEL_DEVICE)
    model(torch.randn(5, 24, device=KERNEL_DEVICE, requires_grad=True))[-1].sum().backward()
    assert calls == {"lora_down": 3, "linear_lora_fwd": 3, "lora_grad_out": 3, "linear_lora_dx": 3, "lora_grad_A": 3}
    # An input that needs no gradient skips its dx GEMM (the first block here).
    calls.clear()
    model(torch.randn(5, 24, device=KERNEL_DEVICE))[-1].sum().backward()
    assert calls["linear_lora_dx"] == 2


@pytest.mark.parametrize("mode", ["is", "ms", "bs"])
def test_saved_tensors(triton_backend, mode):
    """Saved for backward: x, x_prev, z_prev by reference, the block's own output z [M, r] (which its
    chain keeps for the successors anyway), parameters, the 0-d dropout seed; never an [M, N]
    tensor, a copy of an input, or a dropout mask."""
    M, K, N, R = 70, 24, 40, 8
    x = torch.randn(M, K, device=KERNEL_DEVICE, requires_grad=True)
    x_prev = torch.randn(M, K, device=KERNEL_DEVICE, requires_grad=True) if mode == "is" else None
    z_prev = torch.randn(M, R, device=KERNEL_DEVICE, requires_grad=True) if mode == "ms" else None
    rank = 2 * R if mode == "bs" else R
    W = torch.randn(N, K, device=KERNEL_DEVICE)
    A = torch.randn(rank, K, device=KERNEL_DEVICE, requires_grad=True)
    B = torch.randn(N, rank, device=KERNEL_DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, z, _ = functional.reslora_linear(x, W, None, A, B, 2.0, x_prev=x_prev, z_prev=z_prev, dropout_p=0.1)
    inputs = {t.data_ptr() for t in (x, x_prev, z_prev, W, A, B) if t is not None}
    seeds = [t for t in saved if not t.dtype.is_floating_point]
    assert [(t.dtype, t.dim()) for t in seeds] == [(torch.int64, 0)], "only the seed may be a non-float tensor"
    assert seeds[0].device == x.device
    saved = [t for t in saved if t.dtype.is_floating_point]
    for t in saved:
        assert tuple(t.shape) != (M, N), "an [M, N] tensor was saved"
        if t.numel() >= M * K:
            assert t.data_ptr() in inputs, f"a copy {tuple(t.shape)} was saved instead of an input"
        else:
            assert t.data_ptr() in inputs or tuple(t.shape) == (M, rank), f"unexpected saved {tuple(t.shape)}"
    assert [t.data_ptr() for t in saved if t.data_ptr() not in inputs] == [z.data_ptr()]
    (y.sum() + z.sum()).backward()
    assert x.grad is not None and A.grad is not None


def test_seed_as_int_or_device_tensor(triton_backend):
    """An int seed and the same seed as a 0-d tensor draw the same mask; the tensor is saved for
    backward by reference (no copy, never read on the host) and matches the reference backend."""
    M, K, N, R = 9, 24, 16, 4
    x = torch.randn(M, K, device=KERNEL_DEVICE, requires_grad=True)
    W, b = torch.randn(N, K, device=KERNEL_DEVICE), torch.randn(N, device=KERNEL_DEVICE)
    A = torch.randn(R, K, device=KERNEL_DEVICE, requires_grad=True)
    B = torch.randn(N, R, device=KERNEL_DEVICE, requires_grad=True)
    seed = torch.tensor(77, device=KERNEL_DEVICE)
    results = []
    for s in (77, seed):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y, z, _ = fused.fused_reslora_linear(x, W, b, A, B, 2.0, dropout_p=0.4, dropout_seed=s)
        y.sum().backward()
        results.append((y.detach(), z.detach(), x.grad.clone(), A.grad.clone()))
        x.grad = A.grad = B.grad = None
        if isinstance(s, torch.Tensor):
            assert any(t is seed for t in saved), "the seed tensor was copied instead of saved"
    for first, second in zip(*results):
        assert torch.equal(first, second)
    y_ref, z_ref, _ = reference.reslora_linear(x, W, b, A, B, 2.0, dropout_p=0.4, dropout_seed=seed)
    assert_lowp_close(results[0][1], z_ref.double(), None, "z")
    assert_lowp_close(results[0][0], y_ref.double(), None, "y")
    with pytest.raises(ValueError, match="dropout_p > 0 needs a dropout_seed"):
        fused.fused_reslora_linear(x, W, b, A, B, 2.0, dropout_p=0.4)


def test_noncontiguous_input_and_leading_dims(triton_backend):
    layer = ToyStack(1, 24, "none", dtype=torch.float32, device=KERNEL_DEVICE).blocks[0]
    base = torch.randn(24, 5, 6, device=KERNEL_DEVICE)
    x = base.permute(1, 2, 0)  # [5, 6, 24], not viewable as [30, 24]
    y = layer(x)
    params = [t.detach() for t in (layer.weight, layer.bias, layer.lora_A, layer.lora_B)]
    expected, _, _ = reference.reslora_linear(x, *params, layer.scaling)
    expected64, _, _ = reference.reslora_linear(x.double(), *[t.double() for t in params], layer.scaling)
    assert y.shape == (5, 6, 24)
    assert_lowp_close(y, expected64, expected, "y")


def test_large_effective_rank(triton_backend):
    """bs with pre_num = -1 concatenates every previous rank: 8 blocks x r 32 = 256."""
    model = ToyStack(8, 24, "bs", pre_num=-1, rank=32, dtype=torch.float32, device=KERNEL_DEVICE)
    params = oracle_params(model)
    x0 = torch.randn(5, 24, device=KERNEL_DEVICE, requires_grad=True)
    ys = model(x0)
    ys[-1].sum().backward()
    x64 = x0.detach().double().requires_grad_()
    ref = toy_stack(x64, params, model.blocks[0].scaling, "bs", -1)
    ref[-1].sum().backward()
    assert_lowp_close(ys[-1], ref[-1], None, "y")
    assert_lowp_close(model.blocks[0].lora_B.grad, params[0][3].grad, None, "dB_0")
    assert_lowp_close(x0.grad, x64.grad, None, "dx")


def test_norm_statistics_come_from_the_kernel(triton_backend):
    model = ToyStack(2, 24, "is", dtype=torch.float32, device=KERNEL_DEVICE)
    x = torch.randn(6, 24, device=KERNEL_DEVICE)
    model(x)
    assert model.blocks[0].statistics.mean_norm() == pytest.approx(float(x.norm()), rel=1e-5)


def test_auto_runs_cpu_tensors_on_the_composed_path(monkeypatch):
    x = torch.randn(2, 4)
    assert backend.resolve_backend(x) == "composed"
    set_backend("fused")
    if KERNEL_DEVICE == "cpu":
        assert backend.resolve_backend(x) == "fused"
        monkeypatch.setattr(_target, "INTERPRETED", False)
        with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before importing reslora_kernels"):
            backend.resolve_backend(x)
    with pytest.raises(TypeError, match="supports float16, bfloat16 and float32"):
        backend.resolve_backend(x.double())
