"""QLoRA: ResLoRA over a bitsandbytes 4-bit base (NF4, double quantization) against PEFT QLoRA on the
same base: one layer's forward+backward, and a whole training step of a small LLaMA loaded in 4 bits
(transformers' BitsAndBytesConfig); time, bytes saved for backward and peak memory, every variant
interleaved round by round.

GPU: a 4096 -> 4096 layer at 8192 tokens and the e2e model at hidden 1024, bf16 compute. CPU: a
1024 -> 1024 layer at 256 tokens and a LLaMA of hidden 256 (MLP 768: rows a whole number of 64-element
blocks; rows that end mid-block are decoded by the formula in torch on CPU, see quant.py), 2 layers,
float32 compute (bitsandbytes' CPU 4-bit matmul), kept small so that the suite adds a few seconds.
"""

import tempfile
import warnings

import pytest
import torch
from bench_lib import DEVICE, IS_CUDA, Interleaved, TrainingStep, peak_bytes, peft, run_rounds, saved_bytes

from reslora_kernels import FusedResLoRALinear, ResLoRAConfig, apply_reslora, set_backend

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

COMPUTE = torch.bfloat16 if IS_CUDA else torch.float32
RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
if IS_CUDA:
    M, K, N, ROUNDS = 8192, 4096, 4096, 10
    SIZES = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000)  # fmt: skip
    SEQ, BATCH = 1024, 4
else:
    M, K, N, ROUNDS = 256, 1024, 1024, 5
    SIZES = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512)  # fmt: skip
    SEQ, BATCH = 64, 2
DTYPE_NAME = str(COMPUTE).replace("torch.", "")
OURS = "auto" if IS_CUDA else "composed"


def linear4bit(weight):
    module = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=COMPUTE, quant_type="nf4")
    module.weight = bnb.nn.Params4bit(
        weight.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4", module=module
    )
    return module.to(DEVICE)


class _Proj(torch.nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


class LayerStep:
    def __init__(self, model, backend, x, grad):
        self.model, self.backend, self.x, self.grad = model, backend, x, grad
        self.alive = [x, grad] + list(model.parameters())

    def prepare(self):
        set_backend(self.backend)

    def forward(self):
        return self.model(self.x)

    def step(self):
        self.model(self.x).backward(self.grad)
        self.model.zero_grad(set_to_none=True)
        self.x.grad = None


def layer_variants(weight):
    variants = {"frozen Linear4bit": _Proj(linear4bit(weight))}
    if peft is not None:
        config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["proj"], lora_dropout=0.0)
        variants["peft_qlora"] = peft.get_peft_model(_Proj(linear4bit(weight)), config)
    for mode in ("none", "is"):
        block = FusedResLoRALinear.from_linear(linear4bit(weight), rank=RANK, alpha=2 * RANK, mode=mode)
        variants[f"reslora {mode}"] = _Proj(block)
    for model in variants.values():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.01)
    return variants


def test_qlora_layer(benchmark, results):
    torch.manual_seed(0)
    weight = torch.randn(N, K, dtype=COMPUTE) * 0.02
    x = torch.randn(M, K, device=DEVICE, dtype=COMPUTE, requires_grad=True)
    grad = torch.randn(M, N, device=DEVICE, dtype=COMPUTE)
    steps = {name: LayerStep(model, OURS, x, grad) for name, model in layer_variants(weight).items()}
    runner = Interleaved(steps)
    runner.warm_up(2)
    group = f"NF4 double-quant {K}->{N} M={M} r={RANK} {DTYPE_NAME}"
    benchmark.group = f"qlora layer {group}"
    run_rounds(benchmark, runner, ROUNDS)
    for name, stats in runner.stats().items():
        step = steps[name]
        step.prepare()
        peak = peak_bytes(step.step)
        results.add(
            "qlora", f"layer {group}", name, saved_bytes=saved_bytes(step.forward, step.alive),
            peak_mb=None if peak is None else peak / 2**20, **stats,
        )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint():
    config = transformers.LlamaConfig(**SIZES, max_position_embeddings=SEQ)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as path:
        transformers.LlamaForCausalLM(config).save_pretrained(path)
        yield path


def load_4bit(path):
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=COMPUTE
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM.from_pretrained(
            path, quantization_config=quantization, device_map=DEVICE, dtype=COMPUTE
        )
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False) if peft else model


def test_qlora_training_step(benchmark, results, checkpoint):
    if peft is None:
        pytest.skip("peft is not installed")
    ids = torch.randint(0, SIZES["vocab_size"], (BATCH, SEQ), device=DEVICE)
    steps = {}
    torch.manual_seed(0)
    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, lora_dropout=0.0)
    steps["peft_qlora"] = TrainingStep(peft.get_peft_model(load_4bit(checkpoint), config), OURS, ids)
    for mode in ("none", "is"):
        model = apply_reslora(
            load_4bit(checkpoint), ResLoRAConfig(mode=mode, rank=RANK, alpha=2 * RANK, target_modules=TARGETS)
        )
        steps[f"reslora {mode}"] = TrainingStep(model, OURS, ids)
    for step in steps.values():
        step.model.train()
    runner = Interleaved(steps)
    runner.warm_up(2)
    group = (
        f"llama h={SIZES['hidden_size']} L={SIZES['num_hidden_layers']} seq={SEQ} batch={BATCH} r={RANK} "
        f"NF4 double-quant, {DTYPE_NAME} compute"
    )
    benchmark.group = f"qlora e2e {group}"
    run_rounds(benchmark, runner, ROUNDS)
    for name, stats in runner.stats().items():
        step = steps[name]
        step.prepare()
        peak = peak_bytes(step.step)
        results.add(
            "qlora", f"step {group}", name, tokens_per_s=BATCH * SEQ / (stats["median_ms"] / 1e3),
            saved_bytes=saved_bytes(step.loss, step.alive), peak_mb=None if peak is None else peak / 2**20, **stats,
        )  # fmt: skip
