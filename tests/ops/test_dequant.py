"""The dequantization kernels (``ops.dequant_4bit``, ``ops.dequant_int8``) bit for bit: against the
reference's formula on arbitrary layouts, and against bitsandbytes' own dequantization of weights
it quantized (NF4 / FP4, double quantization on and off, float32 / float16 / bfloat16 outputs, odd
shapes). On a CPU machine the kernels run in Triton's interpreter; on a GPU the compiled kernels.

bitsandbytes is the test extra (CI installs it: there a missing bitsandbytes fails, elsewhere its
tests skip).
"""

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import KERNEL_DEVICE, bitsandbytes, float_bits

pytest.importorskip("triton")

from reslora_kernels import ops, reference  # noqa: E402
from reslora_kernels.ops import _target, dequant_4bit_kernel  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, K): even K (rows start on a byte: the vectorised path) and odd K (rows start mid-byte), tails
# in both tile dimensions, a single element, K below and above the block size.
SHAPES = [(33, 70), (5, 7), (1, 1), (40, 64), (3, 129), (17, 256), (2, 30)]


def assert_same_bits(out: torch.Tensor, ref: torch.Tensor, what: str, zero_sign: bool = True) -> None:
    """Equal bit for bit; with ``zero_sign=False``, -0.0 and 0.0 count as equal (bitsandbytes'
    own implementations disagree on the sign of FP4's zero code)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    if not zero_sign:
        out, ref = out + 0.0, ref + 0.0  # -0.0 + 0.0 == +0.0 in round-to-nearest
    differ = float_bits(out) != float_bits(ref)
    if differ.any():
        index = tuple(differ.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(differ.sum())} of {out.numel()} elements differ, e.g. at {index}: "
            f"{out[index].item()!r} vs {ref[index].item()!r}"
        )


def nan_buffer(shape, dtype, device=KERNEL_DEVICE):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def random_layout(N, K, blocksize, nested, device=KERNEL_DEVICE):
    """Packed codes, absmax and tables of an [N, K] weight: random bytes, any 16 code values."""
    n = N * K
    blocks = -(-n // blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8, device=device)
    code = torch.randn(16, device=device)
    code[3] = -0.0
    if not nested:
        return packed, torch.rand(blocks, device=device) + 0.1, code, {}
    nested_args = dict(
        nested_absmax=torch.rand(-(-blocks // 256), device=device) + 0.5,
        nested_code=torch.randn(256, device=device),
        nested_offset=torch.tensor(0.3, device=device),
    )
    return packed, torch.randint(0, 256, (blocks,), dtype=torch.uint8, device=device), code, nested_args


@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequant_4bit_is_the_formula_bit_for_bit(shape, blocksize, nested, dtype):
    N, K = shape
    packed, absmax, code, nested_args = random_layout(N, K, blocksize, nested)
    out = nan_buffer((N, K), dtype)
    got = ops.dequant_4bit(packed, absmax, code, out=out, blocksize=blocksize, **nested_args)
    assert got is out
    ref = reference.dequant_4bit(
        packed, absmax, code, out=torch.empty(N, K, dtype=dtype, device=KERNEL_DEVICE), blocksize=blocksize,
        **nested_args,
    )  # fmt: skip
    assert_same_bits(out, ref, f"{shape} blocksize {blocksize}")


@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_dequant_4bit_writes_any_output_strides(dtype):
    """A transposed and a column-strided buffer get the same values; nothing outside is written."""
    N, K = 21, 50
    packed, absmax, code, nested_args = random_layout(N, K, 64, True)
    ref = reference.dequant_4bit(
        packed, absmax, code, out=torch.empty(N, K, dtype=dtype, device=KERNEL_DEVICE), blocksize=64, **nested_args
    )
    transposed = nan_buffer((K, N), dtype).t()
    ops.dequant_4bit(packed, absmax, code, out=transposed, blocksize=64, **nested_args)
    assert_same_bits(transposed.contiguous(), ref, "transposed")
    wide = nan_buffer((N, 2 * K), dtype)
    ops.dequant_4bit(packed, absmax, code, out=wide[:, ::2], blocksize=64, **nested_args)
    assert_same_bits(wide[:, ::2].contiguous(), ref, "strided")
    assert wide[:, 1::2].isnan().all()


def test_nibble_order_and_blocks_across_rows():
    """Element 2i is byte i's high nibble; a block runs on across the end of a row (K = 3)."""
    code = torch.arange(16, dtype=torch.float32, device=KERNEL_DEVICE)
    packed = torch.tensor([0x12, 0x34, 0x5F], dtype=torch.uint8, device=KERNEL_DEVICE)  # codes 1 2 3 4 5 15
    absmax = torch.tensor([1.0, 10.0, 100.0], device=KERNEL_DEVICE)
    out = ops.dequant_4bit(packed, absmax, code, out=nan_buffer((2, 3), torch.float32), blocksize=32)
    assert out.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 15.0]]
    wide = torch.randint(0, 256, (48,), dtype=torch.uint8, device=KERNEL_DEVICE)  # 96 codes, 3 blocks of 32
    out = ops.dequant_4bit(wide, absmax, code, out=nan_buffer((2, 48), torch.float32), blocksize=32)
    codes = torch.stack([wide >> 4, wide & 15], 1).reshape(2, 48).float()
    scale = torch.tensor([1.0, 10.0, 100.0], device=KERNEL_DEVICE).repeat_interleave(32).reshape(2, 48)
    assert torch.equal(out, codes * scale)


@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("shape", [(33, 70), (5, 7), (1, 1), (64, 129)])
def test_dequant_int8_is_the_formula_bit_for_bit(shape, dtype):
    N, K = shape
    weight_int8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=KERNEL_DEVICE)
    row_absmax = torch.rand(N, device=KERNEL_DEVICE) * 3
    out = nan_buffer((N, K), dtype)
    assert ops.dequant_int8(weight_int8, row_absmax, out=out) is out
    ref = reference.dequant_int8(weight_int8, row_absmax, out=torch.empty(N, K, dtype=dtype, device=KERNEL_DEVICE))
    assert_same_bits(out, ref, f"{shape}")
    transposed = nan_buffer((K, N), dtype).t()
    ops.dequant_int8(weight_int8.t().contiguous().t(), row_absmax, out=transposed)  # both operands strided
    assert_same_bits(transposed.contiguous(), ref, f"{shape} strided")


def test_bfloat16_output_rounds_to_nearest_even():
    """float32 values that bfloat16 cannot hold round to nearest, ties to even (Triton's interpreter
    alone would truncate), overflow to infinity, keep -0.0 and subnormals."""
    tie_even, tie_odd, above = 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20
    values = [tie_even, tie_odd, above, -above, 3.4e38, -0.0, 1e-40, 0.3]
    code = torch.tensor(values + [0.0] * (16 - len(values)), device=KERNEL_DEVICE)
    packed = torch.tensor([0x01, 0x23, 0x45, 0x67], dtype=torch.uint8, device=KERNEL_DEVICE)
    absmax = torch.ones(1, device=KERNEL_DEVICE)
    out = ops.dequant_4bit(packed, absmax, code, out=nan_buffer((1, 8), torch.bfloat16), blocksize=32)
    assert_same_bits(out[0], code[:8].to(torch.bfloat16), "bfloat16 rounding")
    assert out[0, :3].tolist() == [1.0, 1.015625, 1.0078125] and out[0, 4] == float("inf")


# ------------------------------------------------------------------------------ against bitsandbytes
def bnb_state_in(state, dtype):
    """``state`` asking bitsandbytes' dequantize_4bit for ``dtype`` (it rounds to ``state.dtype``)."""
    state = copy.copy(state)
    state.dtype = dtype
    return state


def kernel_args(state):
    nested = {}
    if state.nested:
        nested = dict(
            nested_absmax=state.state2.absmax, nested_code=state.state2.code, nested_offset=state.offset,
            nested_blocksize=state.state2.blocksize,
        )  # fmt: skip
    return state.absmax, state.code, nested


# (N, K, blocksize): rows that hold whole blocks, odd K (bitsandbytes' CPU library hands those to
# its generic implementation). Not rows of a multiple of 32 that end mid-block: bitsandbytes 0.50's
# AVX-512 CPU library decodes them wrongly (tests/model/test_quant_bases.py).
BNB_SHAPES = [(33, 128, 64), (7, 64, 64), (3, 256, 128), (5, 96, 32), (8, 2048, 1024), (5, 7, 64), (9, 129, 32)]


@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", BNB_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dequant_4bit_is_bitsandbytes_bit_for_bit(shape, quant_type, nested, dtype):
    functional = bitsandbytes().functional
    N, K, blocksize = shape
    weight = torch.randn(N, K, device=KERNEL_DEVICE, dtype=torch.bfloat16)
    packed, state = functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type
    )
    theirs = functional.dequantize_4bit(packed, bnb_state_in(state, dtype))
    absmax, code, nested_args = kernel_args(state)
    ours = ops.dequant_4bit(packed, absmax, code, out=nan_buffer((N, K), dtype), blocksize=blocksize, **nested_args)
    # FP4's code 8 (sign bit, magnitude 0) is -0.0 in some of bitsandbytes' own implementations (its
    # CPU library's scalar path) and +0.0 in others (its vector path, its generic one, its table).
    assert_same_bits(ours, theirs, f"{quant_type} {shape}", zero_sign=quant_type == "nf4")


@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("shape", [(33, 70), (5, 7), (64, 129)])
def test_dequant_int8_is_bitsandbytes_bit_for_bit(shape, dtype):
    functional = bitsandbytes().functional
    weight = torch.randn(*shape, device=KERNEL_DEVICE) * 0.05
    weight_int8, row_absmax, _ = functional.int8_vectorwise_quant(weight.half())
    theirs = functional.int8_vectorwise_dequant(weight_int8, row_absmax).to(dtype)
    ours = ops.dequant_int8(weight_int8, row_absmax, out=nan_buffer(shape, dtype))
    assert_same_bits(ours, theirs, f"int8 {shape}")


# ------------------------------------------------------------------------------------ launcher
def test_launcher_errors_name_the_problem():
    packed, absmax, code, nested_args = random_layout(4, 8, 32, True)
    out = nan_buffer((4, 8), torch.float32)
    cases = [
        (dict(blocksize=48), ValueError, "blocksize must be one of"),
        (dict(packed=packed[:10]), ValueError, "packed holds 10 bytes; \\[4, 8\\] needs 16"),
        (dict(packed=packed.float()), ValueError, "packed must be contiguous uint8"),
        (dict(absmax=absmax.float()), ValueError, "absmax must be uint8 \\(double quantization\\)"),
        (dict(nested_code=None), ValueError, "double quantization needs"),
        (dict(nested_blocksize=100), ValueError, "nested_blocksize must be a power of two"),
        (dict(code=code[:8]), ValueError, "code must be a float32 vector of at least 16"),
        (dict(out=nan_buffer((4, 8), torch.float64)), TypeError, "float16, bfloat16 or float32"),
        (dict(out=nan_buffer((2, 4, 4), torch.float32)), ValueError, "out must be 2-D"),
        (dict(out=torch.empty(4, 8, device="meta")), ValueError, "packed must be contiguous uint8 on meta"),
    ]
    for change, error, message in cases:
        args = dict(packed=packed, absmax=absmax, code=code, out=out, blocksize=32, **nested_args)
        args.update(change)
        with pytest.raises(error, match=message):
            ops.dequant_4bit(args.pop("packed"), args.pop("absmax"), args.pop("code"), **args)
    with pytest.raises(ValueError, match="absmax must be float32"):
        ops.dequant_4bit(packed, torch.zeros(1, dtype=torch.uint8, device=KERNEL_DEVICE), code, out=out, blocksize=32)
    assert out.isnan().all()  # every refusal came before anything was written
    q = torch.zeros(4, 8, dtype=torch.int8, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="weight_int8 must be int8 \\[4, 8\\]"):
        ops.dequant_int8(q.float(), torch.ones(4, device=KERNEL_DEVICE), out=out)
    with pytest.raises(ValueError, match="row_absmax must be float32 \\[4\\]"):
        ops.dequant_int8(q, torch.ones(8, device=KERNEL_DEVICE), out=out)


def test_empty_weight_launches_nothing():
    with _target.capture() as launches:
        ops.dequant_4bit(
            torch.empty(0, dtype=torch.uint8), torch.empty(0), torch.zeros(16), out=torch.empty(0, 8), blocksize=64
        )
        ops.dequant_int8(torch.empty(0, 8, dtype=torch.int8), torch.empty(0), out=torch.empty(0, 8))
    assert launches == []


def test_autotune_keys_hold_every_flag_that_changes_the_build():
    assert {"BLOCKSIZE", "NESTED", "NESTED_BLOCKSIZE", "EVEN_K"} <= set(dequant_4bit_kernel._dequant_4bit_kernel.keys)


# The build for a GPU runs without the interpreter, in a subprocess (this process imported the
# kernels for the interpreter).
FMA_CHECK = textwrap.dedent(
    """
    import torch, triton
    from reslora_kernels.ops import _target
    from tools import compile_matrix as cm

    scenario = next(s for s in cm._scenarios() if s.op == "dequant_4bit" and s.flags == "nested=1 even_k=1")
    for target in cm.TARGETS.values():
        triton.runtime.driver.set_active(cm._SimulatedDriver(target))
        with _target.simulate(target), _target.capture() as launches:
            scenario.run(cm.SHAPES["aligned"], torch.bfloat16)
        (made,) = launches
        for fusion in (made.kwargs["enable_fp_fusion"], True):
            args = {**made.kwargs, **made.kernel.configs[0].all_kwargs(), "enable_fp_fusion": fusion}
            ptx = made.kernel.fn.warmup(grid=(1,), **args).asm["ptx"]
            print(target.name, fusion, ptx.count("fma."))
    """
)


def test_nested_scale_is_not_fused_into_an_fma_on_the_gpu():
    """bitsandbytes rounds the nested scale's product and its sum apart; the launch disables fp
    fusion, so the sm_90a and sm_80 builds hold no FMA (with fusion, they would)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", FMA_CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    counts = [line.rsplit(" ", 2) for line in done.stdout.splitlines()]
    assert len(counts) == 4
    for name, fusion, fmas in counts:
        assert (int(fmas) > 0) == (fusion == "True"), (name, fusion, fmas)
