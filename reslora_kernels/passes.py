"""Which forward pass a block of a chain belongs to, for each kind of pass (docs/design.md section 3).

An ``is``/``ms`` block reads what its direct predecessor wrote in the same forward pass. A block
runs in one of three kinds of pass, each with its own state and rules, one class each:

* :class:`EagerPasses`: an ordinary forward. A pass begins when block 0 runs and belongs to the
  thread that runs it and, when the chain is attached to its model (:func:`track_passes`), to one
  call of the model's forward; a block whose predecessor did not run before it in that pass raises
  :class:`ChainOrderError`. With an autograd graph the pass keeps every record until backward has
  passed block 0 (checkpointing may recompute any block); without one only what the coming
  blocks read.
* :class:`RecomputedPasses`: a block recomputed by (non-reentrant) gradient checkpointing during
  backward replays the eager pass it belongs to, the one pass of its chain awaiting backward.
* :class:`CompiledPass`: under ``torch.compile`` the chain keeps one pass in plain attributes that
  Dynamo traces (no thread-local state, no graph hooks: compiled checkpointing does not re-run
  Python).

What a record holds (a block's input, or its ``z``) and how a block reads it is the chain's
business (:mod:`reslora_kernels.chain`); the state classes know their chain only through the small
:class:`PassOwner` protocol, for that and for their error messages. Only torch is imported.
"""

from __future__ import annotations

import itertools
import sys
import threading
import weakref
from typing import Protocol, Sequence

import torch

__all__ = ["ChainOrderError", "track_passes"]


class ChainOrderError(RuntimeError):
    """A block of an ``is``/``ms`` chain ran without its predecessor's output of the same pass."""


def in_backward() -> bool:
    """Whether this thread is running backward (where checkpointing recomputes): the id of the
    graph task it executes, -1 outside backward, as ``torch.utils.checkpoint`` itself asks."""
    return torch._C._current_graph_task_id() != -1


def recomputing() -> bool:
    """Whether the forward running now recomputes one that already ran (gradient checkpointing
    re-runs a segment in backward, reentrant or not). What a block records (its norm statistics,
    its chain's pass, what its shortcut hooks observe) is recorded once per forward pass, never in a
    recomputation. Compiled code never re-runs Python, and Dynamo must not trace the graph-task query."""
    return not torch.compiler.is_compiling() and in_backward()


def in_reentrant_checkpoint() -> bool:
    """Whether a reentrant ``torch.utils.checkpoint`` forward is on the stack (it runs its
    function under ``no_grad``, so this is only asked when grad is off)."""
    from torch.utils.checkpoint import CheckpointFunction

    code = CheckpointFunction.forward.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


class Pass:
    """What the blocks of one chain wrote in one forward pass: ``records[n]`` is block n's input
    (is) or down-projection (ms); ``last_index`` the block that ran last in it."""

    __slots__ = ("records", "last_index", "model_pass", "released", "anchor", "__weakref__")

    def __init__(self, model_pass: int | None = None, last_index: int | None = 0) -> None:
        self.records: dict[int, torch.Tensor] = {}
        self.last_index = last_index
        self.model_pass = model_pass
        self.released = False
        self.anchor = None  # the graph node of block 0's output, once the pass awaits backward

    def release(self) -> None:
        self.records.clear()
        self.released = True

    def in_running_backward(self) -> bool:
        """Whether the backward running now reaches this pass's block 0 (asked in backward only)."""
        return self.anchor is not None and torch._C._will_engine_execute_node(self.anchor)


class PassOwner(Protocol):
    """What the pass state needs of its chain (``ResLoRAChain`` provides it): the chain's mode and
    length, the tracker of its model's calls, what a block records, and names for messages."""

    mode: str
    pre_num: int
    block_names: list[str]
    _tracker: "_PassTracker | None"

    def __len__(self) -> int: ...

    def describe(self, index: int) -> str:
        """Block ``index`` for error messages."""

    def record(self, current: Pass, index: int, x: torch.Tensor, z: torch.Tensor) -> None:
        """Store in ``current`` what block ``index`` leaves its successors."""

    def end_pass(self) -> None:
        """Close the calling thread's eager pass (the model's forward returned or raised)."""


# ---------------------------------------------------------------------------- model calls
class _PassTracker:
    """Numbers the calls of one model's forward, per thread, and ends the chains' eager passes
    when a call returns or raises. Installed by :func:`track_passes`."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.chains: weakref.WeakSet[PassOwner] = weakref.WeakSet()
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
                chain.end_pass()


def track_passes(model: torch.nn.Module, chains: Sequence[PassOwner] = ()) -> None:
    """Attach ``chains`` to ``model`` so that their passes end when a call of ``model``'s forward
    returns or raises: a block whose predecessor did not run in this call then raises
    :class:`ChainOrderError`, and nothing of an interrupted forward stays referenced.
    :func:`reslora_kernels.apply_reslora` and ``link_chain(..., model=model)`` call this."""
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


def untrack_passes(model: torch.nn.Module) -> list[PassOwner]:
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


# ---------------------------------------------------------------------------- the three kinds of pass
def _releaser(ref: weakref.ref):
    """A node hook releasing the pass ``ref`` points to, if it is still alive, once a backward that
    frees the graph has passed it. A backward with ``retain_graph=True`` keeps the graph, so a later
    backward may recompute the pass's blocks again: the pass is kept too."""

    def hook(grad_inputs, grad_outputs) -> None:
        current = ref()
        if current is not None and not torch._C._autograd._get_current_graph_task_keep_graph():
            current.release()

    return hook


class RecomputedPasses:
    """The eager passes of a chain that autograd may still recompute blocks of, and the lookup of
    the one a block recomputed during backward belongs to."""

    def __init__(self, chain: PassOwner) -> None:
        self.chain = chain
        self.awaiting: weakref.WeakSet[Pass] = weakref.WeakSet()
        self._lock = threading.Lock()

    def await_backward(self, current: Pass, y: torch.Tensor) -> None:
        """Keep ``current`` findable until a backward that frees the graph has passed block 0, whose
        output is ``y``."""
        current.anchor = y.grad_fn  # the pass holds its block 0's node; the node never holds the pass
        with self._lock:
            self.awaiting.add(current)
        # A weak reference: block 0's node is reachable from the records (x_1 depends on y_0), and
        # autograd nodes are invisible to Python's cycle collector.
        y.grad_fn.register_hook(_releaser(weakref.ref(current)))

    def join(self, index: int, training: bool) -> Pass:
        """The pass a block recomputed by gradient checkpointing belongs to: the one pass of its
        chain still kept that got as far as this block, or else the one of those the running
        backward reaches (a forward kept for logging and never backwarded is not it)."""
        if index == 0:
            return Pass()  # block 0 reads nothing from its chain
        with self._lock:
            passes = [p for p in self.awaiting if p.last_index >= index]
        candidates = [p for p in passes if not p.released]
        if len(candidates) == 1:
            return candidates[0]
        reached = [p for p in candidates if p.in_running_backward()]
        if len(reached) == 1:
            return reached[0]
        where = self.chain.describe(index)
        if len(reached) > 1:
            raise ChainOrderError(
                f"{where} is recomputed in backward (gradient checkpointing) by one backward through {len(reached)} "
                "forward passes of its chain (e.g. (loss_a + loss_b).backward() after two forwards), and ResLoRA "
                "cannot tell which one it belongs to: with gradient checkpointing, run backward after each forward "
                "(or use mode 'bs')"
            )
        if candidates:
            raise ChainOrderError(
                f"{where} is recomputed in backward (gradient checkpointing), but none of the {len(candidates)} "
                "forward passes of its chain still kept is reached by this backward"
            )
        if any(p.in_running_backward() for p in passes):
            raise ChainOrderError(
                f"{where} is recomputed in backward (gradient checkpointing), but an earlier backward through the "
                "same forward pass ran without retain_graph=True and freed it (e.g. loss_a.backward(); "
                "loss_b.backward() on one forward): pass retain_graph=True to every backward but the last, or "
                "backward the sum of the losses"
            )
        raise ChainOrderError(
            f"{where} is recomputed in backward (gradient checkpointing), but the forward pass it belongs to "
            "kept no activations: its forward ran without an autograd graph for the chain (under no_grad, or "
            "reentrant checkpointing in eval mode). Use torch.utils.checkpoint.checkpoint(..., use_reentrant=False)"
        )

    def finish(self, index: int, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> None:
        """Nothing: the original forward recorded this block already."""


class EagerPasses:
    """The passes of ordinary forwards: one open pass per thread, checked block by block."""

    def __init__(self, chain: PassOwner, recomputed: RecomputedPasses) -> None:
        self.chain = chain
        self.recomputed = recomputed
        self._local = threading.local()  # .current: this thread's open pass

    @property
    def current(self) -> Pass | None:
        """The calling thread's open pass (None when none is)."""
        return getattr(self._local, "current", None)

    def close(self) -> None:
        """Close the calling thread's open pass."""
        self._local.current = None

    def join(self, index: int, training: bool) -> Pass:
        """This thread's pass that block ``index`` joins, checked: its predecessor ran last in it."""
        chain = self.chain
        if not torch.is_grad_enabled() and training and in_reentrant_checkpoint():
            raise RuntimeError(
                f"{chain.describe(index)} runs under reentrant gradient checkpointing, which cannot carry the "
                "shortcut's gradient from one checkpointed segment to the previous one. Use non-reentrant "
                "checkpointing: torch.utils.checkpoint.checkpoint(..., use_reentrant=False), or with "
                "transformers model.gradient_checkpointing_enable("
                'gradient_checkpointing_kwargs={"use_reentrant": False})'
            )
        tracker = chain._tracker
        model_pass = tracker.current() if tracker is not None else None
        if index == 0:
            current = self._local.current = Pass(model_pass)
            return current
        current = self.current
        names = chain.block_names
        if current is None or (model_pass is not None and current.model_pass != model_pass):
            raise ChainOrderError(
                f"{chain.describe(index)} ran, but its predecessor {names[index - 1]} did not run before it in this "
                "forward pass (a skipped layer, e.g. LayerDrop, or a block called on its own): mode "
                f"{chain.mode!r} needs every block of a chain to run, in order, once per pass"
            )
        if current.last_index != index - 1:
            raise ChainOrderError(
                f"{chain.describe(index)} ran after {names[current.last_index]} in this forward pass; its "
                f"predecessor is {names[index - 1]}: the blocks of a chain must run in chain order, once each "
                "per pass"
            )
        return current

    def finish(self, index: int, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> None:
        """Record what block ``index`` leaves its successors; ``y`` is its output, whose autograd
        graph keeps the pass for recomputation while backward may need it."""
        chain = self.chain
        current = self._local.current
        last = index == len(chain) - 1
        if y.grad_fn is not None:
            # Autograd may recompute any block of this pass (gradient checkpointing): keep every
            # record until backward has passed block 0, or until the graph is freed.
            if not last:
                chain.record(current, index, x, z)
            if index == 0:
                self.recomputed.await_backward(current, y)
            if last:
                # The owner: the last block's node is the one node no record can reach.
                y.grad_fn.metadata["reslora_pass"] = current
        elif not last:
            # No graph, no recomputation: keep only what the coming blocks read.
            chain.record(current, index, x, z)
            keep = chain.pre_num if chain.mode == "ms" and chain.pre_num != -1 else 1
            for j in [j for j in current.records if j <= index - keep]:
                del current.records[j]
        current.last_index = index
        if last:
            self._local.current = None


class CompiledPass:
    """The one pass a compiled forward keeps, in plain attributes that Dynamo traces."""

    def __init__(self, chain: PassOwner) -> None:
        self.chain = chain
        self.state = Pass(last_index=None)

    def clear(self) -> None:
        self.state.records.clear()
        self.state.last_index = None

    def join(self, index: int, training: bool) -> Pass:
        state = self.state
        if index == 0:
            state.records.clear()
        elif state.last_index != index - 1:
            raise ChainOrderError(
                f"{self.chain.describe(index)} ran without its predecessor {self.chain.block_names[index - 1]} "
                "running just before it in this compiled forward pass"
            )
        return state

    def finish(self, index: int, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> None:
        if index == len(self.chain) - 1:
            self.clear()
        else:
            self.chain.record(self.state, index, x, z)
            self.state.last_index = index
