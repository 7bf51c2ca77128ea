"""The norm statistics of a block: what the input-norm merge reads (docs/design.md section 8).

An ``is`` block records the squared Frobenius norm of its input, an ``ms`` block that of its
down-projection ``z``, once per training forward, into a ring buffer on the block's device.
Recording never synchronises the host with the device (no ``.item()``: the authors' code has one
per forward); the values are read only when merging. A leaf: only torch is imported.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

__all__ = ["NormStatistics"]


class NormStatistics(nn.Module):
    """A ring buffer of the last ``window`` squared norms, on the device, and two counters.

    Buffers (saved with the adapter under these names, after the block's name):

    * ``norm_sq_window`` ``[window]`` float32: the squared norms, slot ``count % window`` next;
    * ``norm_count``: the finite norms recorded so far;
    * ``norm_nonfinite``: the forwards whose norm was Inf/NaN and was therefore left out.

    The buffer stays float32 whatever the model's dtype (the squared norm of a whole batch
    overflows float16), and statistics materialised from the meta device start empty.
    """

    def __init__(self, window: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.window = window
        self.register_buffer("norm_sq_window", torch.zeros(window, dtype=torch.float32, device=device))
        self.register_buffer("norm_count", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("norm_nonfinite", torch.zeros((), dtype=torch.int64, device=device))

    @torch.no_grad()
    def record(self, sqnorm: torch.Tensor) -> None:
        """Record one forward's squared norm (a 0-d or one-element tensor on the device)."""
        # Device-side slot arithmetic: no .item(), so a CUDA forward never waits for the host.
        # A non-finite norm (an overflowing step) is not recorded: its slot keeps the value it had,
        # norm_count does not advance, and norm_nonfinite counts it instead.
        window = self.norm_sq_window
        sqnorm = sqnorm.reshape(1).to(window.dtype)
        finite = torch.isfinite(sqnorm)
        slot = torch.remainder(self.norm_count, self.window).view(1)
        kept = torch.where(finite, sqnorm, window.index_select(0, slot))
        window.index_copy_(0, slot, kept)
        self.norm_count.add_(finite.view(()).to(self.norm_count.dtype))
        self.norm_nonfinite.add_((~finite).view(()).to(self.norm_nonfinite.dtype))

    def mean_norm(self) -> float:
        """Mean Frobenius norm over the last ``window`` recorded (finite) forwards; zero norms are
        skipped as in the authors' code, and 0.0 means nothing was recorded. Reads the device
        (merge time only)."""
        filled = min(int(self.norm_count), self.window)
        norms = self.norm_sq_window[:filled].double().sqrt()
        norms = norms[norms > 0]
        return float(norms.mean()) if norms.numel() else 0.0

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the statistics."""
        for buffer in self._buffers.values():
            buffer.zero_()

    def _apply(self, fn, recurse=True):
        # Values materialised from the meta device (to_empty, as FSDP and init_empty_weights use)
        # are whatever memory held: statistics coming from meta start empty instead.
        from_meta = self.norm_count.is_meta
        super()._apply(fn, recurse)
        # model.half() / .to(dtype) cast float buffers too: the ring buffer stays float32.
        if self.norm_sq_window.dtype != torch.float32:
            self._buffers["norm_sq_window"] = self.norm_sq_window.float()
        if from_meta and not self.norm_count.is_meta:
            self.reset()
        return self

    def extra_repr(self) -> str:
        return f"window={self.window}"


def skipped_norms(blocks: Iterable[tuple[str, nn.Module]]) -> dict[str, int]:
    """Block name -> how many of its training forwards had an Inf/NaN norm, which the statistics
    left out; only blocks with at least one. Reads the device."""
    counts = {}
    for name, block in blocks:
        statistics = getattr(block, "statistics", None)
        if statistics is not None and int(statistics.norm_nonfinite) > 0:
            counts[name] = int(statistics.norm_nonfinite)
    return counts
