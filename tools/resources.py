"""What a kernel build uses, read from its artefacts: registers and stack frame from the cubin
(the ``cuobjdump`` that ships with Triton), and 32-bit index x stride products from the TTIR. The
compile matrix and the fake GPU's loader read builds with these."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import triton

__all__ = ["resource_usage", "int32_stride_products"]


def resource_usage(cubin: bytes, name: str | None = None) -> tuple[int, int]:
    """``(registers, stack bytes)`` per thread of kernel ``name`` (default: the first) of a cubin,
    read by the ``cuobjdump`` that ships with Triton's NVIDIA backend. The package's kernels keep
    no local arrays, so stack bytes are register spills."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+)", out)
    for function, registers, stack in found:
        if name is None or function == name:
            return int(registers), int(stack)
    raise RuntimeError(f"cuobjdump printed no resource usage{f' for {name}' if name else ''}: {out[:300]}")



_TTIR_OP = re.compile(r"^\s*(%[\w.#:]+)\s*=\s*([\w.]+)\s+(.*)$")
_PROPAGATING = ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "ttg.convert_layout", "arith.")


def int32_stride_products(ttir: str) -> list[str]:
    """Names of the ``stride_*`` arguments that some 32-bit ``arith.muli`` multiplies (directly or
    through splats, broadcasts and other arithmetic): such a product wraps once an offset passes
    2^31 elements. Offsets must be formed in int64 (``tile_ptrs``)."""
    signature = re.search(r"tt\.func\s+(?:public\s+)?@\w+\((.*?)\)\s*attributes", ttir, re.S)
    if signature is None:
        raise ValueError("no tt.func signature in the TTIR")
    derived = {}
    for name in re.findall(r"(%stride_\w+):\s*i\d+", signature.group(1)):
        derived[name] = name
    flagged = set()
    for line in ttir.splitlines():
        match = _TTIR_OP.match(line)
        if match is None:
            continue
        result, op, rest = match.groups()
        operands, _, result_type = rest.partition(" : ")
        sources = {derived[o] for o in re.findall(r"%[\w.#]+", operands) if o in derived}
        if not sources:
            continue
        if op == "arith.muli" and re.search(r"(?<![\w])i32\b|xi32>", result_type.split(" loc(")[0]):
            flagged |= sources
        if op.startswith(_PROPAGATING):
            derived[result.split(":")[0]] = sorted(sources)[0]
    return sorted(flagged)
