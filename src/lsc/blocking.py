"""Cutting a tensor of any rank into equal blocks, and putting it back together.

A tensor of shape (s_1..s_k) with block shape (b_1..b_k) is zero-padded to
multiples of the block and viewed as (n_1..n_k, b_1..b_k): block grid first,
in-block (frequency) dimensions last. This layout is what the coefficients
parameter, the quantizer and the codec all share.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
import operator

import torch

from .checks import is_integer

__all__ = ["BlockLayout", "choose_block_shape", "to_blocks", "from_blocks", "MAX_BLOCK_DIM", "MAX_BLOCK_NUMEL"]


@dataclass(frozen=True)
class BlockLayout:
    """Static geometry of one blocked tensor."""

    shape: tuple[int, ...]
    block_shape: tuple[int, ...]

    def __post_init__(self):
        if len(self.shape) != len(self.block_shape):
            raise ValueError(f"block shape {self.block_shape} does not match rank of tensor shape {self.shape}")
        if any(b < 1 for b in self.block_shape):
            raise ValueError(f"block sizes must be >= 1, got {self.block_shape}")

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(-(-s // b) for s, b in zip(self.shape, self.block_shape))

    @property
    def coeff_shape(self) -> tuple[int, ...]:
        return self.grid + self.block_shape

    @property
    def num_blocks(self) -> int:
        return math.prod(self.grid)

    @property
    def block_numel(self) -> int:
        return math.prod(self.block_shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# Limits of the file format (docs/FORMAT.md): a reader builds a (b, b) transform matrix per block
# dim and a scan order per block shape, so these bound what a crafted file can make it allocate.
MAX_BLOCK_DIM = 8192  # a (b, b) float64 DCT matrix: 512 MB at most
MAX_BLOCK_NUMEL = 1 << 20


def choose_block_shape(shape: tuple[int, ...], block_size) -> tuple[int, ...]:
    """Block shape for a tensor: ``block_size`` per dim (int or per-dim tuple), never larger than the dim."""
    if is_integer(block_size):
        sizes = (operator.index(block_size),) * len(shape)
    elif isinstance(block_size, (tuple, list)) and all(is_integer(b) for b in block_size):
        sizes = tuple(operator.index(b) for b in block_size)
        if len(sizes) != len(shape):
            raise ValueError(f"block_size {tuple(block_size)} has {len(sizes)} dims but the tensor has shape {tuple(shape)}")
    else:
        raise ValueError(f"block_size must be an int or a tuple of ints (one per dim), got {block_size!r}")
    if any(b < 1 for b in sizes):
        raise ValueError(f"block sizes must be >= 1, got {sizes}")
    block = tuple(max(1, min(s, b)) for s, b in zip(shape, sizes))
    if max(block, default=1) > MAX_BLOCK_DIM or math.prod(block) > MAX_BLOCK_NUMEL:
        raise ValueError(f"block {block} is too large: the file format allows at most {MAX_BLOCK_DIM} per dim and "
                         f"{MAX_BLOCK_NUMEL} positions per block (docs/FORMAT.md)")
    return block


def to_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """(s_1..s_k) -> (n_1..n_k, b_1..b_k), zero padding the ragged edge."""
    k = x.dim()
    grid, bs = layout.grid, layout.block_shape
    pad = []
    for s, n, b in zip(reversed(x.shape), reversed(grid), reversed(bs)):
        pad += [0, n * b - s]
    if any(pad):
        x = torch.nn.functional.pad(x, pad)
    x = x.reshape([v for nb in zip(grid, bs) for v in nb])
    perm = list(range(0, 2 * k, 2)) + list(range(1, 2 * k, 2))
    return x.permute(perm)


def from_blocks(blocks: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: (n_1..n_k, b_1..b_k) -> (s_1..s_k), cropping the padding."""
    k = len(layout.shape)
    perm = [v for j in range(k) for v in (j, k + j)]
    x = blocks.permute(perm).reshape([n * b for n, b in zip(layout.grid, layout.block_shape)])
    if tuple(x.shape) != layout.shape:
        x = x[tuple(slice(0, s) for s in layout.shape)]
    return x
