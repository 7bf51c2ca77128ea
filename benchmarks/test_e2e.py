"""A whole training step of a LLaMA-architecture model with random weights: tokens/s, bytes saved
for backward and peak memory for the frozen floor, PEFT LoRA (dropout 0 and > 0) and ResLoRA in
each mode, on every backend that runs fast here; every variant's steps interleaved round by round.

GPU: ~1.1B parameters (hidden 2048, 22 layers, the TinyLlama shape), seq 2048, batch
RESLORA_BENCH_E2E_BATCH (default 8), bf16, adapters on q,k,v,o,gate,up,down at r = 16, AdamW on the
adapters. CPU: a small model of the same architecture (hidden 256, 4 layers, 512 tokens per step
with ``RESLORA_BENCH_FULL=1``; 2 layers and 128 tokens by default), large enough that the
projections' GEMMs dominate the step. ``RESLORA_BENCH_VARIANTS`` keeps only
the named variants (``frozen,peft_fp32,composed,fused,auto``).
"""

import copy
import os

import pytest
import torch
from bench_lib import (
    BACKEND_OF,
    DEVICE,
    DROPOUT,
    FULL,
    IS_CUDA,
    MODES,
    Interleaved,
    TrainingStep,
    peak_bytes,
    peft,
    run_rounds,
    saved_bytes,
    selected_variants,
)

from reslora_kernels import ResLoRAConfig, apply_reslora

transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
if IS_CUDA:
    SIZES = dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    )
    SEQ, BATCH, DTYPE, ROUNDS = 2048, int(os.environ.get("RESLORA_BENCH_E2E_BATCH", "8")), torch.bfloat16, 6
    IMPLS = ("reference", "composed", "fused", "auto")
else:
    SIZES = dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4 if FULL else 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    )
    # The reduced CPU sweep (RESLORA_BENCH_FULL unset): 2 layers, 128 tokens per step, 5 rounds.
    SEQ, BATCH, DTYPE = (128, 4, torch.float32) if FULL else (64, 2, torch.float32)
    ROUNDS = int(os.environ.get("RESLORA_BENCH_E2E_ROUNDS", "11" if FULL else "5"))
    IMPLS = ("reference", "composed")
OURS = "auto" if IS_CUDA else "composed"
GROUP = (
    f"llama h={SIZES['hidden_size']} L={SIZES['num_hidden_layers']} seq={SEQ} batch={BATCH} "
    f"r=16 {str(DTYPE).replace('torch.', '')}"
)
VARIANTS = selected_variants(
    [("frozen", "-", 0.0), ("peft_fp32", "none", 0.0), ("peft_fp32", "none", DROPOUT)]
    + [(impl, mode, 0.0) for impl in IMPLS for mode in MODES]
    + [(OURS, mode, DROPOUT) for mode in MODES],
    os.environ.get("RESLORA_BENCH_VARIANTS"),
)


@pytest.fixture(scope="module")
def base_model():
    config = transformers.LlamaConfig(**SIZES, max_position_embeddings=SEQ)
    config._attn_implementation = "sdpa"
    with torch.device(DEVICE):
        model = transformers.LlamaForCausalLM(config).to(DTYPE)
    return model.requires_grad_(False)


def build(base, variant, mode, dropout):
    # The frozen base parameters are shared by every variant (the memo maps them to
    # themselves): all variants fit in memory at once, so their steps can be interleaved.
    model = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
    if variant == "peft_fp32":
        config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=dropout)
        model = peft.get_peft_model(model, config)  # default: adapters upcast to float32
    elif variant != "frozen":
        apply_reslora(model, ResLoRAConfig(mode=mode, rank=16, alpha=32, dropout=dropout, target_modules=TARGETS))
    # Every variant back-propagates through the whole stack, the floor included.
    model.get_input_embeddings().register_forward_hook(lambda mod, args, out: out.requires_grad_())
    return model.train()


def test_training_step(benchmark, results, base_model):
    if peft is None:
        pytest.skip("peft is not installed")
    ids = torch.randint(0, SIZES["vocab_size"], (BATCH, SEQ), device=DEVICE)
    steps = {}
    for variant, mode, dropout in VARIANTS:
        torch.manual_seed(0)
        steps[(variant, mode, dropout)] = TrainingStep(
            build(base_model, variant, mode, dropout), BACKEND_OF.get(variant, "auto"), ids
        )
    runner = Interleaved(steps)
    runner.warm_up(2)  # compile, autotune, allocator, optimizer state
    benchmark.group = f"e2e {GROUP} (one round = one step of every variant)"
    run_rounds(benchmark, runner, ROUNDS)
    for (variant, mode, dropout), stats in runner.stats().items():
        step = steps[(variant, mode, dropout)]
        step.prepare()
        saved = saved_bytes(step.loss, step.alive)  # the whole model's, one forward
        peak = peak_bytes(step.step)
        results.add(
            "e2e",
            GROUP,
            variant,
            mode=mode,
            dropout=dropout,
            tokens_per_s=BATCH * SEQ / (stats["median_ms"] / 1e3),
            saved_bytes=saved,
            peak_mb=None if peak is None else peak / 2**20,
            **stats,
        )
