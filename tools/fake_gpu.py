"""A GPU that is not there: Triton's NVIDIA driver with only its lowest level faked.

Everything a launch does on a GPU runs unchanged here except the work of ``libcuda`` itself: the
autotuner (``Autotuner.run``: pruning with the launch's keywords, benchmarking), the compiler for the
real target (``triton.compile``, the bundled ``ptxas``), the loading of each binary
(``CompiledKernel._init_handles``: the launcher object, Triton's shared-memory and thread checks),
and the launcher's argument binding: on Triton 3.9 the real ``CudaLauncher`` (its
``make_tensordesc_args`` turns host ``TensorDescriptor`` objects into tensor maps and their shapes and
strides); on Triton 3.6 the real ``CudaLauncher`` over the C source its ``make_launcher`` generates,
whose argument parsing is replayed from that source. Faked, because they need ``libcuda``:

* ``load_binary``: the registers and stack frame (spills) of the cubin, read with the ``cuobjdump``
  that ships with Triton, as ``cuFuncGetAttribute`` would report them;
* ``fill_tma_descriptor(_tiled)``: the checks of ``cuTensorMapEncodeTiled``, then a :class:`TensorMap`;
* the launch: the argument extraction of Triton's C launcher, then the checks of ``cuLaunchKernelEx``
  (grid, threads, shared memory, global scratch), then a :class:`KernelLaunch` record;
* the benchmarker: runs the call once (so every launch is checked) and returns a made-up time.

Tensors are CPU tensors: their addresses are real, so alignment is real. Nothing computes; outputs
are whatever the allocator left there.

:class:`SimulatedDriver` builds and loads but never launches (the compile matrix uses it);
:class:`FakeGPU` launches too (:func:`fake_gpu`). :func:`cpu_tensors_as_cuda` makes the backend switch
treat CPU tensors as CUDA tensors, so the public layer API reaches the fused kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
import zlib
from typing import Callable, Iterator

import torch
import triton
import triton.backends.nvidia.driver as nvidia
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase

from reslora_kernels.ops import _target
from reslora_kernels.ops._target import Target

from .resources import resource_usage

__all__ = [
    "LaunchRejected",
    "TensorMap",
    "KernelLaunch",
    "LoadedKernel",
    "Compile",
    "Benchmark",
    "made_up_time",
    "SimulatedDriver",
    "FakeGPU",
    "fake_gpu",
    "cpu_tensors_as_cuda",
]

INT_MAX = 2**31 - 1
#: cuLaunchKernelEx's grid limits (compute capability 3.0 and later).
GRID_LIMITS = (INT_MAX, 65535, 65535)
MAX_THREADS = 1024
REGISTERS_PER_SM = 65536
#: A kernel launched with more dynamic shared memory than this must have been given the opt-in
#: attribute when it was loaded.
DEFAULT_SHARED = 49152
#: cuTensorMapEncodeTiled's span of each swizzle mode (CU_TENSOR_MAP_SWIZZLE_NONE, 32B, 64B, 128B).
SWIZZLE_BYTES = {0: None, 1: 32, 2: 64, 3: 128}
# What get_device_properties reports beyond the Target (clocks in kHz, bus width in bits).
_CLOCKS = {90: (1980000, 2619000, 5120), 80: (1410000, 1215000, 5120)}


class LaunchRejected(RuntimeError):
    """What the CUDA driver would refuse: an error return of ``cuTensorMapEncodeTiled`` or
    ``cuLaunchKernelEx``. The message names the rule."""


def _max_threads(registers: int) -> int:
    """``CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK``: registers are allocated per warp in units of
    256, so a register-hungry kernel can launch fewer than 1024 threads."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    return min(MAX_THREADS, REGISTERS_PER_SM // per_warp * 32)


@dataclasses.dataclass
class LoadedKernel:
    """A binary the fake driver loaded: what ``cuFuncGetAttribute`` reports, and the dynamic
    shared memory its launches were enabled for."""

    name: str
    shared: int
    registers: int
    spills: int  # 4-byte words, as Triton's load_binary reports them
    max_threads: int


class SimulatedUtils:
    """The driver's ``utils`` for a simulated GPU: device properties and binary loading."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.loaded: dict[int, LoadedKernel] = {}
        self._handles = itertools.count(0x1000)

    def get_device_properties(self, device) -> dict:
        sm_clock, mem_clock, bus = _CLOCKS.get(self.target.capability // 10 * 10, _CLOCKS[80])
        return {
            "max_shared_mem": self.target.max_shared,
            "max_num_regs": REGISTERS_PER_SM,
            "multiprocessor_count": self.target.sm_count,
            "warpSize": 32,
            "sm_clock_rate": sm_clock,
            "mem_clock_rate": mem_clock,
            "mem_bus_width": bus,
        }

    def load_binary(self, name: str, kernel: bytes, shared: int, device) -> tuple[int, int, int, int, int]:
        """``(module, function, registers, spills, max threads)`` as Triton's C ``load_binary``
        returns them (spills: local bytes / 4)."""
        registers, stack = resource_usage(kernel, name)
        module, function = next(self._handles), next(self._handles)
        self.loaded[function] = LoadedKernel(name, shared, registers, stack // 4, _max_threads(registers))
        return module, function, registers, stack // 4, _max_threads(registers)

    def unload_module(self, module) -> None:
        pass


class _NeverLaunched:
    """The launcher of a :class:`SimulatedDriver`: built when a binary is loaded, never called."""

    def __init__(self, src, metadata) -> None:
        pass

    def __call__(self, *args, **kwargs):
        raise RuntimeError("a simulated GPU builds and loads kernels but never launches them (use fake_gpu)")


class SimulatedDriver(DriverBase):
    """The active Triton driver while building for a GPU that is not there: it names the target,
    reports its properties and loads binaries (registers and spills, for the pruning), and never
    launches. ``device`` is the id Triton keys its in-memory compile cache with (default: one per
    architecture)."""

    def __init__(self, target: Target, device: int | None = None) -> None:
        self.target = target
        self.device = target.capability if device is None else device
        self.utils = SimulatedUtils(target)
        self.launcher_cls = _NeverLaunched

    @classmethod
    def is_active(cls) -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        return nvidia.ty_to_cpp(ty)

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.target.capability, 32)

    def get_device_capability(self, device=None) -> tuple[int, int]:
        return divmod(self.target.capability, 10)

    def get_current_device(self) -> int:
        return self.device

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0  # the default stream

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")

    def get_benchmarker(self):
        raise RuntimeError("a simulated GPU never runs a kernel")


# ------------------------------------------------------------------------------ what is recorded
@dataclasses.dataclass(frozen=True)
class TensorMap:
    """What ``cuTensorMapEncodeTiled`` encoded (it stands for Triton's ``PyCUtensorMap``). Lists are
    innermost dimension last, as Triton passes them; ``strides`` in bytes, outer dimensions only."""

    address: int
    elem_size: int
    elem_type: int
    swizzle: int
    box: tuple
    shape: tuple
    strides: tuple
    padding: int


@dataclasses.dataclass
class KernelLaunch:
    """One launch the fake driver accepted: kernel name, grid (as Triton passes it, before the
    cluster multiplies x), block, dynamic shared memory and the extracted parameters (pointers as
    addresses, tensor maps as :class:`TensorMap`, scalars as numbers)."""

    kernel: str
    grid: tuple[int, int, int]
    num_warps: int
    num_ctas: int
    shared: int
    params: list
    global_scratch: int = 0

    @property
    def tensor_maps(self) -> list[TensorMap]:
        return [p for p in self.params if isinstance(p, TensorMap)]


@dataclasses.dataclass
class Compile:
    """One build Triton made (a miss of its in-memory cache; a disk-cache hit counts too)."""

    kernel: str
    num_warps: int
    num_stages: int
    constants: dict
    warmup: bool


@dataclasses.dataclass
class Benchmark:
    """One call of the benchmarker: the launches it made and the time it returned."""

    launches: list[KernelLaunch]
    ms: float


def made_up_time(launches: list[KernelLaunch]) -> float:
    """A deterministic time in [1, 2) ms from what was launched: different configs win for
    different kernels, so the autotuner's choice is not always the first config."""
    if not launches:
        return 1.0
    text = repr([(la.kernel, la.num_warps, la.shared, la.grid) for la in launches])
    return 1.0 + zlib.crc32(text.encode()) % 1000 / 1000


def _benchmark_on_active_driver(kernel_call, quantiles=None, **kwargs):
    # Triton's autotuner keeps the benchmarker it got first; forwarding to whatever driver is
    # active keeps one autotuner usable across fake GPUs.
    return triton.runtime.driver.active.benchmark(kernel_call, quantiles=quantiles, **kwargs)


# -------------------------------------------------------------------------- argument extraction
def _c_int(value, bits: int, signed: bool, what: str) -> int:
    """An integer argument as the C launcher converts it; out of range is refused (the C code would
    wrap it silently, which is never what a launch means)."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = value.__index__()
        except AttributeError:
            raise TypeError(f"{what} must be an integer, got {type(value).__name__}") from None
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if not low <= int(value) <= high:
        raise OverflowError(f"{what} = {value} does not fit in {'' if signed else 'u'}int{bits}")
    return int(value)


def _pointer(value, what: str) -> int:
    """Triton's getPointer / extractPointer: None is a null pointer, an int is an address, anything
    else must have ``data_ptr()``. A CPU tensor stands for device memory here; a meta tensor has
    no memory."""
    if value is None:
        return 0
    if isinstance(value, int):
        return _c_int(value, 64, False, what)
    if not hasattr(value, "data_ptr"):
        raise TypeError("Pointer argument must be either uint64 or have data_ptr method")
    if getattr(getattr(value, "device", None), "type", None) == "meta":
        raise ValueError(f"{what} cannot be accessed from Triton (a meta tensor has no memory)")
    address = value.data_ptr()
    if not isinstance(address, int):
        raise TypeError("data_ptr method of Pointer object must return 64-bit int")
    return address


def _float(value, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a float, got {type(value).__name__}") from None


def _tensor_map(value, what: str) -> TensorMap:
    if not isinstance(value, TensorMap):
        raise TypeError(f"{what}: object must be of type PyCUtensorMap, got {type(value).__name__}")
    return value


# Triton 3.9's cuda_utils: extractor index of each signature type (build_signature_metadata).
_EXTRACTOR_NAMES = {
    2: ("i8",),
    3: ("i16",),
    4: ("i1", "i32"),
    5: ("i64",),
    6: ("u8",),
    7: ("u16",),
    8: ("u1", "u32"),
    9: ("u64",),
    10: ("fp16",),
    11: ("bf16",),
    12: ("fp32", "f32"),
    13: ("fp64",),
    14: ("nvTmaDesc",),
}
_INT_EXTRACTORS = {2: (8, True), 3: (16, True), 4: (32, True), 5: (64, True), 6: (8, False), 7: (16, False)}
_INT_EXTRACTORS.update({8: (32, False), 9: (64, False)})


def _extract(index: int, value, what: str):
    if index == 1:
        return _pointer(value, what)
    if index in _INT_EXTRACTORS:
        return _c_int(value, *_INT_EXTRACTORS[index], what)
    if index in (10, 11, 12, 13):
        return _float(value, what)
    if index == 14:
        return _tensor_map(value, what)
    raise RuntimeError(f"{what}: no extractor {index}")


class KernelArg:
    """Stands for Triton 3.9's ``PyKernelArg`` (a C type of ``cuda_utils``): one annotated argument."""

    def __init__(self, nested_tuple=None, type=None) -> None:
        self.nested_tuple = nested_tuple
        self.type = type


ARG_CONSTEXPR, ARG_KERNEL, ARG_TUPLE = 0, 1, 2


def _flatten(kernel_args, annotations, out: list) -> None:
    """Triton 3.9's extractArgs: flatten tuples and drop constexprs, by the launcher's annotations."""
    kernel_args = list(kernel_args)
    if len(kernel_args) < len(annotations):
        raise TypeError(f"the launcher got {len(kernel_args)} arguments for {len(annotations)} parameters")
    for value, annotation in zip(kernel_args, annotations):
        if annotation.type == ARG_KERNEL:
            out.append(value)
        elif annotation.type == ARG_TUPLE:
            _flatten(value, annotation.nested_tuple, out)


# Triton 3.6: the generated launcher's PyArg_ParseTuple codes.
_FORMAT_INTS = {"b": (8, False), "h": (16, True), "i": (32, True), "l": (64, True), "L": (64, True)}
_FORMAT_INTS.update({"B": (8, False), "H": (16, False), "I": (32, False), "k": (64, False), "K": (64, False)})
_BASE_FORMAT = "iiiKKppOOOOOO"


def _format_units(fmt: str) -> list:
    """PyArg_ParseTuple's format as nested lists (a parenthesised group is one tuple argument)."""
    stack: list[list] = [[]]
    for code in fmt:
        if code == "(":
            stack.append([])
        elif code == ")":
            group = stack.pop()
            stack[-1].append(group)
        else:
            stack[-1].append(code)
    return stack[0]


def _parse_args(units: list, values, out: list, what: str = "argument") -> None:
    values = tuple(values)
    if len(values) != len(units):
        raise TypeError(f"function takes exactly {len(units)} arguments ({len(values)} given)")
    for n, (unit, value) in enumerate(zip(units, values)):
        name = f"{what} {n}"
        if isinstance(unit, list):
            _parse_args(unit, value, out, name)
        elif unit in _FORMAT_INTS:
            out.append(_c_int(value, *_FORMAT_INTS[unit], name))
        elif unit == "d":
            out.append(_float(value, name))
        elif unit == "p":
            out.append(bool(value))
        elif unit == "O":
            out.append(value)
        else:
            raise RuntimeError(f"format code {unit!r} is not replayed")


class _GeneratedLauncher:
    """Triton 3.6's ``__triton_launcher`` module for one signature, replayed from the C source
    ``make_launcher`` generated: the same PyArg_ParseTuple format, the same pointer and tensor-map
    arguments, then the fake driver's launch."""

    def __init__(self, src: str, gpu: FakeGPU) -> None:
        match = re.search(r'PyArg_ParseTuple\(args, "([^"]*)"', src)
        if match is None or not match.group(1).startswith(_BASE_FORMAT):
            raise RuntimeError("the generated launcher has no argument format the fake driver knows")
        self.units = _format_units(match.group(1)[len(_BASE_FORMAT) :])
        self.pointers = {int(i) for i in re.findall(r"getPointer\(_arg(\d+),", src)}
        self.tensor_maps = {int(i) for i in re.findall(r"getTmaDesc\(_arg(\d+)\)", src)}
        # What reaches the kernel: the arg{i} parameters of _launch (constexprs are parsed, then dropped).
        declaration = src.split("static void _launch(", 1)[1].split(")", 1)[0]
        self.params = [int(i) for i in re.findall(r"\barg(\d+)\b", declaration)]
        self.gpu = gpu

    def launch(self, *args):
        base, rest = args[: len(_BASE_FORMAT)], args[len(_BASE_FORMAT) :]
        if len(base) == len(_BASE_FORMAT):  # the grid, named as Triton 3.9's launcher names it
            base = tuple(_c_int(g, 32, True, "grid") for g in base[:3]) + tuple(base[3:])
        parsed: list = []
        _parse_args(_format_units(_BASE_FORMAT), base, parsed, "launch argument")
        kernel_values: list = []
        _parse_args(self.units, rest, kernel_values, "kernel argument")
        grid_x, grid_y, grid_z, _stream, function, _coop, _pdl = parsed[:7]
        global_scratch, profile_scratch, kernel_metadata, launch_metadata, enter_hook, exit_hook = parsed[7:]
        num_warps, num_ctas, shared = _metadata(kernel_metadata)
        if enter_hook is not None:
            enter_hook(launch_metadata)
        global_ptr = _pointer(global_scratch, "global scratch")
        profile_ptr = _pointer(profile_scratch, "profile scratch")
        params = []
        for i in self.params:
            value = kernel_values[i]
            if i in self.pointers:
                params.append(_pointer(value, f"pointer argument {i}"))
            elif i in self.tensor_maps:
                params.append(_tensor_map(value, f"argument {i}"))
            else:
                params.append(value)
        self.gpu.launch_kernel(
            (grid_x, grid_y, grid_z), num_warps, num_ctas, shared, function, params, global_ptr, profile_ptr
        )
        if exit_hook is not None:
            exit_hook(launch_metadata)


def _metadata(kernel_metadata) -> tuple[int, int, int]:
    values: list = []
    try:
        _parse_args(["i", "i", "i"], kernel_metadata, values, "kernel_metadata")
    except TypeError as err:
        raise TypeError(f"kernel_metadata must be a tuple (num_warps, num_ctas, shared): {err}") from None
    return values[0], values[1], values[2]


class FakeUtils(SimulatedUtils):
    """``cuda_utils`` of a fake GPU: loading, tensor maps and (Triton 3.9) the launch entry point."""

    def __init__(self, gpu: FakeGPU) -> None:
        super().__init__(gpu.target)
        self.gpu = gpu

    def load_binary(self, name, kernel, shared, device):
        module, function, registers, spills, max_threads = super().load_binary(name, kernel, shared, device)
        if self.gpu.spills is not None:  # a test decides what the driver reports
            spills = self.loaded[function].spills = int(self.gpu.spills(self.loaded[function]))
        return module, function, registers, spills, max_threads

    def fill_tma_descriptor_tiled(self, address, swizzle, elem_size, elem_type, box, shape, strides, padding):
        return self.gpu.encode_tiled(address, swizzle, elem_size, elem_type, box, shape, strides, padding)

    fill_tma_descriptor = fill_tma_descriptor_tiled  # Triton 3.6's name

    def build_signature_metadata(self, signature) -> bytes:
        out = bytearray()
        for ty in signature:
            if not isinstance(ty, str) or len(ty) < 2:
                raise RuntimeError(f"Unexpected data type: {ty!r}")
            if ty[0] == "*":
                out.append(1)
                continue
            index = next((i for i, names in _EXTRACTOR_NAMES.items() if ty in names), None)
            if index is None:
                raise RuntimeError(f"Unknown data type: {ty!r}")
            out.append(index)
        return bytes(out)

    def launch(
        self,
        grid_x,
        grid_y,
        grid_z,
        stream,
        function,
        cooperative,
        pdl,
        kernel_metadata,
        launch_metadata,
        enter_hook,
        exit_hook,
        global_scratch,
        profile_scratch,
        annotations,
        signature,
        kernel_args,
    ):
        """Triton 3.9's launchKernel: parse, run the enter hook, flatten the arguments by their
        annotations, extract each by the signature, then launch."""
        grid = tuple(_c_int(g, 32, True, "grid") for g in (grid_x, grid_y, grid_z))
        _c_int(stream, 64, False, "stream")
        num_warps, num_ctas, shared = _metadata(kernel_metadata)
        if enter_hook is not None:
            enter_hook(launch_metadata)
        flat: list = []
        _flatten(kernel_args, annotations, flat)
        signature = bytes(signature)
        if len(flat) != len(signature):
            raise TypeError(f"{len(flat)} kernel arguments for a signature of {len(signature)}")
        params = [_extract(index, value, f"argument {n}") for n, (index, value) in enumerate(zip(signature, flat))]
        self.gpu.launch_kernel(
            grid, num_warps, num_ctas, shared, function, params,
            _pointer(global_scratch, "global scratch"), _pointer(profile_scratch, "profile scratch"),
        )  # fmt: skip
        if exit_hook is not None:
            exit_hook(launch_metadata)


class _RecordingLauncher(nvidia.CudaLauncher):
    """Triton's own ``CudaLauncher``, unchanged; it tells the fake driver how much global scratch
    each program of the kernel needs, which the driver checks the launch against."""

    def __init__(self, src, metadata) -> None:
        super().__init__(src, metadata)
        self.scratch = (metadata.global_scratch_size, metadata.profile_scratch_size, getattr(metadata, "num_ctas", 1))

    def __call__(self, grid_x, grid_y, grid_z, stream, function, *args):
        triton.runtime.driver.active.scratch_needs[function] = self.scratch
        return super().__call__(grid_x, grid_y, grid_z, stream, function, *args)


_DEVICE_IDS = itertools.count(1000)


class FakeGPU(SimulatedDriver):
    """The active Triton driver of :func:`fake_gpu`: Triton's launcher over a fake ``libcuda``.

    Records ``launches`` (accepted; those made while benchmarking go to ``benchmarks``),
    ``empty_launches`` (grids with no program, which Triton's launchers skip), ``compiles`` (Triton's
    in-memory cache misses) and ``tensor_maps``. Each instance is a new device id, so Triton's
    in-memory compile cache starts
    empty as in a fresh process (the disk cache still serves builds). ``timing(launches) -> ms``
    makes up the benchmarker's times (default :func:`made_up_time`); ``spills(loaded) -> words``,
    when given, replaces the spills the driver reports for a loaded binary."""

    def __init__(
        self,
        target: Target,
        timing: Callable[[list[KernelLaunch]], float] | None = None,
        spills: Callable[[LoadedKernel], int] | None = None,
    ) -> None:
        super().__init__(target, device=next(_DEVICE_IDS))
        self.utils = FakeUtils(self)
        self.launcher_cls = _RecordingLauncher
        self.timing = timing or made_up_time
        self.spills = spills
        self.launches: list[KernelLaunch] = []
        self.empty_launches: list[tuple] = []
        self.tensor_maps: list[TensorMap] = []
        self.compiles: list[Compile] = []
        self.benchmarks: list[Benchmark] = []
        self.scratch_needs: dict[int, tuple[int, int, int]] = {}
        self._sink: list | None = None  # where launches go while the benchmarker runs
        self._built: dict[int, object] = {}  # id -> JITFunction that compiled on this device

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self):
        return _benchmark_on_active_driver

    def benchmark(self, kernel_call, quantiles=None, **kwargs):
        """Triton's ``do_bench`` contract: run the call (once), return a time per quantile."""
        ran: list[KernelLaunch] = []
        outer, self._sink = self._sink, ran
        try:
            kernel_call()
        finally:
            self._sink = outer
        ms = float(self.timing(ran))
        self.benchmarks.append(Benchmark(ran, ms))
        return [ms] * len(quantiles) if quantiles else ms

    # ------------------------------------------------------------------ cuTensorMapEncodeTiled
    def encode_tiled(self, address, swizzle, elem_size, elem_type, box, shape, strides, padding) -> TensorMap:
        """The checks ``cuTensorMapEncodeTiled`` makes of a tiled, non-interleaved tensor map
        (CUDA driver API, "Tensor Map Object Managment"), with Triton's argument order."""
        box, shape, strides = list(box), list(shape), list(strides)
        rank = len(box)
        where = f"tensor map at 0x{int(address):x}, shape {shape}, strides {strides}, box {box}"
        if len(shape) != rank or len(strides) != rank:
            raise RuntimeError("Rank mismatch")
        if not 1 <= rank <= 5:
            raise LaunchRejected(f"{where}: rank {rank} is not 1..5")
        address = _c_int(address, 64, False, "global address")
        if elem_size not in (1, 2, 4, 8):
            raise LaunchRejected(f"{where}: element size {elem_size} B")
        if address % 16:
            raise LaunchRejected(f"{where}: the global address is not 16-byte aligned")
        for dim in shape:
            if not 1 <= dim <= 2**32:
                raise LaunchRejected(f"{where}: a global dimension of {dim} is not 1..2^32")
        byte_strides = [int(s) * elem_size for s in strides[:-1]]
        for stride in byte_strides:
            if stride % 16 or not 0 < stride < 2**40:
                raise LaunchRejected(
                    f"{where}: a global stride of {stride} B is not a positive multiple of 16 below 2^40"
                )
        for size in box:
            if not 1 <= size <= 256:
                raise LaunchRejected(f"{where}: a box dimension of {size} is not 1..256")
        inner_bytes = box[-1] * elem_size
        if inner_bytes % 16:
            raise LaunchRejected(f"{where}: the inner box dimension is {inner_bytes} B, not a multiple of 16")
        if swizzle not in SWIZZLE_BYTES:
            raise LaunchRejected(f"{where}: swizzle mode {swizzle}")
        span = SWIZZLE_BYTES[swizzle]
        if span is not None and inner_bytes > span:
            raise LaunchRejected(f"{where}: the inner box dimension ({inner_bytes} B) exceeds the {span} B swizzle")
        tensor_map = TensorMap(
            address, elem_size, elem_type, swizzle, tuple(box), tuple(shape), tuple(byte_strides), int(padding)
        )
        self.tensor_maps.append(tensor_map)
        return tensor_map

    # ------------------------------------------------------------------------ cuLaunchKernelEx
    def launch_kernel(self, grid, num_warps, num_ctas, shared, function, params, global_scratch=0, profile_scratch=0):
        """What Triton's C launcher does once the arguments are extracted: nothing for an empty
        grid, else ``cuLaunchKernelEx``, whose refusals are raised as :class:`LaunchRejected`."""
        loaded = self.utils.loaded.get(function)
        name = loaded.name if loaded is not None else f"function 0x{function:x}"
        if any(g < 0 for g in grid):
            raise LaunchRejected(f"{name}: grid {grid} has a negative dimension")
        if grid[0] * grid[1] * grid[2] == 0:
            self.empty_launches.append((name, tuple(grid)))
            return
        if loaded is None:
            raise LaunchRejected(f"{name}: not a loaded function (CUDA_ERROR_INVALID_HANDLE)")
        dims = (grid[0] * num_ctas, grid[1], grid[2])
        for axis, size, limit in zip("xyz", dims, GRID_LIMITS):
            if size > limit:
                raise LaunchRejected(f"{name}: grid {axis} = {size} exceeds {limit}")
        threads = 32 * num_warps
        if threads > min(MAX_THREADS, loaded.max_threads):
            raise LaunchRejected(f"{name}: {threads} threads per block, the kernel allows {loaded.max_threads}")
        if shared > self.target.max_shared:
            raise LaunchRejected(
                f"{name}: {shared} B of shared memory exceed the {self.target.max_shared} B a block may use on "
                f"{self.target.name}"
            )
        if shared > DEFAULT_SHARED and shared > loaded.shared:
            raise LaunchRejected(f"{name}: {shared} B of shared memory, but it was loaded for {loaded.shared} B")
        scratch, profile, _ = self.scratch_needs.get(function, (0, 0, 1))
        if scratch and not global_scratch:
            raise LaunchRejected(
                f"{name}: needs {scratch} B of global scratch per program and got a null pointer "
                "(no allocator: triton.set_allocator)"
            )
        if profile and not profile_scratch:
            raise LaunchRejected(f"{name}: needs {profile} B of profile scratch per program and got a null pointer")
        launch = KernelLaunch(name, tuple(grid), num_warps, num_ctas, shared, list(params), global_scratch)
        (self.launches if self._sink is None else self._sink).append(launch)

    # ---------------------------------------------------------------- Triton 3.6's C toolchain
    def compile_launcher_module(self, src, name, library_dirs=None, include_dirs=None, libraries=None, ccflags=None):
        """Stands for ``compile_module_from_src`` while the fake is active (Triton 3.6 compiles a C
        launcher per signature against libcuda)."""
        if name != "__triton_launcher":
            raise RuntimeError(f"the fake GPU compiles no {name} module")
        return _GeneratedLauncher(src, self)

    # ------------------------------------------------------------------------------ compiles
    def _record_compile(self, *, fn, compile, is_manual_warmup, **kwargs):
        names = fn.jit_function.arg_names
        constants = {}
        for path, value in compile.get("constants", {}).items():
            index = path[0] if isinstance(path, tuple) else path
            if isinstance(index, int) and index < len(names):
                constants[names[index]] = getattr(value, "value", value)
        self.compiles.append(
            Compile(fn.name, compile["num_warps"], compile["num_stages"], constants, bool(is_manual_warmup))
        )
        self._built[id(fn.jit_function)] = fn.jit_function

    def _drop_builds(self) -> None:
        """Forget this device's builds (their modules unload while this driver is still active)."""
        for jit_fn in self._built.values():
            jit_fn.device_caches.pop(self.device, None)
        self._built.clear()


@contextlib.contextmanager
def _patched(obj, **values) -> Iterator[None]:
    missing = object()
    saved = {name: getattr(obj, name, missing) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


def _libcuda_stand_ins(gpu: FakeGPU) -> dict:
    """The globals of Triton's NVIDIA driver module that come from (or need) libcuda."""
    if hasattr(nvidia, "annotate_arguments"):  # Triton 3.9: cuda_utils' types feed the launcher
        return {
            "PyCUtensorMap": TensorMap,
            "PyKernelArg": KernelArg,
            "ARG_CONSTEXPR": ARG_CONSTEXPR,
            "ARG_KERNEL": ARG_KERNEL,
            "ARG_TUPLE": ARG_TUPLE,
        }
    if hasattr(nvidia, "make_launcher"):  # Triton 3.6: a C launcher compiled per signature
        return {
            "PyCUtensorMap": TensorMap,
            "compile_module_from_src": gpu.compile_launcher_module,
            "library_dirs": lambda: [nvidia.libdevice_dir],
        }
    raise RuntimeError(f"the fake GPU does not know how Triton {triton.__version__} launches kernels")


@contextlib.contextmanager
def fake_gpu(
    target: Target,
    timing: Callable[[list[KernelLaunch]], float] | None = None,
    spills: Callable[[LoadedKernel], int] | None = None,
) -> Iterator[FakeGPU]:
    """Make a fake ``target`` GPU (:class:`FakeGPU`) Triton's active driver, and plan every launch
    for it (:func:`reslora_kernels.ops._target.simulate`). Autotuning starts afresh on entry and is
    forgotten on exit. The kernels must have been built for a GPU (``TRITON_INTERPRET`` unset
    when reslora_kernels was imported)."""
    if _target.INTERPRETED:
        raise RuntimeError("the fake GPU launches real builds: import reslora_kernels with TRITON_INTERPRET unset")
    gpu = FakeGPU(target, timing, spills)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(nvidia, **_libcuda_stand_ins(gpu)))
        stack.enter_context(_patched(triton.runtime.driver, _active=gpu))
        previous_hook = triton.knobs.runtime.jit_post_compile_hook

        def hook(**kwargs):
            gpu._record_compile(**kwargs)
            if previous_hook is not None:
                previous_hook(**kwargs)

        stack.enter_context(_patched(triton.knobs.runtime, jit_post_compile_hook=hook))
        stack.enter_context(_target.simulate(target))
        _target.forget_tuning()
        stack.callback(_target.forget_tuning)
        stack.callback(gpu._drop_builds)
        yield gpu


@contextlib.contextmanager
def cpu_tensors_as_cuda() -> Iterator[None]:
    """The backend switch treats CPU tensors as CUDA tensors: the fused backend accepts
    them, and ``auto`` times fused against composed on them (with :func:`fake_gpu`, the fused
    candidate then runs on the fake GPU)."""
    from reslora_kernels import backend
    from reslora_kernels.dtypes import KERNEL_DTYPES

    original = backend.fused_unavailable

    def fused_unavailable(x):
        if x.device.type == "cpu" and x.dtype in KERNEL_DTYPES and backend.fused_import_error() is None:
            return None
        return original(x)

    with _patched(backend, fused_unavailable=fused_unavailable, TIMED_DEVICE_TYPES=("cuda", "cpu")):
        yield
