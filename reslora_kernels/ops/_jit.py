"""``@triton.jit`` helpers shared by several ops."""

import triton
import triton.language as tl

from .dropout import keep_mask


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` in grouped order: ``GROUP_M`` row tiles share each
    column tile of the second operand while it is in L2."""
    tiles_per_group = GROUP_M * num_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def lora_input_tile(
    x,
    x_prev_ptr,
    rows,
    offs_m,
    offs_k,
    in_bounds,
    stride_pm,
    stride_pk,
    seed,
    drop_threshold,
    drop_scale,
    input_scale,
    HAS_PREV: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """``drop(input_scale * (x + x_prev))`` of one ``[BLOCK_M, BLOCK_K]`` tile in float32, from the
    loaded float32 tile ``x``. The forward (z) and the backward (dA) both build the LoRA input
    here, so they see the same values and the same dropout mask."""
    lora_in = x
    if HAS_PREV:
        x_prev = tl.load(
            x_prev_ptr + rows[:, None] * stride_pm + offs_k[None, :] * stride_pk, mask=in_bounds, other=0.0
        )
        lora_in += x_prev.to(tl.float32)
    lora_in = lora_in * input_scale
    if DROPOUT:
        lora_in = tl.where(keep_mask(seed, offs_m, offs_k, drop_threshold), lora_in * drop_scale, 0.0)
    return lora_in
