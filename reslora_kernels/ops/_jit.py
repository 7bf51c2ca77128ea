"""``@triton.jit`` helpers shared by several ops: addressing, tile order, and the LoRA tiles that
forward and backward must compute identically."""

import triton
import triton.language as tl

from .dropout_kernel import keep_mask


@triton.jit
def tile_offsets(offs_r, offs_c, stride_r, stride_c):
    """The int64 offsets ``row * stride_r + col * stride_c`` of the ``[len(offs_r), len(offs_c)]``
    tile at rows ``offs_r``, columns ``offs_c``: ``row * stride`` passes 2^31 elements in tensors of
    4 GiB and more, and the compile matrix rejects any 32-bit product with a stride."""
    return offs_r.to(tl.int64)[:, None] * stride_r + offs_c.to(tl.int64)[None, :] * stride_c


@triton.jit
def tile_ptrs(ptr, offs_r, offs_c, stride_r, stride_c):
    """Pointers of the ``[len(offs_r), len(offs_c)]`` tile at rows ``offs_r``, columns ``offs_c``
    (int64 offsets, :func:`tile_offsets`)."""
    return ptr + tile_offsets(offs_r, offs_c, stride_r, stride_c)


@triton.jit
def rounded_for(values, ptr):
    """float32 ``values`` rounded to nearest (ties to even) in the element type of ``ptr``.
    bfloat16 is rounded in integer arithmetic (NaN kept a quiet NaN): Triton's interpreter truncates
    a float32 -> bfloat16 cast where the GPU rounds, and a kernel whose output is proven bit-exact on
    CPU must round the same way in both."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = values.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        upper = tl.where(values != values, 0x7FC0, bits >> 16).to(tl.uint16)
        return upper.to(tl.bfloat16, bitcast=True)
    return values.to(ptr.dtype.element_ty)


@triton.jit
def grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of tile number ``tile`` in grouped order: ``GROUP_M`` row tiles share
    each column tile of the second operand while it is in L2."""
    tiles_per_group = GROUP_M * num_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % tiles_per_group) % group_rows
    pid_n = (tile % tiles_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def lora_input_tile(
    x,
    x_prev_ptr,
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
        x_prev = tl.load(tile_ptrs(x_prev_ptr, offs_m, offs_k, stride_pm, stride_pk), mask=in_bounds, other=0.0)
        lora_in += x_prev.to(tl.float32)
    lora_in = lora_in * input_scale
    if DROPOUT:
        lora_in = tl.where(keep_mask(seed, offs_m, offs_k, drop_threshold), lora_in * drop_scale, 0.0)
    return lora_in


@triton.jit
def _lora_up_step(acc, u_ptr, b_ptr, r0, offs_m, offs_n, M, N, R, stride_um, stride_ur, stride_bn, stride_br, scaling,
                  DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """``acc + scaling * u[:, r0:r0+BLOCK_R] B[:, r0:r0+BLOCK_R]^T``: one rank tile."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    u = tl.load(
        tile_ptrs(u_ptr, offs_m, offs_r, stride_um, stride_ur),
        mask=(offs_m[:, None] < M) & (offs_r[None, :] < R),
        other=0.0,
    )
    b_t = tl.load(
        tile_ptrs(b_ptr, offs_r, offs_n, stride_br, stride_bn),
        mask=(offs_r[:, None] < R) & (offs_n[None, :] < N),
        other=0.0,
    )  # [BLOCK_R, BLOCK_N]
    u = (u.to(tl.float32) * scaling).to(b_t.dtype)
    return tl.dot(u, b_t, acc, input_precision=DOT_PRECISION)


@triton.jit
def lora_up_tile(
    acc,
    u_ptr,
    b_ptr,
    offs_m,
    offs_n,
    M,
    N,
    R,
    stride_um,
    stride_ur,
    stride_bn,
    stride_br,
    scaling,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ONE_RANK_TILE: tl.constexpr,
):
    """``acc + scaling * u B^T`` on the ``[BLOCK_M, BLOCK_N]`` output tile: the rank loop of the
    forward GEMMs' epilogue. ``scaling`` is folded into the small ``u`` tile, so no second
    ``[BLOCK_M, BLOCK_N]`` accumulator is needed. ``ONE_RANK_TILE`` (R <= BLOCK_R, i.e. r <= 64)
    leaves no rank loop at all: a persistent tile loop whose body holds one inner loop (the
    reduction) is one the compiler can flatten (``tl.range(..., flatten=True)``); a second,
    runtime-length inner loop stops it."""
    if ONE_RANK_TILE:
        acc = _lora_up_step(
            acc, u_ptr, b_ptr, 0, offs_m, offs_n, M, N, R, stride_um, stride_ur, stride_bn, stride_br, scaling,
            DOT_PRECISION=DOT_PRECISION, BLOCK_R=BLOCK_R,
        )  # fmt: skip
    else:
        for r0 in range(0, R, BLOCK_R):
            acc = _lora_up_step(
                acc, u_ptr, b_ptr, r0, offs_m, offs_n, M, N, R, stride_um, stride_ur, stride_bn, stride_br, scaling,
                DOT_PRECISION=DOT_PRECISION, BLOCK_R=BLOCK_R,
            )  # fmt: skip
    return acc


@triton.jit
def _lora_grad_step(acc, g_ptr, a_ptr, r0, offs_m, offs_k, M, K, R, stride_gm, stride_gr, stride_ar, stride_ak,
                    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """``acc + g[:, r0:r0+BLOCK_R] A[r0:r0+BLOCK_R, :]``: one rank tile."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    g = tl.load(
        tile_ptrs(g_ptr, offs_m, offs_r, stride_gm, stride_gr),
        mask=(offs_m[:, None] < M) & (offs_r[None, :] < R),
        other=0.0,
    )
    a = tl.load(
        tile_ptrs(a_ptr, offs_r, offs_k, stride_ar, stride_ak),
        mask=(offs_r[:, None] < R) & (offs_k[None, :] < K),
        other=0.0,
    )  # [BLOCK_R, BLOCK_K]
    return tl.dot(g.to(a.dtype), a, acc, input_precision=DOT_PRECISION)


@triton.jit
def lora_grad_tile(
    g_ptr,
    a_ptr,
    offs_m,
    offs_k,
    M,
    K,
    R,
    stride_gm,
    stride_gr,
    stride_ar,
    stride_ak,
    seed,
    drop_threshold,
    drop_scale,
    input_scale,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ONE_RANK_TILE: tl.constexpr,
):
    """``input_scale * drop'(g A)`` on one ``[BLOCK_M, BLOCK_K]`` tile in float32: the gradient
    the LoRA input sends back (``drop'`` applies the forward's mask and ``1 / (1 - p)``).
    ``ONE_RANK_TILE`` as in :func:`lora_up_tile`."""
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if ONE_RANK_TILE:
        acc = _lora_grad_step(
            acc, g_ptr, a_ptr, 0, offs_m, offs_k, M, K, R, stride_gm, stride_gr, stride_ar, stride_ak,
            DOT_PRECISION=DOT_PRECISION, BLOCK_R=BLOCK_R,
        )  # fmt: skip
    else:
        for r0 in range(0, R, BLOCK_R):
            acc = _lora_grad_step(
                acc, g_ptr, a_ptr, r0, offs_m, offs_k, M, K, R, stride_gm, stride_gr, stride_ar, stride_ak,
                DOT_PRECISION=DOT_PRECISION, BLOCK_R=BLOCK_R,
            )  # fmt: skip
    if DROPOUT:
        # The scales multiply only kept elements: one multiply per element, after the mask.
        acc = tl.where(keep_mask(seed, offs_m, offs_k, drop_threshold), acc * (input_scale * drop_scale), 0.0)
    else:
        acc = acc * input_scale
    return acc
