"""ResLoRA blocks over quantized bases (bitsandbytes Linear4bit NF4/FP4 with and without double
quantization, Linear8bitLt): every mode against the same model over float bases holding the
dequantized weights; the base stays quantized and frozen; nothing full-precision of the weight is
saved for backward; the fused path reads the dequantization kernel's output; merging into a
16-bit nn.Linear (or requantized, with a warning); float32 adapters by default."""

import pytest
import torch
import torch.nn as nn
from helpers import bitsandbytes
from test_quant_bases import linear4bit, linear8bit

import reslora_kernels.ops as ops
from reslora_kernels import (
    FusedResLoRALinear,
    ResLoRAConfig,
    apply_reslora,
    load_reslora,
    merge_and_unload,
    quant,
    save_reslora,
    use_backend,
)

N = K = 64  # square: the blocks chain; N * K = 4096 elements, no activation below has as many
BASES = ["nf4", "nf4-dq", "fp4", "fp4-dq", "int8"]
MODES = ["none", "is", "bs", "ms"]


@pytest.fixture
def bnb():
    return bitsandbytes()


def quantized_layer(bnb, kind, compute_dtype=torch.float32):
    if kind == "int8":
        return linear8bit(bnb, N, K)[0]
    quant_type, _, dq = kind.partition("-")
    return linear4bit(bnb, N, K, quant_type=quant_type, double_quant=bool(dq), compute_dtype=compute_dtype)[0]


class Stack(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def float_twin(layers):
    """nn.Linear layers holding the dequantized weights (float32) and the biases."""
    twins = []
    for layer in layers:
        twin = nn.Linear(K, N)
        with torch.no_grad():
            twin.weight.copy_(quant.dequantize(layer, torch.float32))
            twin.bias.copy_(layer.bias)
        twins.append(twin)
    return twins


def adapted_pair(bnb, kind, mode, length=3, **config):
    torch.manual_seed(0)
    layers = [quantized_layer(bnb, kind) for _ in range(length)]
    twin = Stack(float_twin(layers))
    model = Stack(layers)
    cfg = ResLoRAConfig(mode=mode, rank=4, target_modules=r"layers\.\d+", **config)
    apply_reslora(model, cfg)
    apply_reslora(twin, cfg)
    with torch.no_grad():
        for ours, theirs in zip(model.layers, twin.layers):
            ours.lora_B.normal_(0.0, 0.2)
            theirs.lora_A.copy_(ours.lora_A)
            theirs.lora_B.copy_(ours.lora_B)
    return model, twin


def run(model, x):
    x = x.clone().requires_grad_()
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    grads = [(b.lora_A.grad, b.lora_B.grad) for b in model.layers]
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", BASES)
def test_every_quantized_base_in_every_mode_is_the_model_over_its_dequantized_weights(bnb, kind, mode):
    model, twin = adapted_pair(bnb, kind, mode)
    packed = [block.base_layer.weight.detach().clone() for block in model.layers]
    model.train(), twin.train()
    x = torch.randn(2, 5, K)
    for _ in range(2):  # twice: the chains' passes, and the shared workspace refilled
        y, dx, grads = run(model, x)
        y_ref, dx_ref, grads_ref = run(twin, x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
        for (gA, gB), (rA, rB) in zip(grads, grads_ref):
            torch.testing.assert_close(gA, rA, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(gB, rB, rtol=1e-5, atol=1e-6)
        model.zero_grad(), twin.zero_grad()
    # The base stays quantized, frozen and untouched.
    cls = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    for block, before in zip(model.layers, packed):
        assert type(block.base_layer) is cls and block.quantized
        weight = block.base_layer.weight
        assert not weight.requires_grad and weight.grad is None and not weight.is_floating_point()
        assert torch.equal(weight.detach(), before)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.lora_{ab}" for i in range(3) for ab in "AB"}


def saved_float_sizes(model, x, checkpoint=False):
    """Sizes of the floating tensors saved for backward by one forward."""
    sizes = []

    def pack(t):
        if t.is_floating_point():
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if checkpoint:
            y = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
        else:
            y = model(x)
    y.sum().backward()
    return sizes


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_nothing_full_precision_of_the_weight_is_saved_for_backward(bnb, kind, mode):
    model, twin = adapted_pair(bnb, kind, mode)
    x = torch.randn(2, 5, K, requires_grad=True)
    sizes = saved_float_sizes(model, x)
    assert sizes and N * K not in sizes  # the other saved tensors still reach outer hooks
    assert N * K in saved_float_sizes(twin, x)  # the hook sees a float base's weight


def test_gradient_checkpointing_recomputes_with_the_weight_dequantized_again(bnb):
    model, _ = adapted_pair(bnb, "nf4-dq", "is")
    x = torch.randn(2, 5, K)
    grads = []
    for checkpoint in (False, True):
        model.zero_grad()
        xc = x.clone().requires_grad_()
        seen = saved_float_sizes(lambda t: model(t), xc, checkpoint=checkpoint)
        assert N * K not in seen
        grads.append([xc.grad] + [b.lora_A.grad.clone() for b in model.layers])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["nf4-dq", "fp4", "int8"])
def test_fused_path_reads_the_dequantization_kernels_output(bnb, kind, monkeypatch):
    model, _ = adapted_pair(bnb, kind, "is", length=2)
    x = torch.randn(3, K)
    with use_backend("composed"):
        y_ref, dx_ref, grads_ref = run(model, x)
    model.zero_grad()
    calls = []
    name = "dequant_int8" if kind == "int8" else "dequant_4bit"
    kernel = getattr(ops, name)
    monkeypatch.setattr(ops, name, lambda *a, **k: calls.append(1) or kernel(*a, **k))
    with use_backend("fused"):
        y, dx, grads = run(model, x)
    assert len(calls) == 4  # two blocks, forward and backward
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    for (gA, gB), (rA, rB) in zip(grads, grads_ref):
        torch.testing.assert_close(gA, rA, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gB, rB, rtol=1e-4, atol=1e-5)


def test_compute_dtype_and_output_dtype_follow_bitsandbytes(bnb):
    layer = FusedResLoRALinear.from_linear(quantized_layer(bnb, "nf4", torch.bfloat16), rank=4)
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    x = torch.randn(3, K)
    y = layer(x)
    assert y.dtype == torch.float32  # computed in bfloat16, returned in the input's dtype
    torch.testing.assert_close(y, layer.base_layer(x), rtol=0, atol=0)  # lora_B = 0: bitsandbytes' output
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        layer(torch.ones(3, K, dtype=torch.long))


# ------------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize("method", ["exact", "input_norm", "weight_norm", "lstsq"])
@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_merge_gives_16bit_linears_equal_to_merging_the_dequantized_model(bnb, kind, method):
    mode = "bs" if method == "exact" else "is"
    model, twin = adapted_pair(bnb, kind, mode)
    model.train(), twin.train()
    for _ in range(2):  # norm statistics
        x = torch.randn(4, K)
        model(x), twin(x)
    model.eval(), twin.eval()
    x = torch.randn(6, K)
    calibration = [torch.randn(8, K)] if method == "lstsq" else None
    merge_and_unload(model, method, calibration=calibration)
    merge_and_unload(twin, method, calibration=calibration)
    for ours, theirs in zip(model.layers, twin.layers):
        assert type(ours) is nn.Linear and ours.weight.dtype == torch.float32 and not ours.weight.requires_grad
        torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.bias, theirs.bias, rtol=0, atol=0)
    torch.testing.assert_close(model(x), twin(x), rtol=1e-5, atol=1e-6)


def test_merge_into_the_compute_dtype_and_requantize_on_request_with_a_warning(bnb):
    torch.manual_seed(0)
    model = Stack([quantized_layer(bnb, "nf4-dq", torch.bfloat16)])
    apply_reslora(model, ResLoRAConfig(rank=4, target_modules=r"layers\.\d+"))
    with torch.no_grad():
        model.layers[0].lora_B.normal_(0.0, 0.01)
    x = torch.randn(4, K, dtype=torch.bfloat16)
    before = model(x)
    merged = merge_and_unload(Stack([model.layers[0]]))
    assert type(merged.layers[0]) is nn.Linear and merged.layers[0].weight.dtype == torch.bfloat16
    torch.testing.assert_close(merged(x), before, rtol=2e-2, atol=2e-2)

    model = Stack([quantized_layer(bnb, "nf4-dq", torch.bfloat16)])
    apply_reslora(model, ResLoRAConfig(rank=4, target_modules=r"layers\.\d+"))
    with torch.no_grad():
        model.layers[0].lora_B.normal_(0.0, 0.01)
    block = model.layers[0]
    with pytest.warns(UserWarning, match=r"requantize=True.*lost \d+\.\d% of the merge terms"):
        merge_and_unload(model, requantize=True)
    new = model.layers[0]
    assert type(new) is bnb.nn.Linear4bit and new is not block.base_layer
    info, old = quant.describe(new), quant.describe(block.base_layer)
    assert (info.format, info.blocksize, info.double_quant) == (old.format, old.blocksize, old.double_quant)


# ------------------------------------------------------------------------------------ adapter dtype
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_adapters_over_16bit_bases_by_default_and_the_base_dtype_on_request(dtype, tmp_path):
    def model(**config):
        torch.manual_seed(0)
        return apply_reslora(Stack([nn.Linear(K, N, dtype=dtype) for _ in range(2)]),
                             ResLoRAConfig(mode="is", rank=4, target_modules=r"layers\.\d+", **config))  # fmt: skip

    ours = model()
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}
    kept = model(autocast_adapter_dtype=False)
    assert {p.dtype for n, p in kept.named_parameters() if "lora_" in n} == {dtype}
    x = torch.randn(3, K, dtype=dtype)
    with torch.no_grad():
        for a, b in zip(ours.layers, kept.layers):
            a.lora_B.normal_(0.0, 0.1)
            b.lora_B.copy_(a.lora_B)
    y = ours(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert ours.layers[0].lora_A.grad.dtype == torch.float32
    # A bf16 step of lr * grad on an entry of lora_B below the bf16 step of the entry is rounded
    # away; the float32 adapter keeps it.
    entry = ours.layers[0].lora_B.detach()[0, 0]
    step = entry * 1e-4
    assert float(entry + step) != float(entry) and float((entry + step).to(dtype)) == float(entry.to(dtype))
    save_reslora(ours, tmp_path / "a")
    torch.manual_seed(0)  # the same base weights
    loaded = load_reslora(Stack([nn.Linear(K, N, dtype=dtype) for _ in range(2)]), tmp_path / "a")
    for a, b in zip(ours.layers, loaded.layers):
        assert b.lora_A.dtype == torch.float32 and torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
    torch.testing.assert_close(loaded(x), ours(x), rtol=0, atol=0)


def test_quantized_adapters_save_and_load(bnb, tmp_path):
    model, _ = adapted_pair(bnb, "nf4-dq", "ms")
    assert model.layers[0].lora_A.dtype == torch.float32
    save_reslora(model, tmp_path)
    torch.manual_seed(0)
    fresh = Stack([quantized_layer(bnb, "nf4-dq") for _ in range(3)])
    load_reslora(fresh, tmp_path)
    x = torch.randn(2, K)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
