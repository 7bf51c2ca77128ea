"""Quantized base layers: bitsandbytes ``Linear4bit`` (NF4 / FP4, double quantization on and off) and
``Linear8bitLt`` read through ``reslora_kernels.quant`` and known to ``base_layers``: what each stores,
its weight dequantized into a reusable buffer (bitsandbytes' own values; within the quantization
error of the original weight where bitsandbytes' CPU library misreads the layout), the refusals
of what cannot be read, with their reasons, and bitsandbytes never imported unless such a module exists.

bitsandbytes is the test extra (CI installs it: there a missing bitsandbytes fails, elsewhere its
tests skip).
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import KERNEL_DEVICE, bitsandbytes, float_bits

from reslora_kernels import FusedResLoRALinear, ResLoRAConfig, apply_reslora, base_layers, quant, reference

ROOT = Path(__file__).resolve().parents[2]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def bnb():
    return bitsandbytes()


def assert_same_values(ours, theirs, quant_type="nf4"):
    """Bit for bit; for FP4, -0.0 and 0.0 count as equal (bitsandbytes' own implementations give
    its zero code either sign)."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    if quant_type == "fp4":
        ours, theirs = ours + 0.0, theirs + 0.0
    differ = int((float_bits(ours) != float_bits(theirs)).sum())
    assert differ == 0, f"{differ} of {ours.numel()} elements differ"


def linear4bit(bnb, N, K, *, quant_type="nf4", double_quant=True, blocksize=64, compute_dtype=torch.bfloat16,
               weight=None, storage=torch.uint8, cls=None):  # fmt: skip
    """A quantized ``Linear4bit`` (on CPU) and the float weight it was quantized from."""
    if weight is None:
        weight = torch.randn(N, K, dtype=torch.bfloat16) * 0.1
    cls = cls or bnb.nn.Linear4bit
    kwargs = {} if cls is not bnb.nn.Linear4bit else {"quant_type": quant_type}
    module = cls(K, N, compute_dtype=compute_dtype, compress_statistics=double_quant, quant_storage=storage, **kwargs)
    module.weight = bnb.nn.Params4bit(
        weight.clone(), requires_grad=False, compress_statistics=double_quant, quant_type=module.weight.quant_type,
        blocksize=blocksize, quant_storage=storage, module=module,
    )  # fmt: skip
    return module.to("cpu"), weight


def linear8bit(bnb, N, K):
    module = bnb.nn.Linear8bitLt(K, N, has_fp16_weights=False)
    weight = torch.randn(N, K) * 0.1
    module.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    return module.to("cpu"), weight


def bnb_dequantized(bnb, module, dtype):
    """bitsandbytes' own 4-bit dequantization of ``module``'s weight, straight into ``dtype``."""
    state = copy.copy(module.weight.quant_state)
    state.dtype = dtype
    return bnb.functional.dequantize_4bit(module.weight.data, state)


# ------------------------------------------------------------------------------------ description
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16, torch.float32, None])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_describe_4bit(bnb, quant_type, double_quant, compute_dtype):
    module, _ = linear4bit(bnb, 24, 128, quant_type=quant_type, double_quant=double_quant, blocksize=128,
                           compute_dtype=compute_dtype)  # fmt: skip
    info = quant.describe(module)
    assert (info.kind, info.format, info.shape, info.blocksize) == ("Linear4bit", quant_type, (24, 128), 128)
    assert info.double_quant == double_quant and info.nested_blocksize == (256 if double_quant else None)
    assert (info.quant_dtype, info.compute_dtype, info.storage_dtype) == (torch.bfloat16, compute_dtype, torch.uint8)
    assert info.layout == "bitsandbytes" and info.device == torch.device("cpu")
    nested = ", absmax double-quantized (8-bit, blocks of 256)" if double_quant else ""
    compute = str(compute_dtype).replace("torch.", "") if compute_dtype else "the input's dtype"
    assert str(info) == f"{quant_type.upper()}, blocks of 128{nested}, from bfloat16, computes in {compute}"


def test_describe_int8(bnb):
    module, _ = linear8bit(bnb, 24, 40)
    info = quant.describe(module)
    assert (info.kind, info.format, info.shape, info.blocksize, info.double_quant) == (
        "Linear8bitLt", "int8", (24, 40), None, False
    )  # fmt: skip
    assert str(info) == "int8, one absmax per row, computes in the input's dtype"


# ------------------------------------------------------------------------------- dequantization
@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(48, 128, 64), (33, 64, 64), (7, 256, 128), (5, 96, 32)])
def test_dequantize_4bit_is_bitsandbytes(bnb, shape, quant_type, double_quant, dtype):
    """Into a caller's buffer: bitsandbytes' values bit for bit; the kernel (interpreter on CPU)
    through the same interface gives the same bits."""
    N, K, blocksize = shape
    module, _ = linear4bit(bnb, N, K, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize)
    theirs = bnb_dequantized(bnb, module, dtype)
    buffer = torch.full((N, K), float("nan"), dtype=dtype)
    assert quant.dequantize(module, out=buffer) is buffer
    assert_same_values(buffer, theirs, quant_type)
    module = module.to(KERNEL_DEVICE)
    kernel_buffer = torch.full((N, K), float("nan"), dtype=dtype, device=KERNEL_DEVICE)
    quant.dequantize(module, out=kernel_buffer, kernel=True)
    assert_same_values(kernel_buffer.cpu(), theirs, quant_type)


def blockwise_scaled_weight(N, K, blocksize):
    """A weight whose consecutive quantization blocks differ in scale by 10x and 100x: a value
    scaled by another block's absmax is far outside the quantization error."""
    flat = torch.randn(N * K)
    scale = 10.0 ** (torch.arange(N * K) // blocksize % 3).float()
    return (flat * scale).reshape(N, K).to(torch.bfloat16)


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 96, 64), (33, 70, 64), (5, 7, 64), (9, 160, 128), (3, 40, 256), (2, 30, 32)])
def test_dequantized_weight_is_within_the_quantization_error(bnb, shape, quant_type, double_quant):
    """Independent of every implementation: each element is within half the widest gap of the code
    table times its block's absmax (plus the absmax's own 8-bit error when double-quantized) of the
    weight it was quantized from. Rows that end mid-block included: bitsandbytes 0.50's AVX-512 CPU
    library misreads those when the row length is a multiple of 32 (e.g. 96 with blocks of 64), so
    they are decoded by the formula; every path (bitsandbytes', the formula, the kernel) is checked."""
    N, K, blocksize = shape
    weight = blockwise_scaled_weight(N, K, blocksize)
    module, _ = linear4bit(bnb, N, K, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize,
                           weight=weight)  # fmt: skip
    code = module.weight.quant_state.code.sort().values
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    flat = weight.float().reshape(-1)
    blocks = torch.nn.functional.pad(flat.abs(), (0, -(N * K) % blocksize)).reshape(-1, blocksize)
    absmax = blocks.max(dim=1).values.repeat_interleave(blocksize)[: N * K].reshape(N, K)
    bound = absmax * (half_gap + 1e-6)
    if double_quant:  # absmax - mean in 8 bits, blocks of 256 (all of these): within 2% of the largest
        bound = bound + 0.02 * absmax.max()
    for kernel in (False, True):
        ours = quant.dequantize(module.to(KERNEL_DEVICE) if kernel else module, torch.float32, kernel=kernel).cpu()
        error = (ours - weight.float()).abs()
        assert (error <= bound).all(), f"kernel={kernel}: error {float((error / bound).max()):.2f}x the bound"
        module = module.cpu()


def test_dequantize_default_dtype_and_buffer_reuse(bnb):
    module, _ = linear4bit(bnb, 32, 64, compute_dtype=torch.float16)
    first = quant.dequantize(module)
    assert first.dtype == torch.float16 and first.shape == (32, 64)  # the compute dtype
    module.compute_dtype = None
    assert quant.dequantize(module).dtype == torch.bfloat16  # the dtype it was quantized from
    buffer = torch.empty(64, 32, dtype=torch.float16).t()  # any strides
    pointer = buffer.data_ptr()
    for _ in range(2):
        assert quant.dequantize(module, out=buffer) is buffer and buffer.data_ptr() == pointer
        assert torch.equal(buffer, first)


def test_quant_storage_other_than_bytes(bnb):
    """FSDP-style storage (packed bytes held in a bfloat16 tensor) reads as the same bytes."""
    weight = torch.randn(32, 64, dtype=torch.bfloat16)
    as_bytes, _ = linear4bit(bnb, 32, 64, weight=weight)
    as_bf16, _ = linear4bit(bnb, 32, 64, weight=weight, storage=torch.bfloat16)
    assert quant.describe(as_bf16).storage_dtype == torch.bfloat16
    assert torch.equal(quant.dequantize(as_bf16, torch.float32), quant.dequantize(as_bytes, torch.float32))


def test_subclasses_are_their_kind(bnb):
    module, _ = linear4bit(bnb, 16, 64, cls=bnb.nn.LinearFP4)
    assert quant.quantized_kind(module) == "Linear4bit" and quant.describe(module).format == "fp4"


@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_dequantize_int8_before_and_after_the_first_forward(bnb, dtype):
    """The row scales sit on the weight until the first forward moves them to ``module.state``."""
    module, weight = linear8bit(bnb, 24, 40)
    theirs = bnb.functional.int8_vectorwise_dequant(module.weight.data, module.weight.SCB).to(dtype)
    assert_same_values(quant.dequantize(module, dtype), theirs)
    assert (quant.dequantize(module, torch.float32) - weight).abs().max() <= weight.abs().max() / 127
    module(torch.randn(3, 40))
    assert module.weight.SCB is None and module.state.SCB is not None
    assert_same_values(quant.dequantize(module, dtype), theirs)
    module = module.to(KERNEL_DEVICE)
    assert_same_values(quant.dequantize(module, dtype, kernel=True).cpu(), theirs)


def cpu_layout_expected(module):
    """The values bitsandbytes' CPU inference layout holds: the original codes, each block's absmax
    (nested ones decoded first) rounded to bfloat16, as the repacking stores it."""
    state = module.weight.quant_state
    N, K = state.shape
    absmax = state.absmax
    if state.nested:
        absmax = state.state2.code[absmax.long()] * state.state2.absmax.repeat_interleave(256)[: absmax.numel()]
        absmax = absmax + state.offset
    absmax = absmax.to(torch.bfloat16).float()
    return reference.dequant_4bit(
        module.weight.data, absmax, state.code, out=torch.empty(N, K), blocksize=state.blocksize
    )


@pytest.mark.parametrize("trigger", ["repack", "eval-forward"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_cpu_inference_layout(bnb, quant_type, double_quant, trigger):
    """bitsandbytes repacks a Linear4bit for its CPU kernel at its first eval forward without
    gradients (on an AVX512-BF16 CPU): described as such and read on CPU."""
    convert = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if convert is None:
        pytest.skip("this bitsandbytes has no CPU inference layout")
    module, _ = linear4bit(bnb, 64, 128, quant_type=quant_type, double_quant=double_quant)
    expected = cpu_layout_expected(module)
    if trigger == "repack":
        module.weight.data, module.weight.quant_state = convert(module.weight.data, module.weight.quant_state)
    elif module.support_avx512bf16_for_cpu:
        with torch.no_grad():
            module.eval()(torch.randn(2, 128, dtype=torch.bfloat16))
    else:
        pytest.skip("bitsandbytes repacks at an eval forward only on a CPU with AVX512-BF16")
    info = quant.describe(module)
    assert info.layout == "bitsandbytes-cpu" and not info.double_quant and info.quant_dtype == torch.bfloat16
    assert str(info).endswith("repacked for bitsandbytes' CPU kernel")
    assert_same_values(quant.dequantize(module, torch.float32), expected, quant_type)
    with pytest.raises(ValueError, match="read on CPU only"):
        quant.dequantize(module, torch.float32, kernel=True)


# ------------------------------------------------------------------------------------- refusals
def test_unreadable_modules_say_why(bnb):
    not_moved = bnb.nn.Linear4bit(64, 16, quant_type="nf4")
    fp16_weights = bnb.nn.Linear8bitLt(64, 16, has_fp16_weights=True).to("cpu")
    int8_not_moved = bnb.nn.Linear8bitLt(64, 16, has_fp16_weights=False)
    no_scales, _ = linear8bit(bnb, 16, 64)
    no_scales.weight.SCB = None
    for module, reason in [
        (not_moved, "its weight is not quantized yet \\(bitsandbytes quantizes a Linear4bit when it is moved"),
        (fp16_weights, "it keeps a trainable float weight \\(has_fp16_weights=True\\)"),
        (int8_not_moved, "its weight is not quantized yet \\(bitsandbytes quantizes a Linear8bitLt"),
        (no_scales, "its row scales \\(SCB\\) are missing"),
    ]:
        with pytest.raises(ValueError, match=f"cannot read the quantized {type(module).__name__}: {reason}"):
            quant.describe(module)
        with pytest.raises(ValueError, match=reason):
            quant.dequantize(module, torch.float32)
        assert "cannot be read: " in base_layers.base_problem(module)
    assert quant.quantized_problem(nn.Linear(2, 2)) == "a Linear, not a bitsandbytes Linear4bit or Linear8bitLt"


def test_buffer_errors(bnb):
    module, _ = linear4bit(bnb, 16, 64)
    int8, _ = linear8bit(bnb, 16, 64)
    for kwargs, error, message in [
        (dict(out=torch.empty(64, 16)), ValueError, "out must be \\[16, 64\\]"),
        (dict(out=torch.empty(16, 64, dtype=torch.float64)), TypeError, "float16, bfloat16 or float32"),
        (dict(out=torch.empty(16, 64, device="meta")), ValueError, "out is on meta, the Linear4bit on cpu"),
        (dict(out=torch.empty(16, 64), dtype=torch.float16), TypeError, "out is torch.float32 but dtype="),
    ]:
        with pytest.raises(error, match=message):
            quant.dequantize(module, **kwargs)
    with pytest.raises(ValueError, match="Linear8bitLt has no compute dtype of its own: pass dtype= or out="):
        quant.dequantize(int8)
    if KERNEL_DEVICE == "cuda":
        with pytest.raises(RuntimeError, match="runs on CUDA tensors, or on CPU tensors in Triton's interpreter"):
            quant.dequantize(module, kernel=True)


# ------------------------------------------------------------------------------------ base layers
def test_base_layers_know_the_quantized_kinds(bnb):
    from transformers.pytorch_utils import Conv1D

    four, _ = linear4bit(bnb, 16, 64)
    eight, _ = linear8bit(bnb, 16, 64)
    conv = Conv1D(16, 64)
    kinds = [base_layers.base_kind(m) for m in (nn.Linear(4, 4), conv, four, eight, nn.Conv2d(1, 1, 1))]
    assert kinds == ["Linear", "Conv1D", "Linear4bit", "Linear8bitLt", None]
    assert base_layers.is_quantized(four) and base_layers.is_quantized(eight)
    assert not base_layers.is_quantized(nn.Linear(4, 4))
    assert base_layers.base_features(four) == (64, 16) and base_layers.base_features(eight) == (64, 16)
    # How each kind is read: float bases in place, quantized ones into the caller's buffer.
    linear = nn.Linear(64, 16)
    assert base_layers.base_weight(linear) is linear.weight
    assert base_layers.base_weight(conv).data_ptr() == conv.weight.data_ptr()
    assert base_layers.base_weight(conv).shape == (16, 64)
    buffer = torch.empty(16, 64, dtype=torch.bfloat16)
    assert base_layers.base_weight(four, out=buffer) is buffer
    assert torch.equal(buffer, quant.dequantize(four))
    assert torch.equal(base_layers.base_weight(eight, out=torch.empty(16, 64)), quant.dequantize(eight, torch.float32))
    with pytest.raises(ValueError, match="a Linear is read in place"):
        base_layers.base_weight(linear, out=buffer)
    with pytest.raises(TypeError, match="a quantized Linear4bit cannot be re-initialised"):
        base_layers.reset_base_parameters(four)


def test_readable_quantized_bases_are_composed_and_unreadable_ones_refused_with_the_reason(bnb):
    four, _ = linear4bit(bnb, 16, 64)
    assert base_layers.base_problem(four) is None
    assert FusedResLoRALinear.from_linear(four).base_layer is four
    fp16_weights = bnb.nn.Linear8bitLt(64, 16, has_fp16_weights=True).to("cpu")
    model = nn.Sequential(fp16_weights)
    with pytest.raises(ValueError, match=r"0 is a Linear8bitLt that cannot be read: it keeps a trainable float weight"):
        apply_reslora(model, ResLoRAConfig(target_modules=["0"]))
    assert model[0] is fp16_weights
    with pytest.raises(TypeError, match="a Linear8bitLt that cannot be read: it keeps a trainable float weight"):
        FusedResLoRALinear.from_linear(fp16_weights)
    # A forward of its own beyond bitsandbytes' is still lost by a block, so still refused.
    subclass = type("Custom4bit", (bnb.nn.Linear4bit,), {"forward": lambda self, x: 2 * super().forward(x)})
    custom, _ = linear4bit(bnb, 16, 64, cls=subclass)
    with pytest.raises(ValueError, match=r"0 \(Custom4bit\) has a forward of its own"):
        apply_reslora(nn.Sequential(custom), ResLoRAConfig(target_modules=["0"]))


def test_bitsandbytes_is_never_imported_without_a_quantized_module():
    script = (
        "import sys, torch.nn as nn\n"
        "from reslora_kernels import ResLoRAConfig, apply_reslora, base_layers, quant, reslora_summary\n"
        "model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))\n"
        "assert base_layers.base_kind(model[0]) == 'Linear' and quant.quantized_kind(model[0]) is None\n"
        "apply_reslora(model, ResLoRAConfig(target_modules=['0', '1'], mode='is'))\n"
        "reslora_summary(model)\n"
        "assert 'bitsandbytes' not in sys.modules, 'bitsandbytes was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
