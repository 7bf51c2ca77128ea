"""The dropout mask is a pure function of (seed, row, column), the same on every backend: here the
torch definition against a numpy uint32 oracle written from its docstring."""

import numpy as np
import pytest
import torch

from reslora_kernels import reference


def _mix(x):
    x = x.astype(np.uint64) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def numpy_mask(rows, cols, p, seed):
    row_key = _mix(np.arange(rows, dtype=np.uint64) ^ _mix(np.array(seed)))
    col_key = _mix(np.arange(cols, dtype=np.uint64) ^ _mix(np.array(seed ^ 0x9E3779B9)))
    return (_mix(row_key[:, None] ^ col_key[None, :]) >> 1) >= min(int(p * 2**31), 2**31 - 1)


def test_int32_multiply_wraps():
    # The mask relies on int32 multiplication wrapping modulo 2^32, as it does on every backend.
    x = torch.tensor([0x7FFFFFFF, -5, 123456789], dtype=torch.int32)
    expected = [(int(v) * 0x3FFFFFFF) & 0xFFFFFFFF for v in x.tolist()]
    assert [v & 0xFFFFFFFF for v in (x * 0x3FFFFFFF).tolist()] == expected


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 2])
@pytest.mark.parametrize("shape", [(37, 53), (2, 3, 17), (1, 1)])
def test_mask_matches_numpy_oracle(seed, shape):
    rows = int(np.prod(shape[:-1]))
    expected = numpy_mask(rows, shape[-1], 0.3, seed).reshape(shape)
    assert np.array_equal(reference.dropout_keep_mask(shape, 0.3, seed, "cpu").numpy(), expected)
    tensor_seed = torch.tensor(seed)
    assert np.array_equal(reference.dropout_keep_mask(shape, 0.3, tensor_seed, "cpu").numpy(), expected)


def test_mask_statistics():
    mask = reference.dropout_keep_mask((512, 1024), 0.25, 7, "cpu").double()
    assert abs(mask.mean().item() - 0.75) < 0.005
    # Rows and columns look independent: correlations of about 1/sqrt(n), nothing structured.
    centred = mask - mask.mean()
    rows = centred / centred.norm(dim=1, keepdim=True)
    corr = rows @ rows.T - torch.eye(512, dtype=torch.float64)
    assert corr.abs().max() < 0.2 and corr.abs().mean() < 0.03
    assert not torch.equal(mask, reference.dropout_keep_mask((512, 1024), 0.25, 8, "cpu").double())


def test_mask_edges():
    assert reference.dropout_keep_mask((4, 5), 0.0, 3, "cpu").all()
    assert reference.dropout_keep_mask((0, 5), 0.5, 3, "cpu").shape == (0, 5)


def test_compiled_mask_is_the_same():
    compiled = torch.compile(reference.dropout_keep_mask, fullgraph=True)
    seed = torch.tensor(99)
    assert torch.equal(compiled((33, 65), 0.4, seed, "cpu"), reference.dropout_keep_mask((33, 65), 0.4, seed, "cpu"))
