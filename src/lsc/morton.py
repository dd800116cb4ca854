"""Morton (Z-order) scan of in-block frequency positions, for any rank and block size.

The seed packed coordinates into one 64-bit integer, which capped it at 8-D with
256-wide blocks. Here the interleaved bits are never packed: they form the
columns of a lexicographic sort, so rank and block size are unbounded.
"""
from __future__ import annotations

import math

import numpy as np

from .budget_cache import BudgetCache

__all__ = ["morton_order", "rowmajor_order"]


_ORDERS = BudgetCache(64 << 20)


def _morton_order(block_shape: tuple[int, ...]) -> np.ndarray:
    return _ORDERS.get_or_build(block_shape, lambda: _morton_build(block_shape), lambda order: order.nbytes)


def _morton_build(block_shape: tuple[int, ...]) -> np.ndarray:
    n = math.prod(block_shape)
    if len(block_shape) == 0:
        return np.zeros(1, dtype=np.int64)
    coords = np.indices(block_shape).reshape(len(block_shape), n)  # (k, n), row-major positions
    nbits = max(int(max(block_shape) - 1).bit_length(), 1)
    # Sort keys from least to most significant (np.lexsort uses the last key as primary).
    # Most significant digit: the top bit of dim 0, then dim 1, ..., then the next lower bit.
    keys = []
    for bit in range(nbits):  # least significant bit plane first
        for d in reversed(range(len(block_shape))):
            keys.append((coords[d] >> bit) & 1)
    order = np.lexsort(keys) if keys else np.arange(n)
    order = order.astype(np.int64)
    order.setflags(write=False)
    return order


def morton_order(block_shape: tuple[int, ...]) -> np.ndarray:
    """Row-major position indices of a block, listed in Morton (Z) order (read-only)."""
    return _morton_order(tuple(int(b) for b in block_shape))


def rowmajor_order(block_shape: tuple[int, ...]) -> np.ndarray:
    """The identity scan, for comparing against Morton order."""
    return np.arange(math.prod(block_shape), dtype=np.int64)
