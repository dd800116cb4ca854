"""Which coefficients share one probability model in the entropy coder.

Both the rate estimate used in training and the codec call :func:`position_groups`,
so the loss measures exactly the code the file will contain. Positions are
scanned in Morton order (low to high frequency) and consecutive positions are
merged until a group holds enough symbols to pay for its probability table.
"""
from __future__ import annotations

import numpy as np

from .blocking import BlockLayout
from .morton import morton_order, rowmajor_order

__all__ = ["DEFAULT_MIN_GROUP_SYMBOLS", "position_groups"]

DEFAULT_MIN_GROUP_SYMBOLS = 1024


def position_groups(layout: BlockLayout, min_symbols: int = DEFAULT_MIN_GROUP_SYMBOLS, scan: str = "morton") -> np.ndarray:
    """Group id (0..G-1) of every in-block position, indexed row-major; ids increase along the scan."""
    order = {"morton": morton_order, "rowmajor": rowmajor_order}[scan](layout.block_shape)
    per_group = max(1, -(-int(min_symbols) // max(layout.num_blocks, 1)))
    groups = np.empty(layout.block_numel, dtype=np.int64)
    groups[order] = np.arange(layout.block_numel) // per_group
    return groups
