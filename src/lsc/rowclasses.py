"""Row classes: a partition of a tensor's block rows by coefficient scale, for the entropy coder.

Every in-block frequency position has one probability table, shared by all blocks. That is
right when the blocks are alike (an 8x8 block of a transformer's weight matrix looks much
like any other), and wasteful when whole rows differ in scale: an embedding table quantized
for its lookups keeps the rows of frequent tokens and zeroes most of the rare ones, so one
table per position mixes near-empty rows with full ones. Splitting the block rows (slices
of the block grid along dim 0) into classes of similar root-mean-square integer value, and
giving each (position, class) its own table, codes each class with the statistics it has:
on MiniLM's word-embedding table this takes 1.33 MB to 0.89 MB. On dense weight matrices it
rarely pays (2 of MiniLM's 36, by under 0.5%), and the coder then keeps one class: it always
uses the cheaper of the two.

This module only *proposes* the classes; :mod:`lsc.codec.entropy` codes them and decides,
and :func:`lsc.rate.exact_bits` estimates the same decision.
"""
from __future__ import annotations

import numpy as np
import torch

from .blocking import BlockLayout

__all__ = ["MAX_CLASSES", "MIN_SYMBOLS", "CLASSES_PER_OCTAVE", "row_units", "propose_row_classes", "class_permutation"]

MAX_CLASSES = 16          # at most this many classes (the largest scales share the last one)
MIN_SYMBOLS = 1 << 12     # smaller tensors never use classes: their labels would cost more than they save
CLASSES_PER_OCTAVE = 3    # class width: a third of an octave of RMS (1, 2 and 4 measured 1-4% worse on MiniLM's table)


def row_units(layout: BlockLayout) -> int:
    """Number of block rows (grid slices along dim 0) of a tensor; 0 if classes cannot apply (0-d, one row,
    or fewer than :data:`MIN_SYMBOLS` coefficients)."""
    if not layout.shape:
        return 0
    units = layout.grid[0]
    return units if units >= 2 and layout.num_blocks * layout.block_numel >= MIN_SYMBOLS else 0


def propose_row_classes(q: torch.Tensor, units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer coefficients ``q`` (num_blocks, P), blocks in row-major grid order -> (label of each block row
    (units,) int64, rows per label (MAX_CLASSES,) int64: zero past the number of classes used).

    A row's class is ``min(ceil(3 log2(1 + rms)), 15)`` of its integers' RMS; classes are then numbered by
    how many rows they hold, most first (ties: smaller RMS first), so the most common label has the
    shortest Elias-gamma code, and every label below the count is used. Nothing here waits for the
    device: a caller proposing classes for many tensors reads all their counts at once.
    """
    rows = q.reshape(units, -1).to(torch.float64)
    rms = rows.square().mean(1).sqrt()
    raw = torch.ceil(CLASSES_PER_OCTAVE * torch.log2(1 + rms)).clamp_(max=MAX_CLASSES - 1).to(torch.int64)
    counts = torch.bincount(raw, minlength=MAX_CLASSES)
    # rank classes by (-count, raw value); a stable sort over raw values 0..15 gives the tie order
    by_count = torch.sort(-counts, stable=True).indices
    rank = torch.empty_like(by_count)
    rank[by_count] = torch.arange(MAX_CLASSES, device=by_count.device)
    return rank[raw], counts[by_count]


def class_permutation(labels: np.ndarray, blocks_per_unit: int) -> tuple[np.ndarray, np.ndarray]:
    """Block labels -> (blocks sorted by class, stable: ``perm``; start of each class in ``perm`` plus the end)."""
    block_labels = np.repeat(np.asarray(labels, dtype=np.int64), blocks_per_unit)
    perm = np.argsort(block_labels, kind="stable")
    starts = np.searchsorted(block_labels[perm], np.arange(int(block_labels.max(initial=0)) + 2))
    return perm, starts.astype(np.int64)
