"""QLoRA: a tiny Llama loaded in 4 bits through transformers' BitsAndBytesConfig (CPU), adapted by
apply_reslora. Mode none equals PEFT QLoRA given the same adapter values; the exported adapter loads
with PeftModel.from_pretrained onto the same 4-bit base and reproduces the model; it trains under
peft's prepare_model_for_kbit_training with gradient checkpointing.

bitsandbytes' CPU 4-bit matmul is not the float GEMM of its own dequantized weight (it differs by
about 1e-3 relative), so the oracle runs PEFT over the same base computed as that GEMM
(``exact_base``); against bitsandbytes' own forward the outputs agree to within its own error.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import bitsandbytes

from reslora_kernels import FusedResLoRALinear, ResLoRAConfig, apply_reslora, export_peft_adapter, quant

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    bitsandbytes()
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_4bit(path, compute_dtype=torch.float32, quant_type="nf4"):
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM.from_pretrained(
            path, quantization_config=quantization, device_map="cpu", dtype=torch.float32
        )


@pytest.fixture
def exact_base(monkeypatch):
    """bitsandbytes' Linear4bit forward as the float GEMM of its dequantized weight."""
    bnb = bitsandbytes()

    def forward(self, x):
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), quant.dequantize(self, dtype), bias).to(x.dtype)

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", forward)


def ours_with_adapters(path, mode="none", **kwargs):
    model = apply_reslora(load_4bit(path, **kwargs), ResLoRAConfig(mode=mode, rank=4, target_modules=TARGETS))
    torch.manual_seed(1)
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, FusedResLoRALinear):
                block.lora_B.normal_(0.0, 0.05)
    return model


def blocks(model):
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules()
            if isinstance(m, FusedResLoRALinear) or hasattr(m, "lora_A") and hasattr(m, "base_layer")}  # fmt: skip


def peft_qlora_with(ours, path, **kwargs):
    """PEFT QLoRA on the same 4-bit base holding our adapter values."""
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    model = peft.get_peft_model(load_4bit(path, **kwargs), config)
    theirs = blocks(model)
    with torch.no_grad():
        for name, block in blocks(ours).items():
            theirs[name].lora_A["default"].weight.copy_(block.lora_A)
            theirs[name].lora_B["default"].weight.copy_(block.lora_B)
    return model


def loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {}
    for name, block in blocks(model).items():
        A = block.lora_A if isinstance(block, FusedResLoRALinear) else block.lora_A["default"].weight
        B = block.lora_B if isinstance(block, FusedResLoRALinear) else block.lora_B["default"].weight
        grads[name] = (A.grad, B.grad)
    return loss.detach(), grads


def test_mode_none_is_peft_qlora_given_the_same_adapter_values(checkpoint, exact_base):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = ours_with_adapters(checkpoint)
    theirs = peft_qlora_with(ours, checkpoint)
    ours.train(), theirs.train()
    loss, grads = loss_and_grads(ours, ids)
    loss_ref, grads_ref = loss_and_grads(theirs, ids)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * len(TARGETS)
    for name, (gA, gB) in grads.items():
        torch.testing.assert_close(gA, grads_ref[name][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gB, grads_ref[name][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["none", "bs"])
def test_exported_adapter_loads_onto_the_same_4bit_base_and_reproduces_the_model(checkpoint, tmp_path, mode):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = ours_with_adapters(checkpoint, mode).eval()
    with torch.no_grad():
        logits = ours(ids).logits
    export_peft_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(load_4bit(checkpoint), tmp_path).eval()
    assert {type(m).__name__ for m in blocks(loaded).values()} == {"Linear4bit"}
    with torch.no_grad():
        # Both on bitsandbytes' own 4-bit forward: within its error (measured on the bare base).
        base = load_4bit(checkpoint).eval()
        bnb_error = float((base(ids).logits - ours_bare_logits(checkpoint, ids)).abs().max())
        assert bnb_error > 0
        torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=4 * bnb_error)


def ours_bare_logits(path, ids):
    """The 4-bit base through ResLoRA blocks with zero lora_B: the exact GEMM of the dequantized weights."""
    model = apply_reslora(load_4bit(path), ResLoRAConfig(rank=4, target_modules=TARGETS)).eval()
    return model(ids).logits


def test_exported_adapter_reproduces_the_model_exactly_over_the_same_base_gemm(checkpoint, tmp_path, exact_base):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = ours_with_adapters(checkpoint, "is").eval()
    for _ in range(2):  # norm statistics for the input-norm merge
        ours.train()(ids)
    ours.eval()
    export_peft_adapter(ours, tmp_path)
    from reslora_kernels import merge_report

    loaded = peft.PeftModel.from_pretrained(load_4bit(checkpoint), tmp_path).eval()
    with torch.no_grad():
        merged_error = merge_report(ours, [ids], ["input_norm"])["input_norm"]
        theirs = loaded(ids).logits.double()
        # PEFT's model is the input_norm merge: its distance from ours is the merge's own error.
        reference = ours(ids).logits.double()
        assert abs(float((theirs - reference).norm() / reference.norm()) - merged_error) < 1e-5


# peft's default is reentrant checkpointing, which the shortcut modes refuse (their gradient crosses
# checkpointed segments); mode none runs under it.
@pytest.mark.parametrize(
    "mode, kwargs", [("none", None), ("is", {"use_reentrant": False})], ids=["none-reentrant", "is"]
)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_trains_under_prepare_model_for_kbit_training_with_gradient_checkpointing(
    checkpoint, mode, kwargs, compute_dtype
):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointing in (False, True):
        model = peft.prepare_model_for_kbit_training(
            load_4bit(checkpoint, compute_dtype=compute_dtype), use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs=kwargs,
        )  # fmt: skip
        model = ours_with_adapters_on(model, mode)
        assert model.is_gradient_checkpointing == checkpointing
        model.train()
        results.append(loss_and_grads(model, ids))
        block = model.model.layers[0].self_attn.q_proj
        assert block.lora_A.dtype == torch.float32 and block.lora_A.grad.dtype == torch.float32
        assert type(block.base_layer).__name__ == "Linear4bit" and block.base_layer.weight.grad is None
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert torch.isfinite(loss) and torch.equal(loss, loss_ckpt)
    for name, (gA, gB) in grads.items():
        assert gB.abs().sum() > 0
        for ckpt, plain in zip(grads_ckpt[name], (gA, gB)):
            if compute_dtype == torch.float32:
                torch.testing.assert_close(ckpt, plain, rtol=0, atol=0)
            else:  # checkpointed segments sum some bfloat16 gradients in another order
                assert float((ckpt - plain).norm()) <= 1e-2 * float(plain.norm())


def ours_with_adapters_on(model, mode):
    torch.manual_seed(1)
    model = apply_reslora(model, ResLoRAConfig(mode=mode, rank=4, target_modules=TARGETS))
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, FusedResLoRALinear):
                block.lora_B.normal_(0.0, 0.05)
    return model
