"""Quantized base layers, read through one small interface: bitsandbytes' ``Linear4bit`` (NF4 and
FP4, with or without double quantization) and ``Linear8bitLt`` (LLM.int8).

A ResLoRA block never runs its base layer's forward; it reads the weight ``W [out, in]``. A
quantized base keeps ``W`` compressed, so it is read by dequantizing it into a buffer the caller
owns and reuses (:func:`dequantize`): on CUDA by the Triton kernels (``ops.dequant_4bit``,
``ops.dequant_int8``), on other devices by bitsandbytes' own functions. Both give bitsandbytes' own
values bit for bit (float32 products, one rounding to the buffer's dtype; FP4's zero code is +0.0,
which bitsandbytes' implementations give either sign). One exception: bitsandbytes 0.50's AVX-512
CPU library misreads 4-bit weights whose rows end mid-block (a row length that is a multiple of 32
but not of the block size; its own forward is wrong there too), so rows that end mid-block are
decoded by the formula in torch (``reference.dequant_4bit``). :func:`describe` says what is
quantized and how, from metadata only (no tensor is read, nothing is synchronised), for errors and
summaries.

The layouts (bitsandbytes 0.50):

* ``Linear4bit``: ``weight`` is a ``Params4bit`` of ``ceil(out * in / 2)`` bytes (any storage
  dtype, read as bytes), two 4-bit codes per byte, high nibble first, over the row-major weight;
  ``weight.quant_state`` holds the 16-entry code table, one absmax per ``blocksize`` elements
  (float32, or with double quantization uint8 codes of a nested 8-bit blockwise state plus an
  offset), the dtype the weight was quantized from, and the shape. A forward in eval mode without
  gradients on a CPU with AVX512-BF16 repacks the weight once for bitsandbytes' CPU kernel
  (``packing_format_for_cpu``: codes permuted in tiles of 32 rows, absmax in bfloat16, transposed);
  that layout is read too, on CPU.
* ``Linear8bitLt``: ``weight`` is an ``Int8Params`` holding the int8 ``[out, in]`` weight (``CB``)
  once the module was moved to a device (bitsandbytes quantizes on ``.to()``); the float32 row
  absmax ``SCB`` sits on the weight until the first forward moves it to ``module.state``.

bitsandbytes stays optional: nothing here imports it unless a quantized module is read (a model
that holds one has imported it already; the classes are looked up in ``sys.modules``).
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.nn as nn

from . import reference
from .dtypes import KERNEL_DTYPES

__all__: list[str] = []  # read by base_layers and the layer; nothing here is user-facing yet

#: The quantized base classes, by the ``bitsandbytes.nn`` name of the class they are (or derive from).
QUANTIZED_CLASSES = ("Linear4bit", "Linear8bitLt")


def quantized_kind(module: object) -> str | None:
    """``"Linear4bit"`` or ``"Linear8bitLt"`` when ``module`` is (a subclass of) that bitsandbytes
    class, else ``None``. Never imports bitsandbytes."""
    modules = sys.modules.get("bitsandbytes.nn.modules")
    if modules is None:
        return None
    for name in QUANTIZED_CLASSES:
        cls = getattr(modules, name, None)
        if cls is not None and isinstance(module, cls):
            return name
    return None


@dataclasses.dataclass(frozen=True)
class QuantDescription:
    """What a quantized base stores, read from metadata only.

    ``format``: ``"nf4"``, ``"fp4"`` or ``"int8"``. ``blocksize``: weight elements per absmax
    (4-bit; int8 has one per row: ``None``). ``nested_blocksize``: absmax values per nested absmax
    under double quantization, else ``None``. ``quant_dtype``: the dtype the weight was quantized
    from (4-bit; ``None`` for int8). ``compute_dtype``: ``Linear4bit.compute_dtype`` (``None``: the
    input's dtype, which is always the case for int8). ``layout``: ``"bitsandbytes"``, or
    ``"bitsandbytes-cpu"`` for the repacked CPU inference layout."""

    kind: str
    format: str
    shape: tuple[int, int]
    blocksize: int | None
    nested_blocksize: int | None
    quant_dtype: torch.dtype | None
    compute_dtype: torch.dtype | None
    storage_dtype: torch.dtype
    device: torch.device
    layout: str = "bitsandbytes"

    @property
    def double_quant(self) -> bool:
        return self.nested_blocksize is not None

    def __str__(self) -> str:
        if self.format == "int8":
            text = "int8, one absmax per row"
        else:
            text = f"{self.format.upper()}, blocks of {self.blocksize}"
            if self.double_quant:
                text += f", absmax double-quantized (8-bit, blocks of {self.nested_blocksize})"
            text += f", from {_dtype_name(self.quant_dtype)}"
        compute = _dtype_name(self.compute_dtype) if self.compute_dtype is not None else "the input's dtype"
        text += f", computes in {compute}"
        if self.layout != "bitsandbytes":
            text += ", repacked for bitsandbytes' CPU kernel"
        return text


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "")


def _quant_state(module: nn.Module):
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)


def _row_absmax(module: nn.Module) -> torch.Tensor | None:
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    return scb


def quantized_problem(module: nn.Module) -> str | None:
    """Why the quantized ``module`` cannot be read (``None``: it can). Reads metadata only."""
    kind = quantized_kind(module)
    if kind is None:
        return f"a {type(module).__name__}, not a bitsandbytes Linear4bit or Linear8bitLt"
    weight = module.weight
    shape = (module.out_features, module.in_features)
    if kind == "Linear4bit":
        state = _quant_state(module)
        if state is None or not getattr(weight, "bnb_quantized", True):
            return (
                "its weight is not quantized yet (bitsandbytes quantizes a Linear4bit when it is moved to a "
                "device: .to(device) or .cuda())"
            )
        if state.quant_type not in ("nf4", "fp4"):
            return f"its quantization type is {state.quant_type!r}, not nf4 or fp4"
        if tuple(state.shape) != shape:
            return f"its quantization state is for a {tuple(state.shape)} weight, the layer is {shape}"
        if not weight.is_contiguous():
            return "its packed weight is not contiguous"
        return None
    if weight.dtype != torch.int8:
        if getattr(weight, "has_fp16_weights", False):
            return (
                "it keeps a trainable float weight (has_fp16_weights=True) and quantizes it on every forward; "
                "load it with has_fp16_weights=False to quantize the base once"
            )
        return (
            "its weight is not quantized yet (bitsandbytes quantizes a Linear8bitLt when it is moved to a "
            "device: .to(device) or .cuda())"
        )
    if tuple(weight.shape) != shape:
        return f"its int8 weight is {tuple(weight.shape)}, the layer is {shape}"
    scb = _row_absmax(module)
    if scb is None:
        return "its row scales (SCB) are missing from both the weight and the module's state"
    if tuple(scb.shape) != (shape[0],):
        return f"its row scales (SCB) are {tuple(scb.shape)}, expected ({shape[0]},)"
    return None


def describe(module: nn.Module) -> QuantDescription:
    """What the quantized ``module`` stores (:class:`QuantDescription`); raises ``ValueError`` with
    the reason when it cannot be read."""
    problem = quantized_problem(module)
    if problem is not None:
        raise ValueError(f"cannot read the quantized {type(module).__name__}: {problem}")
    kind = quantized_kind(module)
    shape = (module.out_features, module.in_features)
    weight = module.weight
    if kind == "Linear8bitLt":
        return QuantDescription(kind, "int8", shape, None, None, None, None, torch.int8, weight.device)
    state = _quant_state(module)
    cpu_layout = getattr(state, "packing_format_for_cpu", False)
    # The CPU repacking folds the nested state into plain absmax and records the original dtype.
    nested = state.state2.blocksize if state.nested else None
    if cpu_layout and getattr(state, "original_nested", False):
        nested = None
    return QuantDescription(
        kind,
        state.quant_type,
        shape,
        state.blocksize,
        nested,
        getattr(state, "original_dtype", state.dtype) if cpu_layout else state.dtype,
        getattr(module, "compute_dtype", None),
        getattr(state, "original_storage_type", weight.dtype) if cpu_layout else weight.dtype,
        weight.device,
        "bitsandbytes-cpu" if cpu_layout else "bitsandbytes",
    )


def dequantize(
    module: nn.Module,
    dtype: torch.dtype | None = None,
    *,
    out: torch.Tensor | None = None,
    kernel: bool | None = None,
) -> torch.Tensor:
    """The weight ``W [out, in]`` of the quantized ``module``, dequantized into ``out`` (a buffer
    the caller reuses across calls; any strides) or a new tensor of ``dtype``, and returned.

    4-bit: ``W[n, k] = code[q_e] * absmax_{e // blocksize}``, ``e = n * in + k`` (the layout:
    ``ops.dequant_4bit``); int8: ``W = (CB * SCB[:, None]) * float32(1/127)``. Values are
    bitsandbytes' own, bit for bit (module docstring). bitsandbytes' CPU inference layout holds its
    absmax in bfloat16: read as ``code[q] * float(absmax_bf16)``, on CPU only.

    Args:
        dtype: the dtype of a new buffer (when ``out`` is not given): float16, bfloat16 or
            float32; default the module's compute dtype (4-bit; int8 needs it).
        out: the ``[out, in]`` buffer to write, on the module's device.
        kernel: ``None`` runs the Triton kernel on CUDA and bitsandbytes' own dequantization
            elsewhere; ``True`` forces the kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``);
            ``False`` forces bitsandbytes'.
    """
    info = describe(module)
    if out is None:
        dtype = dtype or info.compute_dtype or info.quant_dtype
        if dtype is None:
            raise ValueError(f"{info.kind} has no compute dtype of its own: pass dtype= or out=")
        out = torch.empty(info.shape, dtype=dtype, device=info.device)
    _check_buffer(out, info, dtype)
    if info.device.type == "meta":
        raise ValueError(f"cannot dequantize a {info.kind} on the meta device: it holds no values")
    use_kernel = _use_kernel(info, kernel)
    if info.kind == "Linear8bitLt":
        weight_int8, row_absmax = module.weight.data, _row_absmax(module)
        if use_kernel:
            from .ops import dequant_int8

            return dequant_int8(weight_int8, row_absmax.float(), out=out)
        import bitsandbytes.functional as bnb_functional

        return out.copy_(bnb_functional.int8_vectorwise_dequant(weight_int8, row_absmax.float()))
    state = _quant_state(module)
    packed = module.weight.data.view(torch.uint8)
    if info.layout == "bitsandbytes-cpu":
        if use_kernel:
            raise ValueError("bitsandbytes' CPU inference layout is read on CPU only: pass kernel=False")
        return _dequantize_cpu_layout(packed, state, out)
    if not use_kernel and info.shape[1] % state.blocksize == 0:
        return out.copy_(_bnb_dequantize_4bit(packed, state, out.dtype))
    if use_kernel:
        from .ops import dequant_4bit as decode
    else:
        # Rows end mid-block. bitsandbytes' CPU library (0.50, AVX-512) decodes such weights wrongly
        # when the row length is a multiple of 32, and sends odd row lengths to a torch.compile'd
        # fallback (a compilation per shape): the formula in plain torch instead, on every device.
        decode = reference.dequant_4bit
    nested = {}
    if state.nested:
        nested = dict(
            nested_absmax=state.state2.absmax, nested_code=state.state2.code, nested_offset=state.offset,
            nested_blocksize=state.state2.blocksize,
        )  # fmt: skip
    return decode(
        packed.reshape(-1), state.absmax, state.code.float(), out=out,
        blocksize=state.blocksize, **nested,
    )  # fmt: skip


def _check_buffer(out: torch.Tensor, info: QuantDescription, dtype: torch.dtype | None) -> None:
    if tuple(out.shape) != info.shape:
        raise ValueError(f"out must be {list(info.shape)} ([out, in] of the {info.kind}), got {list(out.shape)}")
    if out.dtype not in KERNEL_DTYPES:
        raise TypeError(f"out must be float16, bfloat16 or float32, got {out.dtype}")
    if dtype is not None and out.dtype != dtype:
        raise TypeError(f"out is {out.dtype} but dtype={dtype} was asked for")
    if out.device != info.device:
        raise ValueError(f"out is on {out.device}, the {info.kind} on {info.device}")


def _use_kernel(info: QuantDescription, kernel: bool | None) -> bool:
    if kernel is None:
        return info.device.type == "cuda"
    if not kernel:
        return False
    if info.device.type == "cuda":
        return True
    from .ops._target import INTERPRETED

    if info.device.type == "cpu" and INTERPRETED:
        return True
    raise RuntimeError(
        f"the dequantization kernel runs on CUDA tensors, or on CPU tensors in Triton's interpreter "
        f"(TRITON_INTERPRET=1 before importing reslora_kernels); the {info.kind} is on {info.device}"
    )


def _bnb_dequantize_4bit(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' own 4-bit dequantization straight into ``dtype`` (what its ``gemm_4bit``
    does; ``functional.dequantize_4bit`` would round to the state's dtype first)."""
    import bitsandbytes.functional as bnb_functional

    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        packed, absmax.float(), state.blocksize, state.quant_type, list(state.shape), dtype
    )


# bitsandbytes' CPU inference layout (``_convert_weight_packed_for_cpu``): the [N, K] codes are cut
# into tiles of 32 rows x 2 columns, taken column pair by column pair, and each run of 64 codes
# stores codes 32..63 in the high nibbles and 0..31 in the low nibbles of 32 bytes.
_CPU_LAYOUT_ROWS = 32


def _dequantize_cpu_layout(packed: torch.Tensor, state, out: torch.Tensor) -> torch.Tensor:
    N, K = state.shape
    runs = packed.reshape(-1, _CPU_LAYOUT_ROWS).to(torch.int64)
    codes = torch.cat([runs & 15, runs >> 4], dim=-1)  # [-1, 64]: the low nibbles hold the first 32
    codes = codes.reshape(N // _CPU_LAYOUT_ROWS, K // 2, _CPU_LAYOUT_ROWS, 2).transpose(1, 2).reshape(N, K)
    # absmax: [K / blocksize, N] bfloat16, blocks within rows (K is a multiple of the block size here).
    scale = state.absmax.float().t().repeat_interleave(state.blocksize, dim=1)
    return out.copy_(state.code.float()[codes] * scale)
