"""Vectorized Elias-gamma and raw-bit coding over numpy arrays (MSB first).

The side information of a coded tensor (exponent table, group ranges, count
tables) is a sequence of Elias-gamma codes and single flag bits. Writing is one
vectorized pass; reading finds every code boundary from a precomputed
"next 1-bit" table and follows the chain of code starts with vectorized
speculative lanes (see :meth:`BitReader._synchronized`).
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
        raw = np.frombuffer(data, dtype=np.uint8)
        self._bits = np.unpackbits(raw)
        self.pos = 0
        self._jump_table = None
        n = self._bits.size
        # next_one[p]: index of the first 1-bit at or after p (n if none), for p in 0..n:
        # the k-th 1-bit, where k counts the 1-bits before p
        ones = np.append(np.flatnonzero(self._bits.view(bool)), n)
        before = np.cumsum(self._bits, dtype=np.int64) - self._bits
        self._next_one = np.append(ones[before], n)
        # words[i]: the 8 bytes from byte i as a big-endian uint64 (an overlapping strided view of
        # the zero-padded data), so a code's value bits are one gather and two shifts
        padded = np.concatenate([raw, np.zeros(8, dtype=np.uint8)])
        self._words = np.ndarray((raw.size + 1,), dtype=">u8", buffer=padded, strides=(1,))

    @property
    def remaining(self) -> int:
        return self._bits.size - self.pos

    def bits(self, count: int) -> np.ndarray:
        if count < 0 or count > self.remaining:
            raise LscFormatError(f"{self.what}: truncated (needs {count} more bits, {self.remaining} left)")
        out = self._bits[self.pos:self.pos + count]
        self.pos += count
        return out

    def gamma(self, count: int, max_code_bits: int | None = None) -> np.ndarray:
        """Read ``count`` Elias-gamma codes -> uint64 values. ``max_code_bits``: a bound on the codes'
        length known to the caller, which makes reading short codes before long ones faster; codes that
        do not fit in ``count * max_code_bits`` bits then read as corrupt."""
        if count < 0 or count > self.remaining:  # every code is at least one bit long
            raise LscFormatError(f"{self.what}: truncated (needs {count} codes, {self.remaining} bits left)")
        if count == 0:
            return np.zeros(0, dtype=np.uint64)
        n = self._bits.size
        chain = self._code_starts(count, max_code_bits)
        zeros = self._next_one[chain] - chain
        ends = chain + 2 * zeros + 1
        bad = (chain >= n) | (ends > n) | (zeros >= _MAX_GAMMA_VALUE_BITS)
        if chain.size < count or bad.any():
            at = int(chain[np.argmax(bad)]) if bad.any() else n
            raise LscFormatError(f"{self.what}: corrupt or truncated Elias-gamma code at bit {at}")
        starts = (chain + zeros).astype(np.uint64)  # the leading 1 of each value
        nb = (zeros + 1).astype(np.uint64)            # 1..63 significant bits; with 7 bits of offset in
        word = self._words[starts >> np.uint64(3)].astype(np.uint64)   # the word, wider values are rare
        vals = (word << (starts & np.uint64(7))) >> (np.uint64(64) - nb)
        wide = np.flatnonzero(zeros > 56)
        for i in wide:  # values >= 2**57 straddle the 64-bit window: assemble bit by bit
            b = self._bits[int(starts[i]):int(starts[i] + nb[i])].astype(np.uint64)
            vals[i] = np.uint64(int("".join(map(str, b.tolist())), 2))
        self.pos = int(ends[-1])
        return vals

    # Code starts form a chain p -> 2 * next_one(p) - p + 1 (z zeros, the leading 1, z bits).
    # Following it is inherently sequential, so three strategies, fastest first:

    def _code_starts(self, count: int, max_code_bits: int | None = None) -> np.ndarray:
        """Start bits of the next ``count`` codes (fewer only if the stream ends first); ``max_code_bits``:
        a bound on their length, if the caller knows one."""
        if count <= 256:  # a short Python walk beats any setup
            return self._walk(count)
        remaining = self._bits.size - self.pos
        # the lanes cover only the span these codes can occupy when their length is bounded: row-class
        # labels (<= 9 bits each) precede a tensor's long table codes, which lanes sized by the whole
        # remaining stream walked too (5,000 steps for MiniLM's 3,816 labels, 20 ms)
        span = remaining if max_code_bits is None else min(remaining, count * max_code_bits)
        avg = max(1.0, span / count)
        for lane_codes, overlap_codes in ((256, 64), (2048, 1024)):
            starts = self._synchronized(count, int(lane_codes * avg), int(overlap_codes * avg), self.pos + span)
            if starts is not None:
                return starts
        return self._doubling(count)

    def _walk(self, count: int) -> np.ndarray:
        n, nxt, p = self._bits.size, self._next_one, self.pos
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            if p >= n:
                return out[:i]
            out[i] = p
            p = 2 * int(nxt[p]) - p + 1
        return out

    def _synchronized(self, count: int, width: int, overlap: int, end: int) -> np.ndarray | None:
        """Speculative lanes, one per ``width`` bits of [pos, end), walked in lockstep (vectorized across lanes).

        Gamma codes resynchronize: a lane started mid-code soon lands on a true code start
        and from there follows the true chain. Each lane runs ``overlap`` bits into the next
        lane's range; where lane j-1 (on the true chain) and lane j visit a common start,
        the chain continues in lane j. ~10x faster than pointer doubling on MiniLM's tables.
        Returns the first ``count`` starts before ``end`` (fewer when the span holds fewer), or None
        if a pair of lanes did not meet before ``count`` starts were known (the caller widens or falls back).
        """
        n, jump, pos = self._bits.size, self._jump(), self.pos
        width, overlap = max(width, 64), max(overlap, 32)
        L = -(-(end - pos) // width)
        lane = pos + width * np.arange(L, dtype=np.int64)
        stop = np.minimum(lane + width + overlap, n)
        trace, p = [], lane
        while True:  # one gather per step; lanes run on past their stop (harmless) until all are there
            for _ in range(16):
                trace.append(p)
                p = jump[p]
            if (p >= stop).all():
                break
        T = np.stack(trace, axis=1)  # (L, steps): each lane's starts, increasing, then n once past the end
        S = T.shape[1]
        merge = np.empty(L + 1, dtype=np.int64)
        merge[0], merge[L] = pos, end
        if L > 1:
            # find each start of lane j-1 among lane j's, as sorted keys lane * (n + 1) + position
            key = (np.arange(L, dtype=np.int64)[:, None] * (n + 1) + T).ravel()
            cand = key[:-S] + (n + 1)
            found = np.minimum(np.searchsorted(key, cand), key.size - 1)
            hit = ((key[found] == cand) & (T[:-1].ravel() < n)).reshape(L - 1, S)
            first = hit.argmax(axis=1)
            rows = np.arange(L - 1)
            merge[1:L] = T[rows, first]
            # lane j + 1 continues the chain if it met lane j after lane j joined it (else they met off it)
            good = hit[rows, first] & (merge[1:L] > merge[:L - 1])
            if not good.all():
                # the chain is known up to the first pair that did not meet, through the end of that lane's
                # walk: enough when the codes asked for end before it (short codes read in a span of longer ones)
                k = int(np.argmin(good))
                merge[k + 1] = min(end, n)
                T, merge = T[:k + 1], merge[:k + 2]
                starts = T[(T >= merge[:-1, None]) & (T < merge[1:, None])]
                return starts[:count] if starts.size >= count else None
        on_chain = (T >= merge[:-1, None]) & (T < merge[1:, None])
        return T[on_chain][:count]

    def _jump(self) -> np.ndarray:
        """jump[p]: the start of the code after one starting at p (n past the end, n -> n)."""
        if self._jump_table is None:
            n = self._bits.size
            jump = 2 * self._next_one - np.arange(n + 1, dtype=np.int64) + 1
            np.minimum(jump, n, out=jump)
            jump[n] = n
            self._jump_table = jump
        return self._jump_table

    def _doubling(self, count: int) -> np.ndarray:
        """Pointer doubling: log2(count) vectorized gathers over the whole stream (always works)."""
        n, jump = self._bits.size, self._jump()
        i = np.arange(count, dtype=np.int64)
        chain = np.full(count, self.pos, dtype=np.int64)
        k = 0
        while (1 << k) < count:
            sel = ((i >> k) & 1).astype(bool)
            chain[sel] = jump[chain[sel]]
            jump = jump[jump]
            k += 1
        return chain[chain < n]

    def finish(self) -> None:
        """Only zero padding (< 8 bits) may remain."""
        rest = self._bits[self.pos:]
        if rest.size >= 8 or rest.any():
            raise LscFormatError(f"{self.what}: {rest.size} unexpected trailing bits")
