"""One layer, forward+backward and forward-only, every variant side by side and interleaved round
by round (benchmarks/README.md, Method); with the bytes each variant saves for backward and its peak memory.

GPU: M = 8192 tokens, LLaMA-7B projections 4096->4096, 4096->11008, 11008->4096 at r = 16, and
4096->4096 at r = 64, bf16. CPU: float32, the MLP projections of the e2e suite's model at 2048 tokens
(``RESLORA_BENCH_FULL=1``; 256 tokens and fewer rounds by default), where the GEMMs, not the
per-call overhead or the timer, dominate.

Test ids are ``M<tokens>-<K>x<N>-r<rank>-<dtype>`` (``M8192-4096x4096-r16-bf16``), so that
``-k 4096x4096-r16`` selects one shape and ``-k bf16`` a dtype. Settings (environment):
``RESLORA_BENCH_LAYER_SHAPES`` replaces the shapes (``8192x4096x4096r16,...``: M x K x N r rank),
``RESLORA_BENCH_VARIANTS`` keeps only the named variants (``frozen,peft_fp32,composed,fused,auto``),
``RESLORA_BENCH_ROUNDS`` sets the timed rounds.
"""

import os

import pytest
import torch
from bench_lib import (
    DTYPE_IDS,
    FULL,
    IS_CUDA,
    Interleaved,
    case_name,
    layer_case,
    layer_variants,
    parse_shapes,
    peak_bytes,
    peft,
    run_rounds,
    saved_bytes,
    selected_variants,
)

if IS_CUDA:
    SHAPES = [(8192, 4096, 4096, 16), (8192, 4096, 11008, 16), (8192, 11008, 4096, 16), (8192, 4096, 4096, 64)]
    DTYPE = torch.bfloat16
    ROUNDS, WARMUP = int(os.environ.get("RESLORA_BENCH_ROUNDS", "15")), 3
elif FULL:
    # The MLP projections of the e2e suite's model (hidden 256, intermediate 688) at 2048 tokens:
    # ~10 ms per forward+backward on 2 cores, so the ~0.2-0.3 ms of per-call overhead (see the
    # host-overhead suite) is a few percent, not the result.
    SHAPES = [(2048, 256, 688, 16), (2048, 688, 256, 16)]
    DTYPE = torch.float32
    ROUNDS, WARMUP = int(os.environ.get("RESLORA_BENCH_ROUNDS", "25")), 2
else:
    # The reduced CPU sweep: the same two projections (widening and narrowing) at 256 tokens, where
    # a forward+backward still takes a few ms, well above the per-call overhead.
    SHAPES = [(256, 256, 688, 16), (256, 688, 256, 16)]
    DTYPE = torch.float32
    ROUNDS, WARMUP = int(os.environ.get("RESLORA_BENCH_ROUNDS", "7")), 1
PHASES = ("fwd+bwd", "fwd")


if os.environ.get("RESLORA_BENCH_LAYER_SHAPES"):
    SHAPES = parse_shapes(os.environ["RESLORA_BENCH_LAYER_SHAPES"])


def group_name(shape):
    M, K, N, r = shape
    return f"M={M} {K}->{N} r={r} {str(DTYPE).replace('torch.', '')}"


def shape_id(shape):
    """The test id: only characters ``-k`` accepts in a name (no ``->`` or ``=``)."""
    M, K, N, r = shape
    return f"M{M}-{K}x{N}-r{r}-{DTYPE_IDS[DTYPE]}"


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_layer(benchmark, results, shape):
    M, K, N, rank = shape
    variants = [v for v in layer_variants() if peft is not None or not v[0].startswith("peft")]
    variants = selected_variants(variants, os.environ.get("RESLORA_BENCH_VARIANTS"))
    cases = {}
    for phase in PHASES:
        for variant, mode, dropout in variants:
            torch.manual_seed(0)
            case = layer_case(variant, mode, M, K, N, rank, DTYPE, backward=phase == "fwd+bwd", dropout=dropout)
            cases[(variant, mode, dropout, phase)] = case
    runner = Interleaved(cases)
    runner.warm_up(WARMUP)  # compile / autotune / allocator, outside the timed rounds
    benchmark.group = f"layer {group_name(shape)} (one round = every variant once)"
    run_rounds(benchmark, runner, ROUNDS)
    stats = runner.stats()
    group = group_name(shape)
    for (variant, mode, dropout, phase), case in cases.items():
        case.prepare()
        memory = {}
        if phase == "fwd+bwd":
            # Outside the timed rounds: the bytes saved for backward, and the peak of one step.
            memory["saved_bytes"] = saved_bytes(case.forward, case.alive)
            case.prepare()
            peak = peak_bytes(case.step)
            memory["peak_mb"] = None if peak is None else peak / 2**20
        results.add(
            "layer",
            group,
            variant,
            mode=mode,
            dropout=dropout,
            phase=phase,
            M=M,
            K=K,
            N=N,
            rank=rank,
            **stats[(variant, mode, dropout, phase)],
            **memory,
        )
    benchmark.extra_info["median_ms"] = {
        f"{case_name(v, m, p)} {ph}": s["median_ms"] for (v, m, p, ph), s in stats.items()
    }
