"""A whole training step of a LLaMA-architecture model with random weights: tokens/s and peak
memory for the frozen floor, PEFT LoRA, and ResLoRA (reference and fused) in each mode.

GPU: ~1.1B parameters (hidden 2048, 22 layers, the TinyLlama shape), seq 2048, batch
RESLORA_BENCH_E2E_BATCH (default 8), bf16, adapters on q,k,v,o,gate,up,down at r = 16, AdamW on the
adapters. CPU: a tiny model of the same architecture.
"""

import copy
import os
import statistics

import pytest
import torch
from bench_lib import DEVICE, IS_CUDA, MODES, peft, synchronize

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
    SEQ, BATCH, DTYPE, STEPS = 2048, int(os.environ.get("RESLORA_BENCH_E2E_BATCH", "8")), torch.bfloat16, 6
else:
    SIZES = dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    SEQ, BATCH, DTYPE, STEPS = 64, 4, torch.float32, 5
GROUP = (
    f"llama h={SIZES['hidden_size']} L={SIZES['num_hidden_layers']} seq={SEQ} batch={BATCH} "
    f"r=16 {str(DTYPE).replace('torch.', '')}"
)
VARIANTS = [("frozen", "-"), ("peft_fp32", "none")] + [(v, m) for v in ("reference", "fused") for m in MODES]


@pytest.fixture(scope="module")
def base_model():
    config = transformers.LlamaConfig(**SIZES, max_position_embeddings=SEQ)
    config._attn_implementation = "sdpa"
    with torch.device(DEVICE):
        model = transformers.LlamaForCausalLM(config).to(DTYPE)
    return model.requires_grad_(False)


def build(base, variant, mode):
    model = copy.deepcopy(base)
    if variant == "peft_fp32":
        config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)
        model = peft.get_peft_model(model, config)  # default: adapters upcast to float32
    elif variant in ("reference", "fused"):
        apply_reslora(model, ResLoRAConfig(mode=mode, rank=16, alpha=32, target_modules=TARGETS))
    # Every variant back-propagates through the whole stack, the floor included.
    model.get_input_embeddings().register_forward_hook(lambda mod, args, out: out.requires_grad_())
    return model.train()


@pytest.mark.parametrize("variant, mode", VARIANTS, ids=lambda v: v)
def test_training_step(benchmark, results, base_model, variant, mode):
    if variant == "fused" and not IS_CUDA:
        pytest.skip("GPU only: on CPU the fused kernels run in Triton's interpreter, which is no speed")
    if variant == "peft_fp32" and peft is None:
        pytest.skip("peft is not installed")
    os.environ["RESLORA_BACKEND"] = "torch" if variant == "reference" else "auto"
    model = build(base_model, variant, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if variant != "frozen" else None
    ids = torch.randint(0, SIZES["vocab_size"], (BATCH, SEQ), device=DEVICE)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: compile, autotune, allocator, optimizer state
        step()
    synchronize()
    if IS_CUDA:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(STEPS):
        if IS_CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if IS_CUDA else None
    tokens_per_s = BATCH * SEQ / (ms / 1e3)
    benchmark.group = f"e2e {GROUP}"
    benchmark.extra_info.update(device_median_ms=ms, tokens_per_s=tokens_per_s, peak_mb=peak_mb)
    benchmark.pedantic(lambda: (step(), synchronize()), rounds=1, warmup_rounds=0)
    results.add("e2e", GROUP, variant, mode=mode, median_ms=ms, tokens_per_s=tokens_per_s, peak_mb=peak_mb)
