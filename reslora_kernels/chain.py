"""Cross-layer links: which block precedes which, and what a block hands to its successors.

A chain is the ordered list of blocks 0..L-1 that share one target (every ``q_proj`` of a model,
in model order) and one (in, out) shape. Within one forward pass, block ``n`` reads from its
predecessors what its mode needs (DESIGN.md section 2):

* ``is``: the input ``x_{n-1}`` of block ``n-1`` (block 0 uses its own input);
* ``bs``: the parameters ``A``, ``B`` of up to ``pre_num`` previous blocks (no activations);
* ``ms``: the down-projections ``z`` of up to ``pre_num`` previous blocks, from this pass.

The stash that carries activations forward only ever holds the current pass: block 0 starts a
pass and clears it, each block takes what it needs, and the last block leaves it empty, so no
activation outlives its pass. Blocks of ``is``/``ms`` chains must run in chain order once per
pass; anything else (a layer skipped, run twice, or recomputed alone by gradient checkpointing)
raises :class:`ChainOrderError` instead of silently reading a stale activation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

import torch

if TYPE_CHECKING:
    from .layer import FusedResLoRALinear

__all__ = ["ChainOrderError", "ResLoRAChain", "link_chain"]


class ChainOrderError(RuntimeError):
    """A block of an ``is``/``ms`` chain ran out of chain order."""


class ResLoRAChain:
    """Blocks linked by ResLoRA shortcuts, in forward order. Build with :func:`link_chain`."""

    def __init__(
        self,
        blocks: Sequence["FusedResLoRALinear"],
        name: str | None = None,
        block_names: Sequence[str] | None = None,
    ) -> None:
        from .layer import FusedResLoRALinear

        blocks = list(blocks)
        if not blocks:
            raise ValueError("a chain needs at least one block")
        if block_names is None:
            block_names = [f"block {i}" for i in range(len(blocks))]
        block_names = list(block_names)
        if len(block_names) != len(blocks):
            raise ValueError(f"got {len(block_names)} block names for {len(blocks)} blocks")
        seen: set[int] = set()
        for i, block in enumerate(blocks):
            if not isinstance(block, FusedResLoRALinear):
                raise TypeError(f"{block_names[i]} is a {type(block).__name__}, not a FusedResLoRALinear")
            if id(block) in seen:
                raise ValueError(f"{block_names[i]} appears twice in the chain")
            seen.add(id(block))
            if len(blocks) > 1 and len(block.chain) > 1:
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
        self.name = name
        self.blocks = blocks
        self.block_names = block_names
        self.mode = first.mode
        self.pre_num = first.pre_num
        for i, block in enumerate(blocks):
            block._chain = self
            block._chain_index = i
        self.reset()

    # ------------------------------------------------------------------ container protocol
    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator["FusedResLoRALinear"]:
        return iter(self.blocks)

    def __getitem__(self, index: int) -> "FusedResLoRALinear":
        return self.blocks[index]

    def __repr__(self) -> str:
        return f"ResLoRAChain(name={self.name!r}, mode={self.mode!r}, pre_num={self.pre_num}, blocks={len(self)})"

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Drop the per-pass stash (what a pass that stopped half-way left behind)."""
        self._last_index: int | None = None
        self._x_stash: torch.Tensor | None = None  # is: input of the last block that ran
        self._z_window: list[torch.Tensor] = []  # ms, pre_num >= 1: the last pre_num z's
        self._z_sum: torch.Tensor | None = None  # ms, pre_num == -1: sum of every z so far

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

    # ------------------------------------------------------------------ the forward protocol
    def shortcut_inputs(
        self, block: "FusedResLoRALinear", x: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``(x_prev, z_prev, lora_A, lora_B)`` for block ``block`` about to run on ``x``."""
        index = block._chain_index
        if self.mode == "bs":
            span = [self.blocks[j] for j in self.span(index)]
            if len(span) == 1:
                return None, None, block.lora_A, block.lora_B
            # Blocks may sit on different devices (pipeline-split models): bring them to x's.
            lora_A = torch.cat([b.lora_A.to(x.device) for b in span], dim=0)
            lora_B = torch.cat([b.lora_B.to(x.device) for b in span], dim=1)
            return None, None, lora_A, lora_B
        if self.mode not in ("is", "ms"):
            return None, None, block.lora_A, block.lora_B

        if index == 0:
            self.reset()
        elif self._last_index != index - 1:
            ran = "no block" if self._last_index is None else self.block_names[self._last_index]
            raise ChainOrderError(
                f"{self.block_names[index]} (block {index} of chain {self.name!r}, mode {self.mode!r}) ran after "
                f"{ran} in this pass; its blocks must run in chain order, once each per forward pass "
                "(gradient checkpointing that recomputes layers one by one cannot be used with is/ms chains)"
            )
        if self.mode == "is":
            x_prev = x if index == 0 else self._x_stash.to(x.device)
            self._x_stash = None
            return x_prev, None, block.lora_A, block.lora_B
        if self.pre_num == -1:
            z_prev = self._z_sum
        else:
            z_prev = None
            for z in self._z_window:
                z_prev = z if z_prev is None else z_prev + z
        return None, None if z_prev is None else z_prev.to(x.device), block.lora_A, block.lora_B

    def after_forward(self, block: "FusedResLoRALinear", x: torch.Tensor, z: torch.Tensor) -> None:
        """Stash what the successor of ``block`` needs; the last block leaves nothing behind."""
        if self.mode not in ("is", "ms"):
            return
        index = block._chain_index
        if index == len(self.blocks) - 1:
            self.reset()
            return
        self._last_index = index
        if self.mode == "is":
            self._x_stash = x
        elif self.pre_num == -1:
            self._z_sum = z if self._z_sum is None else self._z_sum.to(z.device) + z
        else:
            self._z_window.append(z)
            del self._z_window[: -self.pre_num]


def link_chain(
    blocks: Sequence["FusedResLoRALinear"], name: str | None = None, block_names: Sequence[str] | None = None
) -> ResLoRAChain:
    """Link ``blocks`` (in forward order) into one ResLoRA chain and return it.

    Every block must have the same (in, out) shape, mode, pre_num, rank and scaling, and must not
    already belong to another chain of more than one block. ``block_names`` only serve error
    messages. :func:`reslora_kernels.apply_reslora` calls this for every target of a model.
    """
    return ResLoRAChain(blocks, name=name, block_names=block_names)
