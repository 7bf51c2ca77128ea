"""The composed path (vendor GEMMs in one autograd Function): chains against the float64 oracle,
every mode x pre_num x dropout x dtype; awkward inputs; and its memory contract (what is saved for
backward, which large buffers are allocated)."""

import pytest
import torch
from helpers import SeedRecorder, ToyStack, assert_lowp_close, oracle_params, rel_err
from oracle import oracle_grads

from reslora_kernels import backend, composed, functional, reference, set_backend
from reslora_kernels.composed import ComposedResLoRAFunction, composed_reslora_linear

pytestmark = pytest.mark.usefixtures("poison_empty")

# float64 has no PyTorch "own error" to compare with: it must match the oracle to rounding.
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def composed_backend(monkeypatch):
    set_backend("composed")


def assert_close(out, ref64, torch_same_dtype, what):
    if out.dtype == torch.float64:
        err = rel_err(out, ref64)
        assert err < 1e-12, f"{what}: float64 rel err {err:.3g}"
        return
    assert_lowp_close(out, ref64, torch_same_dtype, what)
    if out.dtype != torch.float32:
        # A single wrong element must fail too: max-abs error within 2x PyTorch's own + atol.
        own = (torch_same_dtype.double() - ref64.double()).abs().max()
        assert (out.double() - ref64.double()).abs().max() <= 2 * own + 1e-2, what


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("pre_num", [1, 2, -1])
@pytest.mark.parametrize("mode", ["none", "is", "bs", "ms"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_composed_chain_matches_oracle(composed_backend, monkeypatch, dtype, mode, pre_num, p):
    length, features = 4, 40
    recorder = SeedRecorder(monkeypatch)
    model = ToyStack(length, features, mode, pre_num, rank=8, dropout=p, dtype=dtype)
    params = oracle_params(model)
    x0 = torch.randn(3, 7, features, dtype=dtype, requires_grad=True)
    ys = model(x0)
    assert all(y.grad_fn.name() == "ComposedResLoRAFunctionBackward" for y in ys)
    probes = [torch.randn_like(y) for y in ys]
    sum((y * w).sum() for y, w in zip(ys, probes)).backward()

    masks = None
    if p > 0:
        assert len(recorder.seeds) == length
        masks = [reference.dropout_keep_mask(x0.shape, p, seed, "cpu") for seed in recorder.seeds]
    scaling = model.blocks[0].scaling
    ys64, grads64, gx64 = oracle_grads(params, x0, scaling, mode, pre_num, masks, p, probes, torch.float64)
    ysl, gradsl, gxl = oracle_grads(params, x0, scaling, mode, pre_num, masks, p, probes, dtype)
    for n in range(length):
        assert_close(ys[n], ys64[n], ysl[n], f"y_{n}")
        assert_close(model.blocks[n].lora_A.grad, grads64[n][0], gradsl[n][0], f"dA_{n}")
        assert_close(model.blocks[n].lora_B.grad, grads64[n][1], gradsl[n][1], f"dB_{n}")
    assert_close(x0.grad, gx64, gxl, "dx")


def block_inputs(mode, M=(5, 7), K=24, N=40, R=8, dtype=torch.float64, dropout=0.0, bias=True):
    """Inputs of one block call; ``mode`` "is-first" passes x itself as x_prev."""
    x = torch.randn(*M, K, dtype=dtype, requires_grad=True)
    rank = 2 * R if mode == "bs" else R
    args = dict(
        weight=torch.randn(N, K, dtype=dtype),
        bias=torch.randn(N, dtype=dtype) if bias else None,
        lora_A=torch.randn(rank, K, dtype=dtype, requires_grad=True),
        lora_B=torch.randn(N, rank, dtype=dtype, requires_grad=True),
    )
    kw = dict(dropout_p=dropout, dropout_seed=11 if dropout else None, compute_x_sqnorm=True)
    if mode == "is":
        kw["x_prev"] = torch.randn(*M, K, dtype=dtype, requires_grad=True)
    if mode == "is-first":
        kw["x_prev"] = x
    if mode == "ms":
        kw["z_prev"] = torch.randn(*M, rank, dtype=dtype, requires_grad=True)
    return x, args, kw


def outputs_and_grads(impl, x, args, kw, grad_y, grad_z):
    y, z, sq = impl(x, args["weight"], args["bias"], args["lora_A"], args["lora_B"], 1.5, **kw)
    leaves = [x, args["lora_A"], args["lora_B"]] + [t for t in (kw.get("x_prev"), kw.get("z_prev")) if t is not None]
    leaves = list({id(t): t for t in leaves}.values())
    grads = torch.autograd.grad((y, z), leaves, (grad_y, grad_z))
    return [y, z, sq, *grads]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("mode", ["none", "is", "is-first", "bs", "ms"])
def test_block_matches_reference_with_z_gradient(mode, dropout):
    """One block call with a gradient reaching z as well as y (ms chains pass z on), x_prev is x,
    the norm statistics, bias: equal to the reference's autograd to float64 rounding."""
    x, args, kw = block_inputs(mode, dropout=dropout)
    grad_y = torch.randn(5, 7, 40, dtype=torch.float64)
    grad_z = torch.randn(5, 7, args["lora_A"].shape[0], dtype=torch.float64)
    got = outputs_and_grads(composed_reslora_linear, x, args, kw, grad_y, grad_z)
    want = outputs_and_grads(reference.reslora_linear, x, args, kw, grad_y, grad_z)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) < 1e-12, f"output {i}"


@pytest.mark.parametrize("M", [1, 3, 129])
@pytest.mark.parametrize("K, N, R", [(1, 1, 1), (17, 5, 3), (33, 65, 64), (40, 24, 128)])
def test_odd_shapes(M, K, N, R):
    x, args, kw = block_inputs("is", M=(M,), K=K, N=N, R=R, dtype=torch.float32, dropout=0.2)
    grad_y, grad_z = torch.randn(M, N), torch.randn(M, R)
    got = outputs_and_grads(composed_reslora_linear, x, args, kw, grad_y, grad_z)
    x64, args64, kw64 = x.double(), {k: v.double() for k, v in args.items()}, {**kw, "x_prev": kw["x_prev"].double()}
    want = outputs_and_grads(reference.reslora_linear, x64, args64, kw64, grad_y.double(), grad_z.double())
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == torch.float32
        assert rel_err(a, b) < 1e-5, f"output {i}"


def test_noncontiguous_inputs_and_leading_dims(composed_backend):
    """Permuted (not viewable as rows) x, x_prev and grad_out; transposed weight storage."""
    base = torch.randn(24, 5, 6, dtype=torch.float64)
    x = base.permute(1, 2, 0).requires_grad_()  # [5, 6, 24]
    x_prev = torch.randn(24, 5, 6, dtype=torch.float64, requires_grad=True).permute(1, 2, 0)
    weight = torch.randn(24, 40, dtype=torch.float64).t()  # [40, 24], column-major
    lora_A = torch.randn(8, 24, dtype=torch.float64, requires_grad=True)
    lora_B = torch.randn(8, 40, dtype=torch.float64).t().requires_grad_()
    grad_y = torch.randn(40, 5, 6, dtype=torch.float64).permute(1, 2, 0)
    args = dict(weight=weight, bias=None, lora_A=lora_A, lora_B=lora_B)
    kw = dict(x_prev=x_prev, dropout_p=0.25, dropout_seed=3)
    grad_z = torch.zeros(5, 6, 8, dtype=torch.float64)
    got = outputs_and_grads(functional.reslora_linear, x, args, kw, grad_y, grad_z)
    want = outputs_and_grads(reference.reslora_linear, x, args, kw, grad_y, grad_z)
    assert got[0].shape == (5, 6, 40) and got[3].shape == x.shape
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None
        else:
            assert rel_err(a, b) < 1e-12, f"output {i}"


@pytest.mark.parametrize("mode", ["none", "is", "bs", "ms"])
def test_empty_batch(composed_backend, mode):
    """M = 0: empty outputs, zero parameter gradients, no crash."""
    x, args, kw = block_inputs(mode, M=(0, 3), dtype=torch.float32, dropout=0.1)
    y, z, sq = functional.reslora_linear(x, **args, scaling=2.0, **kw)
    assert y.shape == (0, 3, 40) and z.shape == (0, 3, args["lora_A"].shape[0]) and float(sq) == 0.0
    (y.sum() + z.sum()).backward()
    assert x.grad.shape == x.shape
    assert torch.equal(args["lora_A"].grad, torch.zeros_like(args["lora_A"]))
    assert torch.equal(args["lora_B"].grad, torch.zeros_like(args["lora_B"]))


def test_tensor_seed_and_same_mask_as_reference():
    """A 0-d int64 device-tensor seed works and names the same mask as the int."""
    x, args, kw = block_inputs("none", dropout=0.5)
    y_int, _, _ = composed_reslora_linear(x, **args, scaling=1.0, **kw)
    kw["dropout_seed"] = torch.tensor(11)
    y_tensor, _, _ = composed_reslora_linear(x, **args, scaling=1.0, **kw)
    y_ref, _, _ = reference.reslora_linear(x, **args, scaling=1.0, **kw)
    assert torch.equal(y_int, y_tensor)
    assert rel_err(y_int, y_ref) < 1e-12
    kw["dropout_seed"] = 12
    assert rel_err(composed_reslora_linear(x, **args, scaling=1.0, **kw)[0], y_ref) > 1e-3


@pytest.mark.parametrize("block_bytes", [4, 100, 1 << 20])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (130, 33), (0, 4)])
def test_blocked_cpu_mask_is_the_reference_mask(monkeypatch, shape, block_bytes):
    """The composed path hashes its CPU mask block by block of rows: the same bits as
    reference.dropout_keep_mask, for every block size, dtype, p and kind of seed."""
    monkeypatch.setattr(composed, "MASK_BLOCK_BYTES", block_bytes)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x2 = torch.empty(shape, dtype=dtype)
        for p in (1e-9, 0.1, 0.5, 0.999999):
            for seed in (0, 12345, 2**31 - 2, torch.tensor(77), torch.tensor(5, dtype=torch.int32)):
                expected = reference.dropout_keep_mask(shape, p, seed, "cpu").to(dtype)
                got = composed._keep(x2, p, seed)
                assert got.dtype == dtype and torch.equal(got, expected), (dtype, p, seed)


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (130, 33), (33, 300), (0, 4)])
def test_gpu_mask_kernel_is_the_reference_mask(shape):
    """What the composed path runs for its mask on a GPU (one Triton kernel writing the 0/1 mask
    in the input's dtype), here through Triton's interpreter on CPU tensors: the bits of
    reference.dropout_keep_mask, for every dtype, p and kind of seed."""
    pytest.importorskip("triton")
    write = composed._device_mask_kernel()
    assert write is not None
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x2 = torch.empty(shape, dtype=dtype)
        for p in (1e-9, 0.1, 0.5, 0.999999):
            for seed in (0, 12345, 2**31 - 2, torch.tensor(77), torch.tensor(5, dtype=torch.int32)):
                expected = reference.dropout_keep_mask(shape, p, seed, "cpu").to(dtype)
                got = write(shape[0], shape[1], p, seed, x2)
                assert got.dtype == dtype and torch.equal(got, expected), (dtype, p, seed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mask_is_one_kernel():
    """On CUDA tensors the composed mask is one launch (tests/backends/test_composed.py checks its bits
    through the interpreter on CPU), and it is the reference mask."""
    from reslora_kernels.ops import _target

    x2 = torch.empty((300, 1000), device="cuda", dtype=torch.bfloat16)
    with _target.capture() as launches:
        composed._keep(x2, 0.1, 7)
    assert len(launches) == 1
    expected = reference.dropout_keep_mask(x2.shape, 0.1, 7, "cuda").to(x2.dtype)
    assert torch.equal(composed._keep(x2, 0.1, torch.tensor(7, device="cuda")), expected)


def test_missing_seed_is_an_error():
    x, args, _ = block_inputs("none")
    with pytest.raises(ValueError, match="dropout_p > 0 needs a dropout_seed"):
        composed_reslora_linear(x, **args, scaling=1.0, dropout_p=0.1)


def test_inputs_without_grad_skip_their_gemms(monkeypatch):
    """x needing no gradient skips the dx GEMM; a frozen adapter skips dA/dB; an unfrozen base
    weight and bias get their gradients."""
    calls = []
    mm, addmm = torch.mm, torch.addmm
    monkeypatch.setattr(torch, "mm", lambda a, b: calls.append(("mm", tuple(a.shape), tuple(b.shape))) or mm(a, b))
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(("addmm",)) or addmm(*a, **k))
    x, args, kw = block_inputs("none", M=(9,), K=24, N=40)
    x.requires_grad_(False)
    y, _, _ = composed_reslora_linear(x, **args, scaling=1.0)
    calls.clear()
    y.sum().backward()
    assert ("mm", (9, 40), (40, 24)) not in calls  # grad_out W
    assert args["lora_A"].grad is not None and args["lora_B"].grad is not None

    x.requires_grad_(True)
    args["weight"].requires_grad_(True)
    args["bias"].requires_grad_(True)
    args["lora_A"].requires_grad_(False)
    args["lora_B"].requires_grad_(False)
    y, _, _ = composed_reslora_linear(x, **args, scaling=1.0)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert rel_err(args["weight"].grad, grad_y.t() @ x) < 1e-12
    assert rel_err(args["bias"].grad, grad_y.sum(0)) < 1e-12
    assert x.grad is not None


# ---------------------------------------------------------------------------- memory contract
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["none", "is", "is-first", "bs", "ms"])
def test_saved_tensors(mode, dropout):
    """Saved for backward: x and x_prev by reference, u [M, r], parameters; never an [M, N]
    tensor, a copy of an input, or a dropout mask (integer or boolean)."""
    M, K, N, R = 70, 24, 40, 8
    x, args, kw = block_inputs(mode, M=(M,), K=K, N=N, R=R, dtype=torch.float32, dropout=dropout)
    rank = args["lora_A"].shape[0]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, z, _ = composed_reslora_linear(x, **args, scaling=2.0, **kw)
    inputs = {t.data_ptr() for t in (x, kw.get("x_prev"), *args.values()) if t is not None}
    assert x.data_ptr() in {t.data_ptr() for t in saved}, "x is saved by reference"
    for t in saved:
        assert t.dtype.is_floating_point, f"a {t.dtype} tensor (a mask?) was saved"
        assert tuple(t.shape) != (M, N), "an [M, N] tensor was saved"
        assert t.data_ptr() in inputs or tuple(t.shape) == (M, rank), f"unexpected saved {tuple(t.shape)}"
    new = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved if t.data_ptr() not in inputs}
    assert sum(new.values()) == M * rank * 4
    (y.sum() + z.sum()).backward()
    assert x.grad is not None and args["lora_A"].grad is not None


def allocations(fn):
    """``(sizes of the allocations, peak bytes)`` of the CPU allocator while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return [e.nbytes() for e in events if e.nbytes() > 0], peak


@pytest.mark.parametrize("mode", ["none", "is", "is-first", "bs", "ms"])
@pytest.mark.parametrize("K, N", [(48, 96), (96, 48)])
def test_peak_memory(mode, K, N):
    """Forward holds y and nothing else of its size at its peak (is: x + x_prev briefly, when
    K > N); backward holds dx (and dx_prev for is) at its peak: the LoRA-up terms are
    accumulated in place, x + x_prev is freed before dx is allocated."""
    M, R = 256, 4
    x, args, kw = block_inputs(mode, M=(M,), K=K, N=N, R=R, dtype=torch.float32)
    kw["compute_x_sqnorm"] = False
    small = 4 * (M + N + K) * 2 * R + 4096  # [M, r], [N, r], [r, K] buffers and scalars
    out = {}

    def forward():
        out["y"] = composed_reslora_linear(x, **args, scaling=2.0, **kw)[0]

    _, forward_peak = allocations(forward)
    extra = M * max(0, K - N) * 4 if mode == "is" else 0
    assert forward_peak <= M * N * 4 + extra + small
    grad_y = torch.randn(M, N)
    _, backward_peak = allocations(lambda: out["y"].backward(grad_y))
    assert backward_peak <= M * K * 4 * (2 if mode == "is" else 1) + small


@pytest.mark.parametrize("mode", ["none", "is", "bs", "ms"])
def test_no_output_sized_temporaries_with_dropout(mode):
    """With dropout (mask regenerated in both passes), still no [M, N] buffer but y."""
    M, K, N, R = 256, 8, 512, 4  # [M, N] float32 = 512 KiB; every [M, K] buffer <= 8 KiB
    x, args, kw = block_inputs(mode, M=(M,), K=K, N=N, R=R, dtype=torch.float32, dropout=0.3)
    out = {}

    def forward():
        out["y"] = composed_reslora_linear(x, **args, scaling=2.0, **kw)[0]

    sizes, _ = allocations(forward)
    assert [n for n in sizes if n >= M * N] == [M * N * 4]
    grad_y = torch.randn(M, N)
    sizes, _ = allocations(lambda: out["y"].backward(grad_y))
    assert [n for n in sizes if n >= M * N] == []


def test_auto_runs_composed_on_cpu():
    layer = ToyStack(1, 24, "none", dtype=torch.float32).blocks[0]
    assert backend.resolve_backend(torch.randn(2, 24)) == "composed"
    assert layer(torch.randn(2, 24)).grad_fn.name() == "ComposedResLoRAFunctionBackward"
    assert ComposedResLoRAFunction.__name__ in layer(torch.randn(2, 24)).grad_fn.name()
