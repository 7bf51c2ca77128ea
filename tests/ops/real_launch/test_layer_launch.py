"""The public API on a fake H100 and A100: ``apply_reslora`` chains of every mode, trained (with and
without dropout), evaluated and merged on the fused backend. Every launch goes through
Triton's autotuner (or the pinned config), a real build for sm_90a / sm_80 and Triton's launcher,
and the fake driver checks what CUDA would check; the tests assert which kernels each phase
launched, with what grids and tensor maps. Outputs are garbage: nothing computes."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from models import EVAL, MERGE, PRECISIONS, TRAIN, Stack, on_hopper

from reslora_kernels import FusedResLoRALinear, ResLoRAConfig, apply_reslora, merge_and_unload, set_backend
from reslora_kernels.ops._target import A100, H100
from tools.fake_gpu import KernelLaunch, cpu_tensors_as_cuda, fake_gpu

LAYERS, TOKENS, RANK = 2, 64, 16


@dataclasses.dataclass(frozen=True)
class Chain:
    """One chain scenario: every target sees every mode, precision and bias setting."""

    target: object
    mode: str
    precision: str
    bias: bool
    features: int = 128  # a multiple of 16: the aligned (TMA on Hopper) path
    tune: str = "pinned"

    def __str__(self):
        arch = "sm_90a" if self.target is H100 else "sm_80"
        return f"{arch}-{self.mode}-{self.precision}-bias{int(self.bias)}-{self.features}-{self.tune}"


# Each target sees every mode, both bias settings and every precision (float32 without TF32 on sm_80
# only) in a trained, evaluated and merged chain; the two autotuned chains run Triton's autotuner over
# every config, the pinned ones build until a config fits. Float32 without TF32 spills in nearly every
# GEMM config, so building them costs minutes of ptxas: it runs at an unaligned width (the small-tile
# tables) here, and every aligned config is built by the compile matrix (docs/compile_matrix.md).
CHAINS = [
    Chain(H100, "none", "bf16", True, tune="autotune"),
    Chain(H100, "is", "fp16", False),
    Chain(H100, "bs", "fp32-tf32", True),
    Chain(H100, "ms", "bf16", False),
    # Unaligned features: Hopper takes the pointer kernels with the unaligned config tables.
    Chain(H100, "is", "bf16", True, features=72),
    Chain(A100, "none", "bf16", False, tune="autotune"),
    Chain(A100, "is", "fp16", True),
    Chain(A100, "bs", "fp32-ieee", False, features=72),
    Chain(A100, "ms", "fp32-tf32", True),
]


@contextlib.contextmanager
def allow_tf32(value: bool):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = value
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@dataclasses.dataclass
class Phases:
    gpu: object
    launches: dict[str, list[KernelLaunch]]


def run_chain(chain: Chain, monkeypatch) -> Phases:
    """A training step with dropout, one without, an eval forward and the merge, on the fake GPU."""
    dtype, tf32 = PRECISIONS[chain.precision]
    set_backend("fused")
    monkeypatch.setenv("RESLORA_TUNE", chain.tune)
    launches = {}
    with fake_gpu(chain.target) as gpu, cpu_tensors_as_cuda(), allow_tf32(tf32):
        model = Stack(LAYERS, chain.features, chain.bias, dtype)
        config = ResLoRAConfig(mode=chain.mode, rank=RANK, alpha=2.0 * RANK, dropout=0.1, target_modules=["proj"])
        apply_reslora(model, config)
        blocks = [m for m in model.modules() if isinstance(m, FusedResLoRALinear)]
        assert len(blocks) == LAYERS
        x = torch.randn(2, TOKENS // 2, chain.features, dtype=dtype)

        def phase(name, fn):
            first = len(gpu.launches)
            fn()
            launches[name] = gpu.launches[first:]

        def step():
            model.train()
            model(x).float().sum().backward()

        phase("train+dropout", step)
        for block in blocks:
            block.dropout = 0.0
        phase("train", step)

        def evaluate():
            model.eval()
            with torch.no_grad():
                model(x)

        phase("eval", evaluate)
        phase("merge", lambda: merge_and_unload(model))
        assert not any(isinstance(m, FusedResLoRALinear) for m in model.modules())
    return Phases(gpu, launches)


@pytest.fixture(scope="module")
def results():
    return {}


@pytest.fixture(params=CHAINS, ids=str)
def chain_run(request, results, monkeypatch):
    chain = request.param
    if chain not in results:
        results[chain] = run_chain(chain, monkeypatch)
    return chain, results[chain]


def expected(chain: Chain, kernels: set[str]) -> set[str]:
    return on_hopper(kernels) if chain.target is H100 and chain.features % 16 == 0 else kernels


def test_every_kernel_of_each_phase_launches(chain_run):
    """Training runs the five kernels of a block (the TMA GEMMs on Hopper with aligned operands),
    eval the two forward ones, the merge the fold; nothing else, and nothing on an empty grid."""
    chain, phases = chain_run
    want = {"train+dropout": TRAIN, "train": TRAIN, "eval": EVAL, "merge": MERGE}
    for name, kernels in want.items():
        launched = {launch.kernel for launch in phases.launches[name]}
        assert launched == expected(chain, kernels), f"{name}: {sorted(launched)}"
    assert phases.gpu.empty_launches == []
    # one fold per block; training launches every block's kernels
    assert len(phases.launches["merge"]) == LAYERS
    assert sum(la.kernel.startswith("_lora_down") for la in phases.launches["train"]) == LAYERS


def test_grids_fit_the_plan(chain_run):
    """Persistent kernels never launch more programs than the GPU has SMs; every grid is within
    CUDA's limits (the fake driver refuses the rest) and covers the work."""
    chain, phases = chain_run
    for launch in (la for launches in phases.launches.values() for la in launches):
        assert all(g >= 1 for g in launch.grid), launch
        assert launch.shared <= chain.target.max_shared
        if launch.kernel.endswith("_tma_kernel"):
            assert launch.grid[0] <= chain.target.sm_count and launch.grid[1:] == (1, 1)


def test_tensor_maps_describe_the_operands(chain_run):
    """Each TMA GEMM binds its descriptors through Triton's own conversion: three tensor maps for
    the forward (x, W, y), four for dx (grad_out, W, dx, dx_prev), in the operands' element size,
    16-byte aligned and with the operands' shapes."""
    chain, phases = chain_run
    dtype, _ = PRECISIONS[chain.precision]
    tma = [la for launches in phases.launches.values() for la in launches if la.kernel.endswith("_tma_kernel")]
    assert bool(tma) == (chain.target is H100 and chain.features % 16 == 0)
    for launch in tma:
        maps = launch.tensor_maps
        assert len(maps) == (3 if launch.kernel.startswith("_linear_lora_fwd") else 4)
        for tensor_map in maps:
            assert tensor_map.elem_size == dtype.itemsize and tensor_map.address % 16 == 0
            assert tensor_map.shape[-1] == chain.features and tensor_map.shape[0] in (TOKENS, chain.features)


def test_tuning_ran_as_configured(chain_run):
    """Pinned: nothing is benchmarked and no build is made twice. Autotune: Triton's autotuner built
    every config of the GEMMs' tables for each launch key and benchmarked the ones it offered."""
    chain, phases = chain_run
    gpu = phases.gpu
    builds = [(c.kernel, c.num_warps, c.num_stages, tuple(sorted(c.constants.items()))) for c in gpu.compiles]
    assert len(builds) == len(set(builds)), "a build was compiled twice"
    gemms = expected(chain, {"_linear_lora_fwd_kernel", "_linear_lora_dx_kernel"})
    if chain.tune == "pinned":
        assert gpu.benchmarks == []
    else:
        benchmarked = {la.kernel for bench in gpu.benchmarks for la in bench.launches}
        assert benchmarked >= gemms
        for kernel in gemms:
            assert (
                len(
                    {
                        (c.num_warps, c.num_stages, c.constants.get("BLOCK_M"))
                        for c in gpu.compiles
                        if c.kernel == kernel
                    }
                )
                > 2
            )
