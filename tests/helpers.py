"""What the tests share: the tolerance rules, a toy ResLoRA stack, a tiny Llama checked against
the oracle, and a small plain model.

pytest puts tests/ on ``sys.path`` (tests/conftest.py, default import mode): tests import these as
``from helpers import ...``. tests/conftest.py holds only fixtures and hooks.
"""

from __future__ import annotations

import copy
import itertools
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint
from oracle import block_output

import reslora_kernels.functional as functional
from reslora_kernels import FusedResLoRALinear, ResLoRAConfig, apply_reslora, link_chain

HAS_CUDA = torch.cuda.is_available()

# ---------------------------------------------------------------------------- devices, dtypes, tolerances
#: Where the Triton kernel tests run: the GPU if there is one, else the interpreter on CPU.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
#: The interpreter's tl.dot multiplies bfloat16 bit patterns: bfloat16 is tested on the GPU only.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


#: Test ids of dtype parameters: ``-k bf16`` selects the bfloat16 cases of every test.
DTYPE_IDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm()
    if denom == 0:
        return float((out - ref).norm())
    return float((out - ref).norm() / denom)


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| in float64."""
    if out.numel() == 0:
        return 0.0
    return float((out.detach().double() - ref.detach().double()).abs().max())


def rounding_atol(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice the largest error of merely rounding the float64 reference to ``dtype``: no kernel
    that writes ``dtype`` can do better, so this is the absolute slack of the max-abs rule."""
    if ref64.numel() == 0:
        return 0.0
    ref64 = ref64.detach().double()
    return 2 * float((ref64.to(dtype).double() - ref64).abs().max())


def assert_maxabs_close(out, ref64, torch_same_dtype, what=""):
    """FlashAttention's rule, for 16-bit outputs: the kernel's largest elementwise error is at most
    twice PyTorch's own largest error for the same computation in the same dtype, plus the
    rounding of the output. Unlike a normwise error, it fails when a single tile (or element) of a
    large output is wrong. Not for float32, whose PyTorch error depends on the machine's BLAS and
    thread count (:func:`assert_fp32_bounded` instead)."""
    err = max_abs_err(out, ref64)
    torch_err = max_abs_err(torch_same_dtype, ref64)
    atol = rounding_atol(ref64, out.dtype)
    assert err <= 2 * torch_err + atol, (
        f"{what}: max abs err {err:.3g} > 2 x PyTorch's own {torch_err:.3g} + atol {atol:.3g}"
    )


#: float32's unit roundoff: the a-priori error bounds below are multiples of it.
FP32_UNIT_ROUNDOFF = 2.0**-24


def assert_fp32_bounded(out, ref64, magnitude64=None, depth=None, what=""):
    """float32's elementwise rule, the same on every machine. With ``magnitude64`` (the formula
    evaluated in float64 on the inputs' absolute values) and ``depth`` (the longest chain of
    roundings behind one output: the summation length plus the elementwise steps), the classic
    bound |out - ref| <= gamma_depth * magnitude, gamma_n = n u / (1 - n u), holds for any
    summation order, so it does not depend on the BLAS or thread count PyTorch's own float32
    result would; it is doubled for the float32 inputs' own rounding. Without them: within 1e-5 of
    the largest |ref|. Either way a single wrong tile or element fails."""
    err = (out.detach().double() - ref64.detach().double()).abs()
    if err.numel() == 0:
        return
    atol = rounding_atol(ref64, torch.float32)
    if magnitude64 is None:
        bound = 1e-5 * float(ref64.detach().double().abs().max()) + atol
        worst = float(err.max())
        assert worst <= bound, f"{what}: float32 max abs err {worst:.3g} > 1e-5 x max |ref| + atol = {bound:.3g}"
        return
    nu = depth * FP32_UNIT_ROUNDOFF
    gamma = nu / (1 - nu)
    bound = 2 * gamma * magnitude64.detach().double() + atol
    excess = err - bound
    worst = int(excess.argmax())
    assert float(excess.flatten()[worst]) <= 0, (
        f"{what}: float32 err {float(err.flatten()[worst]):.3g} at flat index {worst} exceeds the a-priori bound "
        f"{float(bound.flatten()[worst]):.3g} (depth {depth})"
    )


def assert_lowp_close(out, ref64, torch_same_dtype, what="", magnitude64=None, depth=None):
    """docs/design.md section 11: float32 within 1e-5 of the float64 reference, normwise, and
    elementwise within an a-priori bound that no machine changes (:func:`assert_fp32_bounded`);
    float16/bfloat16 within 2e-2 and at most 2x PyTorch's own error at that dtype (plus a small
    atol), normwise and elementwise (:func:`assert_maxabs_close`) whenever PyTorch's result in the
    same dtype is given."""
    err = rel_err(out, ref64)
    if out.dtype == torch.float32:
        assert err < 1e-5, f"{what}: float32 rel err {err:.3g}"
        assert_fp32_bounded(out, ref64, magnitude64, depth, what)
        return
    if torch_same_dtype is not None:
        assert_maxabs_close(out, ref64, torch_same_dtype, what)
    torch_err = rel_err(torch_same_dtype, ref64)
    assert err < 2e-2, f"{what}: {out.dtype} rel err {err:.3g}"
    assert err <= 2 * torch_err + 1e-4, f"{what}: rel err {err:.3g} vs PyTorch's own {torch_err:.3g}"


def float_bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor, to compare bit for bit (-0.0 and 0.0 differ)."""
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


# ---------------------------------------------------------------------------- optional extras
def bitsandbytes():
    """bitsandbytes (the test extra), or a skip where it is not installed; under CI, which installs
    the extra, a missing bitsandbytes is a failure."""
    if os.environ.get("CI"):
        import bitsandbytes as bnb

        return bnb
    return pytest.importorskip("bitsandbytes")


# ---------------------------------------------------------------------------- a toy stack: x_{n+1} = tanh(y_n)
class ToyStack(nn.Module):
    def __init__(
        self,
        length,
        features,
        mode,
        pre_num=1,
        rank=4,
        alpha=8.0,
        dropout=0.0,
        bias=True,
        dtype=torch.float64,
        device="cpu",
        norm_window=100,
        checkpoint=None,
        autocast_adapter_dtype=False,
    ):
        """``checkpoint``: None, or ``"non-reentrant"`` / ``"reentrant"`` to recompute each block
        (with its tanh) in backward through ``torch.utils.checkpoint``. The adapters are in ``dtype``
        (``autocast_adapter_dtype=False``): the backends are checked at each dtype."""
        super().__init__()
        self.checkpoint = checkpoint
        self.blocks = nn.ModuleList(
            FusedResLoRALinear(
                features,
                features,
                bias=bias,
                dtype=dtype,
                device=device,
                rank=rank,
                alpha=alpha,
                dropout=dropout,
                mode=mode,
                pre_num=pre_num,
                norm_window=norm_window,
                autocast_adapter_dtype=autocast_adapter_dtype,
            )
            for _ in range(length)
        )
        with torch.no_grad():
            for block in self.blocks:  # B = 0 at init would hide every LoRA gradient but dB
                block.lora_B.normal_(0.0, 0.3)
                if block.bias is not None:
                    block.bias.normal_(0.0, 0.1)
        if mode != "none":
            link_chain(list(self.blocks), name="toy", block_names=[f"blocks.{i}" for i in range(length)], model=self)

    def forward(self, x):
        ys = []
        for block in self.blocks:
            if self.checkpoint is None:
                y = block(x)
            else:
                reentrant = self.checkpoint == "reentrant"
                y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=reentrant)
            ys.append(y)
            x = torch.tanh(y)
        return ys


def oracle_params(model: ToyStack):
    """Leaf float64 copies of (W, b, A, B) per block, A and B requiring grad."""
    params = []
    for block in model.blocks:
        bias = None if block.bias is None else block.bias.detach().double().clone()
        params.append(
            (
                block.weight.detach().double().clone(),
                bias,
                block.lora_A.detach().double().clone().requires_grad_(),
                block.lora_B.detach().double().clone().requires_grad_(),
            )
        )
    return params


class SeedRecorder:
    """Replaces functional.draw_dropout_seed with a counter and remembers the seeds it handed out."""

    def __init__(self, monkeypatch, start=1234):
        self.seeds = []
        counter = itertools.count(start)

        def draw(device="cpu"):
            seed = next(counter)
            self.seeds.append(seed)
            return seed

        monkeypatch.setattr(functional, "draw_dropout_seed", draw)


# ---------------------------------------------------------------------------- a tiny Llama, against the oracle
def tiny_llama(dtype=torch.float64, layers=3):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_adapters(model):
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, FusedResLoRALinear):
                mod.lora_A.normal_(0.0, 0.2)
                mod.lora_B.normal_(0.0, 0.2)


def oracle_model(base, model, config):
    """``base`` (a plain copy) with forward hooks that compute every target Linear's output from
    the oracle formulas, with leaf copies of ``model``'s adapters. Chains are grouped here by
    replacing layer indices with '*', independently of the package."""
    groups = {}
    for name, mod in model.named_modules():
        if isinstance(mod, FusedResLoRALinear):
            groups.setdefault(re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name), []).append((name, mod))
    leaves = {}
    for members in groups.values():
        params = []
        for name, mod in members:
            A = mod.lora_A.detach().clone().requires_grad_()
            B = mod.lora_B.detach().clone().requires_grad_()
            leaves[name] = (A, B)
            linear = base.get_submodule(name)
            # A Conv1D base (GPT-2) stores its weight [in, out]; the formulas take [out, in].
            weight = linear.weight if isinstance(linear, nn.Linear) else linear.weight.t()
            params.append((weight, linear.bias, A, B))
        state = {"xs": [], "zs": []}
        for n, (name, _) in enumerate(members):

            def hook(mod, args, out, n=n, params=params, state=state):
                if n == 0:
                    state["xs"].clear()
                    state["zs"].clear()
                state["xs"].append(args[0])
                return block_output(
                    n, state["xs"], params, config.alpha / config.rank, config.mode, config.pre_num, zs=state["zs"]
                )

            base.get_submodule(name).register_forward_hook(hook)
    return leaves


def check_against_oracle(build, targets, mode, pre_num, embed):
    base = build()
    model = copy.deepcopy(base)
    config = ResLoRAConfig(mode=mode, rank=4, alpha=8, pre_num=pre_num, target_modules=targets)
    apply_reslora(model, config)
    randomize_adapters(model)
    leaves = oracle_model(base, model, config)

    ids = torch.randint(0, 64, (2, 7))
    emb = embed(model)(ids).detach().requires_grad_()
    emb_ref = emb.detach().clone().requires_grad_()
    # Every tensor output (BERT's pooler output too, so the pooler's adapter gets gradient).
    outs = [t for t in model(inputs_embeds=emb).to_tuple() if isinstance(t, torch.Tensor)]
    outs_ref = [t for t in base(inputs_embeds=emb_ref).to_tuple() if isinstance(t, torch.Tensor)]
    probes = [torch.randn_like(t) for t in outs]
    sum((t * w).sum() for t, w in zip(outs, probes)).backward()
    sum((t * w).sum() for t, w in zip(outs_ref, probes)).backward()

    for out, out_ref in zip(outs, outs_ref, strict=True):
        assert rel_err(out, out_ref) < 1e-10
    assert rel_err(emb.grad, emb_ref.grad) < 1e-10
    for name, (A_ref, B_ref) in leaves.items():
        layer = model.get_submodule(name)
        assert rel_err(layer.lora_A.grad, A_ref.grad) < 1e-10, name
        assert rel_err(layer.lora_B.grad, B_ref.grad) < 1e-10, name


# ---------------------------------------------------------------------------- a plain model
class Net(nn.Module):
    """Three layers of (proj, out) Linears and an untouched head."""

    def __init__(self, layers=3, features=6, dtype=torch.float64):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"proj": nn.Linear(features, features), "out": nn.Linear(features, features)})
            for _ in range(layers)
        )
        self.head = nn.Linear(features, 2)
        self.to(dtype)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer["out"](layer["proj"](x)))
        return self.head(x)


def poison_empty_like(monkeypatch):
    """Every torch.empty_like comes back full of NaN (floats) or -1 (ints): what ``to_empty``
    materialises from the meta device, poisoned. Only empty_like (conftest's ``poison_empty`` also
    patches torch.empty, and then ``torch.device("meta")`` no longer reaches ``nn.Linear``'s
    parameters: build on meta first, then poison)."""
    empty_like = torch.empty_like

    def poisoned(*args, **kwargs):
        out = empty_like(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -1) if out.numel() else out

    monkeypatch.setattr(torch, "empty_like", poisoned)
