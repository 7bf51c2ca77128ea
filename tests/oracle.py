"""An independent float64 oracle of docs/design.md section 2, written from the table, not the package.

Nothing here imports reslora_kernels: the tests compare the package against these loops.
"""

from __future__ import annotations

import torch


def depth(n: int, pre_num: int) -> int:
    """How many previous blocks block n sums over: min(m, n), all of them for m = -1."""
    return n if pre_num == -1 else min(pre_num, n)


def block_output(n, xs, params, scaling, mode, pre_num, masks=None, p=0.0, zs=None):
    """y_n of the table, given the inputs xs[0..n] of this pass and (for ms) the z's so far."""
    W, b, A, B = params[n]
    x = xs[n]

    def drop(t):
        return t if masks is None or masks[n] is None else t * masks[n] / (1.0 - p)

    y = x @ W.T
    if b is not None:
        y = y + b
    if mode == "none":
        lora = drop(x) @ A.T @ B.T
    elif mode == "is":
        x_prev = xs[n - 1] if n > 0 else x  # x_{-1} := x_0
        lora = drop(x + x_prev) @ A.T @ B.T
    elif mode == "bs":
        lora = sum(drop(x) @ params[n - k][2].T @ params[n - k][3].T for k in range(depth(n, pre_num) + 1))
    elif mode == "ms":
        zs.append(drop(x) @ A.T)
        lora = sum(zs[n - k] for k in range(depth(n, pre_num) + 1)) @ B.T
    else:
        raise ValueError(mode)
    return y + scaling * lora


def toy_stack(x0, params, scaling, mode, pre_num, masks=None, p=0.0):
    """The toy model of the tests: x_{n+1} = tanh(y_n). Returns [y_0, ..., y_{L-1}]."""
    xs, ys, zs = [x0], [], []
    for n in range(len(params)):
        y = block_output(n, xs, params, scaling, mode, pre_num, masks, p, zs)
        ys.append(y)
        xs.append(torch.tanh(y))
    return ys


def oracle_grads(params, x0, scaling, mode, pre_num, masks, p, probes, dtype):
    """Outputs, (dA, dB) per block and dx of the toy stack evaluated in ``dtype``, for the loss
    sum_n <y_n, probes[n]>."""
    cast = [
        tuple(None if t is None else t.detach().to(dtype).requires_grad_(i >= 2) for i, t in enumerate(ps))
        for ps in params
    ]
    x = x0.detach().to(dtype).requires_grad_()
    ys = toy_stack(x, cast, scaling, mode, pre_num, masks, p)
    sum((y * w.to(dtype)).sum() for y, w in zip(ys, probes)).backward()
    return ys, [(A.grad, B.grad) for _, _, A, B in cast], x.grad


def merged_weight(n, params, scaling, mode, pre_num, a=None):
    """Merged weight of block n (docs/design.md section 8): exact for none/bs, W + s(1+a_n) B A otherwise."""
    W, _, A, B = params[n]
    if mode == "none":
        return W + scaling * B @ A
    if mode == "bs":
        return W + scaling * sum(params[n - k][3] @ params[n - k][2] for k in range(depth(n, pre_num) + 1))
    return W + scaling * (1.0 + a) * B @ A
