"""Vectorized Elias-gamma and raw-bit coding over numpy arrays (MSB first).

The side information of a coded tensor (exponent table, group ranges, count
tables) is a sequence of Elias-gamma codes and single flag bits. Writing is one
vectorized pass; reading finds every code boundary from a "start of the next
code" table and follows the chain of code starts with vectorized speculative
lanes (see :meth:`BitReader._synchronized`).

Side information comes from the file, so reading it must cost memory
proportional to it with a small constant (a crafted file once made the reader
take ~230x its size before any check): the reader keeps the bytes, not a byte
per bit; it builds the table (int32 per bit) in chunks and only when a read of
more than a few codes needs it; every other temporary is per code read, or
bounded by a chunk size.
"""
from __future__ import annotations

import numpy as np

from ..errors import LscFormatError

__all__ = ["zigzag", "unzigzag", "gamma_bits", "BitWriter", "BitReader"]

_MAX_GAMMA_VALUE_BITS = 63
_M64 = (1 << 64) - 1
_INT32_MAX = (1 << 31) - 1
_TABLE_CHUNK = 1 << 17     # bits per step when building or doubling the jump table (bounds its temporaries)
_VALUE_CHUNK = 1 << 16     # codes per step when assembling values
_MERGE_ENTRIES = 1 << 18   # lane trace entries per block when merging speculative lanes


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
    """Reads what :class:`BitWriter` wrote; every overrun raises :class:`LscFormatError`.

    Memory: the data plus 8 bytes, the jump table (4 bytes per bit; 8 past 2**31 bits) once a read
    of more than 256 codes needs it, and per read O(codes read) plus chunk-bounded temporaries."""

    def __init__(self, data: bytes, what: str = "side information"):
        self.what = what
        raw = np.frombuffer(data, dtype=np.uint8)
        # words[i]: the 8 bytes from byte i as a big-endian uint64 (an overlapping strided view of
        # the zero-padded data), so a code's value bits are one gather and two shifts
        padded = np.zeros(raw.size + 8, dtype=np.uint8)
        padded[:raw.size] = raw
        self._raw = padded[:raw.size]
        self._words = np.ndarray((raw.size + 1,), dtype=">u8", buffer=padded, strides=(1,))
        self._n = 8 * raw.size
        self.pos = 0
        # bit positions 0..n as int32 whenever they fit: the table and the lanes' traces are per bit
        self._index = np.int32 if self._n <= _INT32_MAX else np.int64
        self._jump_table = None

    @property
    def remaining(self) -> int:
        return self._n - self.pos

    def _bit_range(self, a: int, b: int) -> np.ndarray:
        """Bits [a, b) as uint8 0/1 (unpacked from the bytes that hold them)."""
        if b <= a:
            return np.zeros(0, dtype=np.uint8)
        off = a & 7
        return np.unpackbits(self._raw[a >> 3:(b + 7) >> 3])[off:off + (b - a)]

    def _next_one_at(self, p: int) -> int:
        """Index of the first 1-bit at or after bit p (n if none)."""
        n = self._n
        if p >= n:
            return n
        i = p >> 3
        w = (int(self._words[i]) << (p & 7)) & _M64  # bits p .. 8i+63 at the top, zeros shifted in below
        if w:
            return p + 64 - w.bit_length()
        raw, j, size = self._raw, i + 8, 64  # a run of >= 57 zeros (a corrupt or huge code): scan on
        while j < raw.size:
            nz = np.flatnonzero(raw[j:j + size])
            if nz.size:
                k = j + int(nz[0])
                return 8 * k + 8 - int(raw[k]).bit_length()
            j, size = j + size, 2 * size
        return n

    def bits(self, count: int) -> np.ndarray:
        if count < 0 or count > self.remaining:
            raise LscFormatError(f"{self.what}: truncated (needs {count} more bits, {self.remaining} left)")
        out = self._bit_range(self.pos, self.pos + count)
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
        n = self._n
        chain = self._code_starts(count, max_code_bits)
        m = chain.size
        if m == 0:
            raise LscFormatError(f"{self.what}: corrupt or truncated Elias-gamma code at bit {n}")
        # a code's length (2 * zeros + 1) is the distance to the next start: exact, as every start but the
        # first is its predecessor's jump and < n, so not clipped; the last code's zeros are counted
        last = int(chain[-1])
        last_zeros = self._next_one_at(last) - last
        end = last + 2 * last_zeros + 1
        vals = np.empty(m, dtype=np.uint64)
        for a in range(0, m, _VALUE_CHUNK):  # chunks bound the temporaries to a few MB
            b = min(a + _VALUE_CHUNK, m)
            c = chain[a:b].astype(np.int64)
            zeros = np.empty(b - a, dtype=np.int64)
            zeros[:-1] = (c[1:] - c[:-1] - 1) >> 1
            zeros[-1] = (int(chain[b]) - int(c[-1]) - 1) >> 1 if b < m else last_zeros
            bad = zeros >= _MAX_GAMMA_VALUE_BITS
            if b == m and end > n:
                bad[-1] = True
            if bad.any():
                raise LscFormatError(f"{self.what}: corrupt or truncated Elias-gamma code at bit {int(c[np.argmax(bad)])}")
            starts = (c + zeros).astype(np.uint64)  # the leading 1 of each value
            nb = (zeros + 1).astype(np.uint64)      # 1..63 significant bits; with 7 bits of offset in
            word = self._words[starts >> np.uint64(3)].astype(np.uint64)   # the word, wider values are rare
            vals[a:b] = (word << (starts & np.uint64(7))) >> (np.uint64(64) - nb)
            for i in np.flatnonzero(zeros > 56):  # values >= 2**57 straddle the 64-bit window: assemble bit by bit
                s = int(starts[i])
                vb = self._bit_range(s, s + int(nb[i]))
                vals[a + i] = np.uint64(int("".join(map(str, vb.tolist())), 2))
        if m < count:
            raise LscFormatError(f"{self.what}: corrupt or truncated Elias-gamma code at bit {n}")
        self.pos = end
        return vals

    # Code starts form a chain p -> 2 * next_one(p) - p + 1 (z zeros, the leading 1, z bits).
    # Following it is inherently sequential, so three strategies, fastest first:

    def _code_starts(self, count: int, max_code_bits: int | None = None) -> np.ndarray:
        """Start bits of the next ``count`` codes (fewer only if the stream ends first); ``max_code_bits``:
        a bound on their length, if the caller knows one."""
        if count <= 256:  # a short Python walk beats any setup
            return self._walk(count)
        remaining = self._n - self.pos
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
        """The chain, one code at a time: from the jump table once built, else from the bytes (no table
        for a short read, e.g. the exponents, the only thing :func:`lsc.plots.exponent_tables` reads)."""
        n, p, jump = self._n, self.pos, self._jump_table
        out = np.empty(count, dtype=np.int64)
        if jump is not None:
            for i in range(count):
                if p >= n:
                    return out[:i]
                out[i] = p
                p = int(jump[p])
            return out
        words = self._words
        for i in range(count):
            if p >= n:
                return out[:i]
            out[i] = p
            w = (int(words[p >> 3]) << (p & 7)) & _M64
            if w:
                p += 2 * (64 - w.bit_length()) + 1
            else:
                z = self._next_one_at(p) - p
                if z >= _MAX_GAMMA_VALUE_BITS:  # a corrupt code: the read stops at it (or earlier)
                    return out[:i + 1]
                p += 2 * z + 1
        return out

    def _synchronized(self, count: int, width: int, overlap: int, end: int) -> np.ndarray | None:
        """Speculative lanes, one per ``width`` bits of [pos, end), walked in lockstep (vectorized across lanes).

        Gamma codes resynchronize: a lane started mid-code soon lands on a true code start
        and from there follows the true chain. Each lane runs ``overlap`` bits into the next
        lane's range; where lane j-1 (on the true chain) and lane j visit a common start,
        the chain continues in lane j. ~10x faster than pointer doubling on MiniLM's tables.
        Returns the first ``count`` starts before ``end`` (fewer when the span holds fewer), or None
        if a pair of lanes did not meet before ``count`` starts were known (the caller widens or falls back).
        The lanes' traces are kept as int32 and merged in blocks of lanes, so the temporaries are about
        4 bytes per trace entry plus a bounded block.
        """
        n, jump, pos = self._n, self._jump(), self.pos
        width, overlap = max(width, 64), max(overlap, 32)
        L = -(-(end - pos) // width)
        lane = pos + width * np.arange(L, dtype=np.int64)
        stop = np.minimum(lane + width + overlap, n)
        trace, p = [], lane.astype(jump.dtype)
        while True:  # one gather per step; lanes run on past their stop (harmless) until all are there
            for _ in range(16):
                trace.append(p)
                p = jump[p]
            if (p >= stop).all():
                break
            # lane 0 starts on the chain, so once it holds the codes asked for (all before end), or ran off the
            # stream when the span is all of it, it alone is the answer: this bounds the walk by `count` steps
            # where few codes span a long stream (their average length, so the lanes' width, is then large, but
            # a lane inside a long code's value bits may step through 1-bit codes, one bit per step)
            if (len(trace) >= count and trace[count - 1][0] < end) or (end >= n and p[0] >= n):
                first = np.array([t[0] for t in trace[:count]], dtype=jump.dtype)
                return first[first < n]
        del p, lane, stop
        S = len(trace)
        merge = np.empty(L + 1, dtype=np.int64)
        merge[0], merge[L] = pos, end
        out = np.empty(count, dtype=jump.dtype)
        got = 0

        def keep(T, lo, hi):  # append the starts in each row j of T with lo[j] <= start < hi[j]
            nonlocal got
            s = T[(T >= lo[:, None]) & (T < hi[:, None])]
            k = min(s.size, count - got)
            out[got:got + k] = s[:k]
            got += k

        rows = max(2, _MERGE_ENTRIES // S)  # lanes per block; consecutive blocks share one lane
        r0 = 0
        while True:
            r1 = min(r0 + rows - 1, L - 1)
            # (lanes r0..r1, steps): each lane's starts, increasing, then n once past the end
            T = np.stack(trace if r1 - r0 + 1 == L else [t[r0:r1 + 1] for t in trace], axis=1)
            if r1 > r0:
                # find each start of lane j-1 among lane j's, as sorted keys lane * (n + 1) + position
                key = (np.arange(r1 - r0 + 1, dtype=np.int64)[:, None] * (n + 1) + T).ravel()
                cand = key[:-S] + (n + 1)
                found = np.minimum(np.searchsorted(key, cand), key.size - 1)
                hit = ((key[found] == cand) & (T[:-1].ravel() < n)).reshape(r1 - r0, S)
                del key, cand, found
                first = hit.argmax(axis=1)
                pairs = np.arange(r1 - r0)
                merge[r0 + 1:r1 + 1] = T[pairs, first]
                # lane j + 1 continues the chain if it met lane j after lane j joined it (else they met off it)
                good = hit[pairs, first] & (merge[r0 + 1:r1 + 1] > merge[r0:r1])
                if not good.all():
                    # the chain is known up to the first pair that did not meet, through the end of that lane's
                    # walk: enough when the codes asked for end before it (short codes read in a span of longer ones)
                    k = r0 + int(np.argmin(good))
                    merge[k + 1] = min(end, n)
                    keep(T[:k - r0 + 1], merge[r0:k + 1], merge[r0 + 1:k + 2])
                    return out if got >= count else None
            if r1 == L - 1:  # the last lane runs to end
                keep(T, merge[r0:r1 + 1], merge[r0 + 1:r1 + 2])
                return out[:got]
            keep(T[:-1], merge[r0:r1], merge[r0 + 1:r1 + 1])  # lane r1 is the next block's first
            if got >= count:  # later lanes only hold later starts
                return out
            r0 = r1

    def _jump(self) -> np.ndarray:
        """jump[p]: the start of the code after one starting at p (n past the end, n -> n), built on first
        use, chunk by chunk from the end (each chunk needs the first 1-bit after it)."""
        if self._jump_table is None:
            n = self._n
            cdt = np.int32 if 2 * n + 1 <= _INT32_MAX else np.int64  # holds 2 * next_one + 1
            jump = np.empty(n + 1, dtype=self._index)
            jump[n] = n
            after = n  # the first 1-bit at or after the current chunk's end
            base = np.arange(min(_TABLE_CHUNK, n), dtype=cdt)
            for a in reversed(range(0, n, _TABLE_CHUNK)):
                b = min(a + _TABLE_CHUNK, n)  # a, b are multiples of 8
                ones = np.unpackbits(self._raw[a >> 3:b >> 3]).view(bool)
                p = base[:b - a] + cdt(a)
                nxt = np.where(ones, p, cdt(after))  # next_one: a running minimum from the chunk's end
                rev = nxt[::-1]
                np.minimum.accumulate(rev, out=rev)
                after = int(nxt[0])
                nxt *= 2
                nxt += 1
                nxt -= p
                np.minimum(nxt, cdt(n), out=nxt)
                jump[a:b] = nxt
            self._jump_table = jump
        return self._jump_table

    def _doubling(self, count: int) -> np.ndarray:
        """Pointer doubling: log2(count) vectorized gathers over the whole stream (always works).

        chain[k + i] = jump^k(chain[i]) fills the chain in doubling prefixes; jump^k is doubled in place,
        chunk by chunk in increasing order, which is safe because jump^k(p) > p for p < n: a chunk reads
        only entries not yet doubled. So beyond the table it needs one copy of it and the chain."""
        n, jump = self._n, self._jump()
        chain = np.empty(count, dtype=jump.dtype)
        chain[0] = self.pos
        hop, known = jump, 1  # hop = jump applied `known` times
        while known < count:
            k = min(known, count - known)
            chain[known:known + k] = hop[chain[:k]]
            known += k
            if known < count:
                if hop is jump:
                    hop = jump.copy()
                for a in range(0, n + 1, _TABLE_CHUNK):
                    seg = hop[a:a + _TABLE_CHUNK]
                    seg[:] = hop[seg]
        return chain[:int(np.searchsorted(chain, chain.dtype.type(n)))]  # the chain increases, then stays at n

    def finish(self) -> None:
        """Only zero padding (< 8 bits) may remain."""
        rest = self._n - self.pos
        if rest >= 8 or self._bit_range(self.pos, self._n).any():
            raise LscFormatError(f"{self.what}: {rest} unexpected trailing bits")
