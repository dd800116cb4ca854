"""Vectorized Elias-gamma and raw-bit coding over numpy arrays (MSB first).

The side information of a coded tensor (exponent table, group ranges, count
tables) is a sequence of Elias-gamma codes and single flag bits. Writing is one
vectorized pass; reading finds every code boundary from a precomputed
"next 1-bit" table, so only the chain of code starts is walked in Python.
"""
from __future__ import annotations

import numpy as np

from ..errors import LscFormatError

__all__ = ["zigzag", "unzigzag", "gamma_bits", "BitWriter", "BitReader"]

_MAX_GAMMA_VALUE_BITS = 63


def zigzag(v: np.ndarray) -> np.ndarray:
    """Signed -> unsigned: 0,-1,1,-2,2 -> 0,1,2,3,4 (as uint64)."""
    v = np.asarray(v, dtype=np.int64)
    return np.where(v >= 0, 2 * v, -2 * v - 1).astype(np.uint64)


def unzigzag(u: np.ndarray) -> np.ndarray:
    u = np.asarray(u, dtype=np.uint64)
    return np.where(u & np.uint64(1), -((u + np.uint64(1)) >> np.uint64(1)).astype(np.int64), (u >> np.uint64(1)).astype(np.int64))


def _bitlen(v: np.ndarray) -> np.ndarray:
    """floor(log2 v) + 1 for v >= 1 (uint64), exact for all 64-bit values."""
    v = np.asarray(v, dtype=np.uint64)
    n = np.zeros(v.shape, dtype=np.int64)
    x = v.copy()
    for s in (32, 16, 8, 4, 2, 1):
        big = x >= (np.uint64(1) << np.uint64(s))
        n += np.where(big, s, 0)
        x = np.where(big, x >> np.uint64(s), x)
    return n + (x > 0)


def gamma_bits(v: np.ndarray) -> int:
    """Total length in bits of the Elias-gamma codes of the values v >= 1."""
    v = np.asarray(v, dtype=np.uint64)
    return int((2 * _bitlen(v) - 1).sum()) if v.size else 0


class BitWriter:
    """Collects Elias-gamma codes and raw bits; ``getvalue`` pads with zeros to a whole byte."""

    def __init__(self):
        self._chunks: list[np.ndarray] = []
        self.nbits = 0

    def bits(self, b: np.ndarray) -> None:
        """Append raw bits (each 0 or 1)."""
        b = np.asarray(b, dtype=np.uint8).reshape(-1)
        self._chunks.append(b)
        self.nbits += b.size

    def gamma(self, v: np.ndarray) -> None:
        """Append the Elias-gamma codes of the values v >= 1 (any integer dtype, < 2**63)."""
        v = np.asarray(v).reshape(-1).astype(np.uint64)
        if v.size == 0:
            return
        if (v == 0).any():
            raise ValueError("Elias-gamma codes values >= 1 only")
        nb = _bitlen(v)                       # significant bits per value
        lengths = 2 * nb - 1
        total = int(lengths.sum())
        out = np.zeros(total, dtype=np.uint8)
        starts = np.cumsum(lengths) - lengths + (nb - 1)   # where the significant bits begin
        idx = np.repeat(np.arange(v.size), nb)
        j = np.arange(idx.size) - np.repeat(np.cumsum(nb) - nb, nb)  # 0..nb-1 within each value
        shift = (nb[idx] - 1 - j).astype(np.uint64)
        out[starts[idx] + j] = ((v[idx] >> shift) & np.uint64(1)).astype(np.uint8)
        self._chunks.append(out)
        self.nbits += total

    def getvalue(self) -> bytes:
        if not self._chunks:
            return b""
        return np.packbits(np.concatenate(self._chunks)).tobytes()


class BitReader:
    """Reads what :class:`BitWriter` wrote; every overrun raises :class:`LscFormatError`."""

    def __init__(self, data: bytes, what: str = "side information"):
        self.what = what
        self._bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
        self.pos = 0
        n = self._bits.size
        # next_one[p]: index of the first 1-bit at or after p (n if none), by a reversed running minimum
        idx = np.where(self._bits.astype(bool), np.arange(n, dtype=np.int64), n)
        self._next_one = np.append(np.minimum.accumulate(idx[::-1])[::-1], n)

    @property
    def remaining(self) -> int:
        return self._bits.size - self.pos

    def bits(self, count: int) -> np.ndarray:
        if count < 0 or count > self.remaining:
            raise LscFormatError(f"{self.what}: truncated (needs {count} more bits, {self.remaining} left)")
        out = self._bits[self.pos:self.pos + count]
        self.pos += count
        return out

    def gamma(self, count: int) -> np.ndarray:
        """Read ``count`` Elias-gamma codes -> uint64 values."""
        if count < 0 or count > self.remaining:  # every code is at least one bit long
            raise LscFormatError(f"{self.what}: truncated (needs {count} codes, {self.remaining} bits left)")
        if count == 0:
            return np.zeros(0, dtype=np.uint64)
        n = self._bits.size
        # Code starts form a chain p -> p + 2 * zeros(p) + 1. Pointer doubling finds the first
        # ``count`` links with log2(count) vectorized gathers instead of a Python loop per code
        # (which cost ~0.6 s of a MiniLM decode).
        pos_all = np.arange(n + 1, dtype=np.int64)
        zeros_all = self._next_one - pos_all
        jump = np.minimum(pos_all + 2 * zeros_all + 1, n)  # past-the-end positions collapse onto n
        jump[n] = n
        i = np.arange(count, dtype=np.int64)
        chain = np.full(count, self.pos, dtype=np.int64)
        k = 0
        while (1 << k) < count:
            sel = ((i >> k) & 1).astype(bool)
            chain[sel] = jump[chain[sel]]
            jump = jump[jump]
            k += 1
        zeros = zeros_all[chain]
        ends = chain + 2 * zeros + 1
        bad = (chain >= n) | (ends > n) | (zeros >= _MAX_GAMMA_VALUE_BITS)
        if bad.any():
            at = int(chain[np.argmax(bad)])
            raise LscFormatError(f"{self.what}: corrupt or truncated Elias-gamma code at bit {at}")
        starts = chain + zeros
        p = int(ends[-1])
        starts_a = starts
        nb = zeros + 1
        first = np.cumsum(nb) - nb
        idx = np.repeat(np.arange(count), nb)
        j = np.arange(idx.size) - first[idx]
        bitvals = self._bits[starts_a[idx] + j].astype(np.uint64) << (nb[idx] - 1 - j).astype(np.uint64)
        vals = np.add.reduceat(bitvals, first) if bitvals.size else np.zeros(count, dtype=np.uint64)
        self.pos = p
        return vals.astype(np.uint64)

    def finish(self) -> None:
        """Only zero padding (< 8 bits) may remain."""
        rest = self._bits[self.pos:]
        if rest.size >= 8 or rest.any():
            raise LscFormatError(f"{self.what}: {rest.size} unexpected trailing bits")
