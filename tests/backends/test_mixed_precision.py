"""Mixed precision: under torch.autocast a block computes as the base nn.Linear would (matmuls in
the autocast dtype), while the adapters and their gradients keep their own dtype."""

import pytest
import torch
from helpers import ToyStack, oracle_params, rel_err
from oracle import oracle_grads

from reslora_kernels import FusedResLoRALinear, ResLoRAConfig, apply_reslora, functional, set_backend

CPU_BACKENDS = ["reference", "composed"]


def assert_autocast_close(out, ref64, ref_lowp, what):
    """docs/design.md section 11 for a low-precision computation whose result is stored in float32 (the
    adapter gradients): within 2e-2 of float64 and at most 2x PyTorch's own error + atol."""
    err, torch_err = rel_err(out, ref64), rel_err(ref_lowp, ref64)
    assert err < 2e-2, f"{what}: rel err {err:.3g}"
    assert err <= 2 * torch_err + 1e-4, f"{what}: rel err {err:.3g} vs PyTorch's own {torch_err:.3g}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pre_num", [1, -1])
@pytest.mark.parametrize("mode", ["none", "is", "bs", "ms"])
def test_cpu_bf16_autocast_matches_the_oracle(monkeypatch, backend, mode, pre_num):
    set_backend(backend)
    model = ToyStack(4, 48, mode, pre_num, rank=8, dtype=torch.float32).train()
    params = oracle_params(model)
    x0 = torch.randn(3, 5, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys = model(x0)
    assert all(y.dtype == torch.bfloat16 for y in ys)
    probes = [torch.randn(y.shape) for y in ys]
    sum((y.float() * w).sum() for y, w in zip(ys, probes)).backward()

    scaling = model.blocks[0].scaling
    ys64, grads64, gx64 = oracle_grads(params, x0, scaling, mode, pre_num, None, 0.0, probes, torch.float64)
    ys16, grads16, gx16 = oracle_grads(params, x0, scaling, mode, pre_num, None, 0.0, probes, torch.bfloat16)
    for n, block in enumerate(model.blocks):
        assert_autocast_close(ys[n], ys64[n], ys16[n], f"y_{n}")
        # Master weights stay float32 and so do their gradients.
        assert block.lora_A.dtype == block.lora_A.grad.dtype == torch.float32
        assert_autocast_close(block.lora_A.grad, grads64[n][0], grads16[n][0], f"dA_{n}")
        assert_autocast_close(block.lora_B.grad, grads64[n][1], grads16[n][1], f"dB_{n}")
    assert x0.grad.dtype == torch.float32
    assert_autocast_close(x0.grad, gx64, gx16, "dx")


def test_autocast_leaves_float64_and_disabled_regions_alone():
    layer = FusedResLoRALinear(8, 4, rank=2, dtype=torch.float32)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
        assert functional.autocast_dtype(x.double()) is None
        with torch.autocast("cpu", enabled=False):
            assert layer(x).dtype == torch.float32
        # A bf16 input meets a float32 layer: autocast casts the weights, as for nn.Linear.
        assert layer(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype mismatch"):
        layer(x.bfloat16())  # outside autocast the dtypes must agree, as for nn.Linear


def test_hf_trainer_bf16_smoke(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    apply_reslora(model, ResLoRAConfig(mode="ms", target_modules=targets, dropout=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(0, 64, (8, 12))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        bf16=True,
        use_cpu=True,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = dict(model.named_parameters())
    assert all(after[n].dtype == torch.float32 for n in before)
    assert any(not torch.equal(after[n].detach(), before[n]) for n in before)
