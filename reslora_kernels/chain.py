"""Cross-layer links: which block precedes which, and what a block hands to its successors.

A chain is the ordered list of blocks 0..L-1 that share one target (every ``q_proj`` of a model,
in model order) and one (in, out) shape. Within one forward pass, block ``n`` reads from its
predecessors what its mode needs (docs/design.md, "Semantics"):

* ``is``: the input ``x_{n-1}`` of block ``n-1`` (block 0 uses its own input);
* ``bs``: the parameters ``A``, ``B`` of up to ``pre_num`` previous blocks (no activations);
* ``ms``: the down-projections ``z`` of up to ``pre_num`` previous blocks, from this pass.

Which pass a block belongs to (an eager forward, a recomputation under gradient checkpointing, a
compiled forward) is kept by :mod:`reslora_kernels.passes`, one class per kind of pass; an
``is``/``ms`` block whose predecessor did not write in its pass raises :class:`ChainOrderError`.
The chain knows its blocks only through the small :class:`ChainBlock` protocol.
"""

from __future__ import annotations

import warnings
from typing import Iterator, Protocol, Sequence

import torch

from .passes import CompiledPass, EagerPasses, Pass, RecomputedPasses, in_backward, track_passes

__all__ = ["ResLoRAChain", "link_chain"]


class ChainBlock(Protocol):
    """What a chain needs of a block (``FusedResLoRALinear`` provides it): its shape and settings,
    its adapter, and the two slots the chain assigns."""

    in_features: int
    out_features: int
    mode: str
    pre_num: int
    rank: int
    scaling: float
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    training: bool
    _chain: "ResLoRAChain"
    _chain_index: int


# What ResLoRAChain checks a block has (the slots _chain/_chain_index it assigns itself).
_BLOCK_ATTRIBUTES = ("in_features", "out_features", "mode", "pre_num", "rank", "scaling", "lora_A", "lora_B")


def _check_links(blocks: list[ChainBlock], block_names: list[str]) -> None:
    """Raise unless ``blocks`` can form one chain: each a block, once, in no other chain, of one
    shape and one mode, pre_num, rank and scaling; two or more only for a shortcut mode."""
    seen: set[int] = set()
    for i, block in enumerate(blocks):
        if not all(hasattr(block, attr) for attr in _BLOCK_ATTRIBUTES):
            raise TypeError(f"{block_names[i]} is a {type(block).__name__}, not a FusedResLoRALinear")
        if id(block) in seen:
            raise ValueError(f"{block_names[i]} appears twice in the chain")
        seen.add(id(block))
        if len(blocks) > 1 and len(block._chain) > 1:
            raise ValueError(
                f"{block_names[i]} is already linked into chain {block.chain.name!r}; "
                "call .unlink() on that chain first"
            )
    first = blocks[0]
    for i in range(1, len(blocks)):
        prev, block = blocks[i - 1], blocks[i]
        if (block.in_features, block.out_features) != (prev.in_features, prev.out_features):
            raise ValueError(
                f"cannot link {block_names[i]} (in={block.in_features}, out={block.out_features}) after "
                f"{block_names[i - 1]} (in={prev.in_features}, out={prev.out_features}): "
                "blocks of one chain need the same shape"
            )
        for attr in ("mode", "pre_num", "rank", "scaling"):
            if getattr(block, attr) != getattr(first, attr):
                raise ValueError(
                    f"cannot link {block_names[i]} ({attr}={getattr(block, attr)!r}) with "
                    f"{block_names[0]} ({attr}={getattr(first, attr)!r}): blocks of one chain share "
                    "mode, pre_num, rank and scaling"
                )
    if len(blocks) > 1 and first.mode == "none":
        raise ValueError("mode 'none' (plain LoRA) has no shortcuts to link; use mode is, bs or ms")


class ResLoRAChain:
    """Blocks linked by ResLoRA shortcuts, in forward order. Build with :func:`link_chain`."""

    def __init__(
        self,
        blocks: Sequence[ChainBlock],
        name: str | None = None,
        block_names: Sequence[str] | None = None,
    ) -> None:
        blocks = list(blocks)
        if not blocks:
            raise ValueError("a chain needs at least one block")
        if block_names is None:
            block_names = [f"block {i}" for i in range(len(blocks))]
        block_names = list(block_names)
        if len(block_names) != len(blocks):
            raise ValueError(f"got {len(block_names)} block names for {len(blocks)} blocks")
        _check_links(blocks, block_names)
        self.name = name
        self.blocks = blocks
        self.block_names = block_names
        self.mode = blocks[0].mode
        self.pre_num = blocks[0].pre_num
        self._tracker = None  # the model's pass tracker (passes.track_passes)
        self._new_pass_state()
        for i, block in enumerate(blocks):
            block._chain = self
            block._chain_index = i

    def _new_pass_state(self) -> None:
        self._recomputed = RecomputedPasses(self)
        self._eager = EagerPasses(self, self._recomputed)
        self._compiled = CompiledPass(self)

    # ------------------------------------------------------------------ container protocol
    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator[ChainBlock]:
        return iter(self.blocks)

    def __getitem__(self, index: int) -> ChainBlock:
        return self.blocks[index]

    def __repr__(self) -> str:
        return f"ResLoRAChain(name={self.name!r}, mode={self.mode!r}, pre_num={self.pre_num}, blocks={len(self)})"

    def __getstate__(self):
        # copy.deepcopy / pickle of a model: locks, thread-local and weak state are per object and
        # not copyable; a copy starts with no pass open.
        state = self.__dict__.copy()
        for key in ("_recomputed", "_eager", "_compiled"):
            state.pop(key)
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._new_pass_state()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Close the calling thread's open pass (what a forward that stopped half-way left)."""
        self._eager.close()
        self._compiled.clear()

    def end_pass(self) -> None:
        """The model's forward returned or raised: no block of this call will run any more. A pass
        that autograd may still recompute stays referenced by the graph, not by the chain."""
        self._eager.close()

    def unlink(self) -> None:
        """Give every block a chain of its own again (each then behaves as a first block)."""
        for block in self.blocks:
            ResLoRAChain([block])
        self.blocks = []
        self.block_names = []
        self.reset()

    def span(self, index: int) -> range:
        """Indices of the blocks block ``index`` sums over in ``bs``/``ms``: itself first, then
        up to ``pre_num`` predecessors (all of them for ``pre_num == -1``)."""
        depth = index if self.pre_num == -1 else min(self.pre_num, index)
        return range(index, index - depth - 1, -1)

    def describe(self, index: int) -> str:
        """Block ``index`` for error messages: its name, position, chain and mode."""
        return f"{self.block_names[index]} (block {index} of chain {self.name!r}, mode {self.mode!r})"

    # ------------------------------------------------------------------ the forward protocol
    def _passes(self) -> EagerPasses | RecomputedPasses | CompiledPass:
        """The kind of pass running now. Compilation is asked first: Dynamo must trace no
        thread-local state and no graph-task query."""
        if torch.compiler.is_compiling():
            return self._compiled
        if in_backward():
            return self._recomputed
        return self._eager

    def shortcut_inputs(
        self, block: ChainBlock, x: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``(x_prev, z_prev, lora_A, lora_B)`` for block ``block`` about to run on ``x``."""
        index = block._chain_index
        if self.mode == "bs":
            span = [self.blocks[j] for j in self.span(index)]
            if len(span) == 1:
                return None, None, block.lora_A, block.lora_B
            if not torch.compiler.is_compiling():
                self._check_unsharded(index, span)
            # Blocks may sit on different devices (pipeline-split models): bring them to x's.
            lora_A = torch.cat([b.lora_A.to(x.device) for b in span], dim=0)
            lora_B = torch.cat([b.lora_B.to(x.device) for b in span], dim=1)
            return None, None, lora_A, lora_B
        if self.mode not in ("is", "ms"):
            return None, None, block.lora_A, block.lora_B
        current = self._passes().join(index, block.training)
        if self.mode == "is":
            x_prev = x if index == 0 else current.records[index - 1].to(x.device)
            return x_prev, None, block.lora_A, block.lora_B
        if index == 0:
            return None, None, block.lora_A, block.lora_B
        if self.pre_num == -1:
            z_prev = current.records[index - 1]  # the running sum z_0 + ... + z_{n-1}
        else:
            z_prev = None
            for j in list(self.span(index))[1:]:
                z = current.records[j].to(x.device)
                z_prev = z if z_prev is None else z_prev + z
        return None, z_prev.to(x.device), block.lora_A, block.lora_B

    def _check_unsharded(self, index: int, span: list[ChainBlock]) -> None:
        """Raise unless every adapter ``bs`` block ``index`` sums over is whole here: FSDP (with
        ``use_orig_params``) leaves a resharded block's parameters as flat shards, FSDP2 as DTensors,
        once that block's own unit has run its forward."""
        resharded = [
            self.block_names[j]
            for j, b in zip(self.span(index), span)
            if _sharded(b.lora_A, (b.rank, b.in_features)) or _sharded(b.lora_B, (b.out_features, b.rank))
        ]
        if resharded:
            raise RuntimeError(
                f"{self.describe(index)} sums the adapters of {', '.join(resharded)}, which FSDP has resharded "
                "after their own forward: mode 'bs' reads earlier blocks' parameters, so it cannot run with the "
                "blocks of one chain in different FSDP/FSDP2 units (per-layer wrapping). Put the whole chain in one "
                "unit (e.g. fully_shard(model) alone, or FSDP without an auto_wrap_policy), train with DDP, or use "
                "mode 'is' or 'ms', which read this pass's activations instead"
            )

    def record(self, current: Pass, index: int, x: torch.Tensor, z: torch.Tensor) -> None:
        """What block ``index`` leaves for its successors in ``current``: its input (is), its ``z``
        (ms), or the running sum of every ``z`` so far (ms, ``pre_num = -1``)."""
        if self.mode == "is":
            current.records[index] = x
        elif self.pre_num == -1 and index > 0:
            current.records[index] = current.records[index - 1].to(z.device) + z
        else:
            current.records[index] = z

    def after_forward(self, block: ChainBlock, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> None:
        """Record what the successors of ``block`` need from this pass; ``y`` is the block's output,
        whose autograd graph keeps the pass for recomputation while backward may need it."""
        if self.mode in ("is", "ms"):
            self._passes().finish(block._chain_index, x, z, y)


def _sharded(param: torch.Tensor, shape: tuple[int, int]) -> bool:
    """Whether ``param`` (of a block's logical ``shape``) is held by FSDP as a shard, not whole: an
    FSDP2 DTensor, an FSDP flat shard (another shape), or a view whose storage was freed."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(param, DTensor):
            return True
    return tuple(param.shape) != shape or (param.numel() > 0 and param.untyped_storage().size() == 0)


def link_chain(
    blocks: Sequence[ChainBlock],
    name: str | None = None,
    block_names: Sequence[str] | None = None,
    *,
    model: torch.nn.Module | None = None,
) -> ResLoRAChain:
    """Link ``blocks`` (in forward order) into one ResLoRA chain and return it.

    Every block must have the same (in, out) shape, mode, pre_num, rank and scaling, and must not
    already belong to another chain of more than one block. ``block_names`` serve error messages.
    ``model``, the module whose forward runs the blocks, ends the chain's passes when its forward
    returns (:func:`reslora_kernels.passes.track_passes`): pass it so that a skipped block is always
    detected. :func:`reslora_kernels.apply_reslora` calls this for every target of a model.
    """
    chain = ResLoRAChain(blocks, name=name, block_names=block_names)
    if model is not None:
        track_passes(model, [chain])
    elif chain.mode in ("is", "ms") and len(chain) > 1:
        warnings.warn(
            f"link_chain({name!r}) without model=: a pass of this chain then only ends when its last block runs, "
            "so a skipped first block (LayerDrop) in a later call cannot be told from a continuing pass. Pass "
            "model=<the module whose forward runs the blocks> (apply_reslora does)",
            stacklevel=2,
        )
    return chain
