"""A cache bounded by bytes, for the per-shape tables lsc builds (transform matrices, scan orders).

A file may declare long blocks, whose tables grow as their size squared; a cache bounded by a count
would let a few small crafted files keep gigabytes alive, and one that kept only small tables made real
long-block models rebuild theirs at every use.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

__all__ = ["BudgetCache"]


class BudgetCache:
    """A thread-safe LRU cache whose bound is the bytes its values hold (given by the caller), not their count.

    Entries larger than the budget are returned but not kept (a float64 DCT matrix of the format's
    longest block edge, 8192, is 512 MB; keeping only small ones made lazy forwards with 1 x 2048
    blocks 3.7x slower).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = int(max_bytes), 0
        self._items: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit[0]
        return None

    def get_or_build(self, key, build, nbytes):
        """The cached value of ``key``, else ``build()``, kept when ``nbytes(value)`` fits.

        Built with fake tensors switched off: a table first needed while ``torch.export`` traces
        (under its fake mode) would otherwise be a fake tensor, which every later user would read
        as garbage; a real one is what the trace records as a constant."""
        hit = self.get(key)
        if hit is not None:
            return hit
        with unset_fake_temporarily():
            value = build()
        return self.put(key, value, nbytes(value))

    def put(self, key, value, nbytes: int):
        if nbytes > self.max_bytes or _holds_fake(value):
            return value
        with self._lock:
            if key not in self._items:
                self._items[key] = (value, nbytes)
                self.bytes += nbytes
                while self.bytes > self.max_bytes:
                    self.bytes -= self._items.popitem(last=False)[1][1]
        return value


def _holds_fake(value) -> bool:
    """Whether ``value`` (a tensor or a tuple of them) holds a fake tensor, which must never be kept."""
    from torch._subclasses.fake_tensor import FakeTensor
    items = value if isinstance(value, tuple) else (value,)
    return any(isinstance(v, FakeTensor) for v in items if isinstance(v, torch.Tensor))
