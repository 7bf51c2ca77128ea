"""Cross-layer links: which block precedes which, and what a block hands to its successors.

A chain is the ordered list of blocks 0..L-1 that share one target (every ``q_proj`` of a model,
in model order) and one (in, out) shape. Within one forward pass, block ``n`` reads from its
predecessors what its mode needs (docs/design.md, "Semantics"):

* ``is``: the input ``x_{n-1}`` of block ``n-1`` (block 0 uses its own input);
* ``bs``: the parameters ``A``, ``B`` of up to ``pre_num`` previous blocks (no activations);
* ``ms``: the down-projections ``z`` of up to ``pre_num`` previous blocks, from this pass.

**Passes.** An ``is``/``ms`` block only ever reads what its direct predecessor wrote in the same
forward pass, or raises :class:`ChainOrderError` naming both modules. A pass of a chain begins
when its block 0 runs and belongs to the thread that runs it (concurrent passes on one model, from
several threads, never see each other's activations). When the chain is attached to its model
(:func:`track_passes`, which :func:`reslora_kernels.apply_reslora` does), a pass also ends when
the model's forward returns or raises, so a block whose predecessor was skipped in this call of
the model (LayerDrop) raises instead of reading an earlier call's activation. A skipped block of
an ``is``/``ms`` chain is therefore always an error; ``bs`` reads only parameters and tolerates it.

**Gradient checkpointing** (non-reentrant) recomputes blocks during backward, one segment at a
time and in reverse order. A recomputed block reads what its predecessor wrote in the original
forward: the chain keeps, per pass that autograd may still need, the input of every block (is)
or its ``[M, r]`` down-projection (ms), owned by the autograd graph of the chain's last block
(freed with it), and released as soon as backward has passed block 0. Reentrant checkpointing
cannot carry the shortcut's gradient across segments and raises at the first checkpointed call.

Under ``torch.compile`` the chain keeps its state in plain attributes that Dynamo traces (no
thread-local state, no graph hooks: compiled checkpointing does not re-run Python).
"""

from __future__ import annotations

import itertools
import sys
import threading
import warnings
import weakref
from typing import Iterator, Protocol, Sequence

import torch

__all__ = ["ChainOrderError", "ResLoRAChain", "link_chain", "track_passes", "untrack_passes"]


class ChainBlock(Protocol):
    """What a chain needs of a block (``FusedResLoRALinear`` and its Conv1D variant provide it):
    its shape and settings, its adapter, and the two slots the chain assigns."""

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


class ChainOrderError(RuntimeError):
    """A block of an ``is``/``ms`` chain ran without its predecessor's output of the same pass."""


def _in_backward() -> bool:
    # What torch.utils.checkpoint itself uses to know it is recomputing: the id of the graph task
    # the current thread executes, -1 outside backward.
    return torch._C._current_graph_task_id() != -1


def _in_reentrant_checkpoint() -> bool:
    """Whether a reentrant ``torch.utils.checkpoint`` forward is on the stack (it runs its
    function under ``no_grad``, so this is only asked when grad is off)."""
    from torch.utils.checkpoint import CheckpointFunction

    code = CheckpointFunction.forward.__code__
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


class _Pass:
    """What the blocks of one chain wrote in one forward pass: ``records[n]`` is block n's input
    (is) or down-projection (ms)."""

    __slots__ = ("records", "last_index", "model_pass", "released", "__weakref__")

    def __init__(self, model_pass: int | None) -> None:
        self.records: dict[int, torch.Tensor] = {}
        self.last_index = 0
        self.model_pass = model_pass
        self.released = False

    def release(self) -> None:
        self.records.clear()
        self.released = True


def _releaser(ref: weakref.ref):
    """A node hook releasing the pass ``ref`` points to, if it is still alive."""

    def hook(grad_inputs, grad_outputs) -> None:
        current = ref()
        if current is not None:
            current.release()

    return hook


class _PassTracker:
    """Numbers the calls of one model's forward, per thread, and ends the chains' passes when a
    call returns or raises. Installed by :func:`track_passes`."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.chains: weakref.WeakSet[ResLoRAChain] = weakref.WeakSet()
        self._local = threading.local()

    def __getstate__(self):
        # deepcopy / pickle of the model: the chains and hook handles are copied with it (through
        # the memo), the per-thread call state is not.
        return {"chains": list(self.chains), "handles": self.handles}

    def __setstate__(self, state) -> None:
        self.chains = weakref.WeakSet(state["chains"])
        self.handles = state["handles"]
        self._local = threading.local()

    def current(self) -> int | None:
        """The id of this thread's current call of the model's forward (None outside one)."""
        return getattr(self._local, "pass_id", None)

    def enter(self, module, args) -> None:
        if torch.compiler.is_compiling():
            return
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            self._local.pass_id = next(self._ids)
        self._local.depth = depth + 1

    def exit(self, module, args, output) -> None:
        if torch.compiler.is_compiling():
            return
        self._local.depth = getattr(self._local, "depth", 1) - 1
        if self._local.depth == 0:
            self._local.pass_id = None
            for chain in list(self.chains):
                chain._end_pass()


def track_passes(model: torch.nn.Module, chains: Sequence[ResLoRAChain] = ()) -> None:
    """Attach ``chains`` to ``model`` so that their passes end when a call of ``model``'s forward
    returns or raises: a block whose predecessor did not run in this call then raises
    :class:`ChainOrderError`, and nothing of an interrupted forward stays referenced.
    :func:`reslora_kernels.apply_reslora` calls this; call it for chains linked by hand."""
    tracker = getattr(model, "_reslora_pass_tracker", None)
    if tracker is None:
        tracker = _PassTracker()
        tracker.handles = [
            model.register_forward_pre_hook(tracker.enter),
            model.register_forward_hook(tracker.exit, always_call=True),
        ]
        # Not a submodule, buffer or parameter: invisible to state_dict and .to().
        object.__setattr__(model, "_reslora_pass_tracker", tracker)
    for chain in chains:
        chain._tracker = tracker
        tracker.chains.add(chain)


def untrack_passes(model: torch.nn.Module) -> list[ResLoRAChain]:
    """Undo :func:`track_passes`: remove the hooks from ``model`` and detach its chains (returned)."""
    tracker = model.__dict__.pop("_reslora_pass_tracker", None)
    if tracker is None:
        return []
    for handle in tracker.handles:
        handle.remove()
    chains = list(tracker.chains)
    for chain in chains:
        chain._tracker = None
    return chains


class ResLoRAChain:
    """Blocks linked by ResLoRA shortcuts, in forward order. Build with :func:`link_chain`."""

    def __init__(
        self,
        blocks: Sequence["ChainBlock"],
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
        self.name = name
        self.blocks = blocks
        self.block_names = block_names
        self.mode = first.mode
        self.pre_num = first.pre_num
        self._tracker: _PassTracker | None = None
        self._local = threading.local()  # .current: this thread's open _Pass
        self._lock = threading.Lock()
        self._awaiting_backward: weakref.WeakSet[_Pass] = weakref.WeakSet()
        self._compiled = _Pass(None)  # the state torch.compile traces
        self._compiled.last_index = None
        for i, block in enumerate(blocks):
            block._chain = self
            block._chain_index = i

    # ------------------------------------------------------------------ container protocol
    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator["ChainBlock"]:
        return iter(self.blocks)

    def __getitem__(self, index: int) -> "ChainBlock":
        return self.blocks[index]

    def __repr__(self) -> str:
        return f"ResLoRAChain(name={self.name!r}, mode={self.mode!r}, pre_num={self.pre_num}, blocks={len(self)})"

    def __getstate__(self):
        # copy.deepcopy / pickle of a model: locks, thread-local and weak state are per object and
        # not copyable; a copy starts with no pass open.
        state = self.__dict__.copy()
        for key in ("_local", "_lock", "_awaiting_backward", "_compiled"):
            state.pop(key)
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._awaiting_backward = weakref.WeakSet()
        self._compiled = _Pass(None)
        self._compiled.last_index = None

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Close the calling thread's open pass (what a forward that stopped half-way left)."""
        self._local.current = None
        self._compiled.records.clear()
        self._compiled.last_index = None

    def _end_pass(self) -> None:
        # The model's forward returned or raised: no block of this call will run any more. A pass
        # that autograd may still recompute stays referenced by the graph, not by the chain.
        self._local.current = None

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

    def _describe(self, index: int) -> str:
        return f"{self.block_names[index]} (block {index} of chain {self.name!r}, mode {self.mode!r})"

    # ------------------------------------------------------------------ the forward protocol
    def shortcut_inputs(
        self, block: "ChainBlock", x: torch.Tensor
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
        if torch.compiler.is_compiling():
            return self._shortcuts_from(self._compiled_pass(index), block, x)
        if _in_backward():
            return self._shortcuts_from(self._recomputed_pass(index), block, x)
        if not torch.is_grad_enabled() and block.training and _in_reentrant_checkpoint():
            raise RuntimeError(
                f"{self._describe(index)} runs under reentrant gradient checkpointing, which cannot carry the "
                "shortcut's gradient from one checkpointed segment to the previous one. Use non-reentrant "
                "checkpointing: torch.utils.checkpoint.checkpoint(..., use_reentrant=False), or with "
                "transformers model.gradient_checkpointing_enable("
                'gradient_checkpointing_kwargs={"use_reentrant": False})'
            )
        return self._shortcuts_from(self._forward_pass(index), block, x)

    def _forward_pass(self, index: int) -> _Pass:
        """This thread's pass that block ``index`` joins, checked: its predecessor ran last in it."""
        tracker = self._tracker
        model_pass = tracker.current() if tracker is not None else None
        if index == 0:
            current = self._local.current = _Pass(model_pass)
            return current
        current = getattr(self._local, "current", None)
        if current is None or (model_pass is not None and current.model_pass != model_pass):
            raise ChainOrderError(
                f"{self._describe(index)} ran, but its predecessor {self.block_names[index - 1]} did not run "
                "before it in this forward pass (a skipped layer, e.g. LayerDrop, or a block called on its "
                f"own): mode {self.mode!r} needs every block of a chain to run, in order, once per pass"
            )
        if current.last_index != index - 1:
            raise ChainOrderError(
                f"{self._describe(index)} ran after {self.block_names[current.last_index]} in this forward pass; "
                f"its predecessor is {self.block_names[index - 1]}: the blocks of a chain must run in chain "
                "order, once each per pass"
            )
        return current

    def _recomputed_pass(self, index: int) -> _Pass:
        """The pass a block recomputed by gradient checkpointing belongs to."""
        if index == 0:
            return _Pass(None)  # block 0 reads nothing from its chain
        with self._lock:
            candidates = [p for p in self._awaiting_backward if not p.released and p.last_index >= index]
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise ChainOrderError(
                f"{self._describe(index)} is recomputed in backward (gradient checkpointing), but the forward pass "
                "it belongs to kept no activations: was it run under no_grad or reentrant checkpointing? Use "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False)"
            )
        raise ChainOrderError(
            f"{self._describe(index)} is recomputed in backward (gradient checkpointing) while {len(candidates)} "
            "forward passes of its chain await backward, and ResLoRA cannot tell which one it belongs to: with "
            "gradient checkpointing, run backward after each forward (or use mode 'bs')"
        )

    def _compiled_pass(self, index: int) -> _Pass:
        state = self._compiled
        if index == 0:
            state.records.clear()
        elif state.last_index != index - 1:
            raise ChainOrderError(
                f"{self._describe(index)} ran without its predecessor {self.block_names[index - 1]} running just "
                "before it in this compiled forward pass"
            )
        return state

    def _shortcuts_from(self, current: _Pass, block: "ChainBlock", x: torch.Tensor):
        index = block._chain_index
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

    def _record(self, current: _Pass, index: int, x: torch.Tensor, z: torch.Tensor) -> None:
        """What block ``index`` leaves for its successors: its input (is), its ``z`` (ms), or the
        running sum of every ``z`` so far (ms, ``pre_num = -1``)."""
        if self.mode == "is":
            current.records[index] = x
        elif self.pre_num == -1 and index > 0:
            current.records[index] = current.records[index - 1].to(z.device) + z
        else:
            current.records[index] = z

    def after_forward(self, block: "ChainBlock", x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> None:
        """Record what the successors of ``block`` need from this pass; ``y`` is the block's output,
        whose autograd graph keeps the pass for recomputation while backward may need it."""
        if self.mode not in ("is", "ms"):
            return
        index = block._chain_index
        last = index == len(self.blocks) - 1
        if torch.compiler.is_compiling():
            state = self._compiled
            if last:
                state.records.clear()
                state.last_index = None
            else:
                self._record(state, index, x, z)
                state.last_index = index
            return
        if _in_backward():
            return  # a recomputation: the original forward recorded this block already
        current = self._local.current
        if y.grad_fn is not None:
            # Autograd may recompute any block of this pass (gradient checkpointing): keep every
            # record until backward has passed block 0, or until the graph is freed.
            if not last:
                self._record(current, index, x, z)
            if index == 0:
                with self._lock:
                    self._awaiting_backward.add(current)
                # A weak reference: block 0's node is reachable from the records (x_1 depends on
                # y_0), and autograd nodes are invisible to Python's cycle collector.
                y.grad_fn.register_hook(_releaser(weakref.ref(current)))
            if last:
                # The owner: the last block's node is the one node no record can reach.
                y.grad_fn.metadata["reslora_pass"] = current
        elif not last:
            # No graph, no recomputation: keep only what the coming blocks read.
            self._record(current, index, x, z)
            keep = self.pre_num if self.mode == "ms" and self.pre_num != -1 else 1
            for j in [j for j in current.records if j <= index - keep]:
                del current.records[j]
        current.last_index = index
        if last:
            self._local.current = None


def link_chain(
    blocks: Sequence["ChainBlock"],
    name: str | None = None,
    block_names: Sequence[str] | None = None,
    *,
    model: torch.nn.Module | None = None,
) -> ResLoRAChain:
    """Link ``blocks`` (in forward order) into one ResLoRA chain and return it.

    Every block must have the same (in, out) shape, mode, pre_num, rank and scaling, and must not
    already belong to another chain of more than one block. ``block_names`` serve error messages.
    ``model``, the module whose forward runs the blocks, ends the chain's passes when its forward
    returns (:func:`track_passes`): pass it so that a skipped block is always detected.
    :func:`reslora_kernels.apply_reslora` calls this for every target of a model.
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
