"""The autotuning config tables: one per kernel family, shared by the kernels of the family.

Every table lists the candidates for any target and dtype; :func:`reslora_kernels.ops._target.usable`
drops, per launch, those whose build does not fit the target's shared memory (e.g. large float32
tiles on an A100) or spills registers (e.g. 128 x 256 tiles when the dropout hash runs on the
tile). The compile matrix (``python -m tools.compile_matrix``) builds every row for
sm_90a and sm_80 and checks that each launch keeps at least one config, that no offered 16-bit
config spills, and what each build uses (docs/compile_matrix.md).

Launch-time block minimums (how many partial sums a launch allocates, say) are derived from these
tables with :func:`smallest`, never written out a second time.
"""

from __future__ import annotations

import triton

from ._target import INTERPRETED

# (BLOCK_M, output tile, reduction tile, warps, stages) of the tiled GEMMs with a LoRA term
# (linear_lora_fwd: output tile BLOCK_N, reduction BLOCK_K; linear_lora_dx: output BLOCK_K,
# reduction BLOCK_N). The BLOCK_K = 32 rows fit float32 operands on an A100 and keep the per-thread
# accumulator small enough for a rank-64 epilogue or the dropout hash.
GEMM = [
    (128, 256, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 128, 32, 8, 3),
    (64, 128, 32, 4, 3),
    (128, 64, 32, 4, 3),
    (64, 64, 32, 4, 3),
]
# Shapes whose leading strides or contiguous extent are not multiples of 16 elements lose
# vectorised loads (and cp.async): every element needs its own address and predicate and is
# staged through registers, so only small tiles and few stages stay within the register file.
GEMM_UNALIGNED = [
    (64, 64, 32, 8, 2),
    (64, 128, 32, 8, 3),
    (64, 64, 32, 4, 3),
    (32, 64, 32, 4, 2),
]
# The Hopper persistent GEMMs (tensor descriptors, wgmma): (BLOCK_M, output, reduction, warps,
# stages). 128 x 256 tiles need two warpgroups (8 warps) for the accumulator. The 64 x 64 row is
# for float32 without TF32 (torch's default): its dot runs on FMAs with the whole tile in
# registers: every larger tile spills 1.7-6 KB per thread, this one ~350 B (still the least).
GEMM_TMA = [
    (128, 256, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 4),
    (128, 128, 32, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 32, 4, 3),
]
# Row-streaming rank-space kernels (lora_down: z = x A^T; lora_grad_A: dA = g^T x):
# (BLOCK_M, BLOCK_K, warps, stages).
ROWS = [
    (64, 128, 4, 3),
    (128, 64, 4, 4),
    (128, 128, 8, 3),
    (64, 256, 8, 3),
    (64, 128, 8, 3),
    (128, 64, 8, 4),
    (64, 64, 4, 3),
    (32, 64, 4, 2),
]
ROWS_UNALIGNED = [
    (64, 64, 8, 2),
    (64, 32, 4, 2),
    (32, 64, 4, 2),
    (32, 32, 4, 2),
]
# lora_grad_out (g = s grad_out B, dB = s grad_out^T u): (BLOCK_N, warps, stages); BLOCK_M is
# the launcher's (the deterministic partials depend on it): GRAD_OUT_BLOCK_M.
GRAD_OUT = [
    (64, 4, 4),
    (128, 4, 3),
    (128, 8, 3),
    (256, 8, 3),
    (32, 4, 3),
]
GRAD_OUT_UNALIGNED = [
    (32, 4, 2),
    (64, 8, 2),
    (64, 4, 2),
]
GRAD_OUT_BLOCK_M = 32 if INTERPRETED else 64
# The merge fold W += c B A: (BLOCK_N, BLOCK_K, warps, stages).
FOLD = [
    (64, 128, 4, 2),
    (64, 256, 8, 2),
    (128, 128, 8, 2),
    (32, 256, 4, 2),
    (32, 64, 4, 2),
]
FOLD_UNALIGNED = [
    (32, 64, 4, 2),
    (64, 64, 4, 2),
    (64, 128, 8, 2),
]

# The dequantization of a quantized base weight (dequant_4bit, dequant_int8): (BLOCK_N, BLOCK_K,
# warps, stages) over the [N, K] output. Pure streaming, no loop: wide rows keep the packed-byte
# loads and the 16-bit stores vectorised. 16 to 32 elements per thread: at 64 the odd-K path (an
# int64 index per element) and the bfloat16 rounding spill.
DEQUANT = [
    (16, 256, 4, 1),
    (32, 256, 8, 1),
    (8, 512, 4, 1),
    (16, 512, 8, 1),
    (8, 256, 4, 1),
]

#: The one config every kernel runs under the interpreter: tuning there would only cost minutes.
INTERPRETER_BLOCK = 32


def gemm_configs(rows: list, out_name: str, red_name: str, pre_hook=None) -> list:
    """``triton.Config`` objects of a GEMM table, naming the output and reduction tiles."""
    if INTERPRETED:
        rows = [(INTERPRETER_BLOCK,) * 3 + (4, 1)]
    return [
        triton.Config(
            {"BLOCK_M": bm, out_name: bo, red_name: br, "GROUP_M": 8}, num_warps=w, num_stages=s, pre_hook=pre_hook
        )
        for bm, bo, br, w, s in rows
    ]


def tile_configs(rows: list, names: tuple[str, ...]) -> list:
    """``triton.Config`` objects of a table whose rows are ``(*blocks, warps, stages)``."""
    if INTERPRETED:
        rows = [(INTERPRETER_BLOCK,) * len(names) + (4, 1)]
    return [triton.Config(dict(zip(names, row[: len(names)])), num_warps=row[-2], num_stages=row[-1]) for row in rows]


def smallest(configs: list, name: str) -> int:
    """The smallest value of block ``name`` over ``configs``: what a launch must provision for
    when the autotuner may pick any of them."""
    return min(c.kwargs[name] for c in configs)
