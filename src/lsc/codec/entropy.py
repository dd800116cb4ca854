"""Entropy coding of one tensor's integer coefficients with constriction's ANS coder.

Symbols are grouped by in-block frequency position (:func:`lsc.grouping.position_groups`),
and optionally split further by *row class* (:mod:`lsc.rowclasses`: block rows of similar
scale, one label per block row). Each (group, class) pair is a *subgroup* with its own
probability model, chosen as the cheaper of

* a categorical model over [lo, hi] built from the subgroup's exact symbol counts
  (the counts are stored, so the decoder rebuilds the identical float64 model), or
* a uniform code over [lo, hi] (no table; free when lo == hi).

Side information (Elias-gamma, see :mod:`lsc.codec.elias`), in this order:
  1. the P step exponents in scan order, as zigzag(delta) + 1 (first delta from 0);
  1b. with C > 1 classes: each block row's label + 1;
  2. one mode bit per subgroup (1 = categorical), subgroups group-major, class-minor;
  3. per subgroup: zigzag(lo) + 1 and K = hi - lo + 1;
  4. per categorical subgroup, in order: count + 1 for each of its K symbols.
The ANS stream holds the subgroups in order (encoded in reverse, since ANS is a stack).
The writer uses classes only when they make the tensor's stream smaller, and
:mod:`lsc.rate` estimates exactly this layout and choice.
"""
from __future__ import annotations

import math

import constriction
import numpy as np

from ..errors import LscFormatError
from ..rowclasses import MAX_CLASSES, class_permutation
from .elias import BitReader, BitWriter, unzigzag, zigzag

__all__ = ["MAX_CATEGORICAL_K", "SEGMENT_SYMBOLS", "encode_symbols", "decode_positions", "group_bounds",
           "segment_starts", "GroupStats", "GroupStream"]

MAX_CATEGORICAL_K = 1 << 16   # larger alphabets always use the uniform code
_UNIFORM_MAX = 1 << 23        # constriction's Uniform takes sizes < 2**24; wider ranges are split in 12-bit digits
_DIGIT = 12
MAX_EXPONENT = 4096           # |exponent| bound accepted by the decoder
SEGMENT_SYMBOLS = 1 << 21     # tensors with more symbols are coded as several independent ANS segments

_model = constriction.stream.model


def _eg_len(v: np.ndarray) -> np.ndarray:
    """Elias-gamma code length (float64) of v >= 1, same formula as lsc.rate."""
    return 2 * np.floor(np.log2(np.asarray(v, dtype=np.float64))) + 1


def group_bounds(groups: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Start offsets (in scan order) of each group plus the end: groups are contiguous along the scan."""
    g = np.asarray(groups)[np.asarray(order)]
    if g.size and (np.any(np.diff(g) < 0) or g[0] != 0 or np.any(np.diff(g) > 1)):
        raise ValueError("group ids must be contiguous and non-decreasing along the scan")
    return np.concatenate([[0], np.flatnonzero(np.diff(g)) + 1, [g.size]]).astype(np.int64)


def _categorical(counts: np.ndarray):
    p = counts.astype(np.float64)
    return _model.Categorical(p / p.sum(), perfect=False)


def _uniform_parts(k: int) -> list[int]:
    """Digit sizes (most significant first) of the uniform code over range(k), k >= 2."""
    parts = []
    while k > _UNIFORM_MAX:
        parts.append(1 << _DIGIT)
        k = ((k - 1) >> _DIGIT) + 1
    parts.append(k)
    return parts[::-1]


def _encode_uniform(coder, sym: np.ndarray, k: int) -> None:
    parts = _uniform_parts(k)
    # digits least significant last in `parts`; encode in reverse of decode order
    digits = []
    s = sym.astype(np.int64)
    for size in reversed(parts[1:]):
        digits.append((s & (size - 1)).astype(np.int32))
        s = s >> _DIGIT
    digits.append(s.astype(np.int32))
    digits = digits[::-1]  # most significant first, matching parts
    for d, size in reversed(list(zip(digits, parts))):
        if size > 1:
            coder.encode_reverse(d, _model.Uniform(size))


def _decode_uniform(coder, n: int, k: int) -> np.ndarray:
    s = np.zeros(n, dtype=np.int64)
    for i, size in enumerate(_uniform_parts(k)):
        d = coder.decode(_model.Uniform(size), n).astype(np.int64) if size > 1 else 0
        s = (s << _DIGIT) + d if i else s + d
    return s


class GroupStats:
    """Per-group quantities of one coded tensor (for reports and the entropy-bound benchmark)."""

    def __init__(self):
        self.entropy_bits = 0.0   # empirical entropy of the symbols of groups with K > 1
        self.side_bits = 0
        self.num_categorical = 0
        self.num_uniform = 0


def segment_starts(bounds: np.ndarray, nb: int, segment_symbols: int | None = None) -> list[int]:
    """First group of each ANS segment: contiguous group ranges of about ``segment_symbols`` symbols
    (one segment unless the tensor has more symbols than that)."""
    segment_symbols = segment_symbols or SEGMENT_SYMBOLS
    sizes = np.diff(bounds) * nb
    total = int(sizes.sum())
    S = min(max(1, -(-total // segment_symbols)), max(1, sizes.size))
    if S == 1:
        return [0]
    ends = np.cumsum(sizes)
    cuts = np.searchsorted(ends, total * np.arange(1, S) / S, side="left") + 1
    return sorted({0, *[int(c) for c in cuts if 0 < c < sizes.size]})


class _Models:
    """Subgroup models of one candidate layout (one class, or the given classes) and their coded size."""

    def __init__(self, q_scan: np.ndarray, bounds: np.ndarray, col_starts: np.ndarray):
        G, C = bounds.size - 1, col_starts.size - 1
        self.los, self.ks, self.modes, self.tables, self.syms = [], [], [], [], []
        bits = 0.0
        entropy = 0.0
        for g in range(G):
            for c in range(C):
                block = q_scan[bounds[g]:bounds[g + 1], col_starts[c]:col_starts[c + 1]]
                n = block.size
                lo, hi = (int(block.min()), int(block.max())) if n else (0, 0)
                k = hi - lo + 1
                s = (block.reshape(-1) - lo) if n else np.zeros(0, dtype=np.int64)
                mode, counts, cost = 0, None, 0.0
                if k > 1:
                    cost = uniform_bits = n * math.log2(k)
                    if k <= MAX_CATEGORICAL_K:
                        counts = np.bincount(s, minlength=k)
                        nz = counts[counts > 0].astype(np.float64)
                        h = float(n * math.log2(n) - (nz * np.log2(nz)).sum())
                        entropy += h
                        table = h + float(_eg_len(counts + 1).sum())
                        if table < uniform_bits:
                            mode, cost = 1, table
                    else:
                        entropy += uniform_bits  # not measured for huge alphabets
                zz = 2 * lo if lo >= 0 else -2 * lo - 1
                bits += cost + 1 + float(_eg_len(np.array([zz + 1, k])).sum())
                self.los.append(lo)
                self.ks.append(k)
                self.modes.append(mode)
                self.tables.append(counts if mode else None)
                self.syms.append(s)
        self.bits, self.entropy = bits, entropy


def encode_symbols(q_scan: np.ndarray, exponents_scan: np.ndarray, bounds: np.ndarray,
                   segment_symbols: int | None = None, units: int = 0,
                   labels: np.ndarray | None = None) -> tuple[bytes, bytes, GroupStats, list, int]:
    """Code integer symbols laid out (P, num_blocks) in scan order -> (side bytes, ANS bytes, stats, segments,
    classes).

    ``segments`` is ``[[first_group, words], ...]`` when the ANS data was cut into independently
    decodable segments (tensors of more than ``segment_symbols`` symbols, so that decoders can
    spread one big tensor over several cores), else ``[]``. ``labels`` (``units``,): proposed
    row classes (:func:`lsc.rowclasses.propose_row_classes`) of the ``units`` block rows; they
    are used (``classes`` > 1) only if that makes the stream smaller.
    """
    P, nb = q_scan.shape
    G = bounds.size - 1
    stats = GroupStats()
    models = _Models(q_scan, bounds, np.array([0, nb]))
    classes = 1
    if labels is not None and units >= 2 and int(np.max(labels)) >= 1:
        labels = np.asarray(labels, dtype=np.int64)
        perm, col_starts = class_permutation(labels, nb // units)
        split = _Models(np.ascontiguousarray(q_scan[:, perm]), bounds, col_starts)
        if split.bits + float(_eg_len(labels + 1).sum()) < models.bits:
            models, classes = split, col_starts.size - 1
    stats.entropy_bits = models.entropy
    los, ks, modes, tables, syms = models.los, models.ks, models.modes, models.tables, models.syms
    w = BitWriter()
    e = exponents_scan.astype(np.int64)
    w.gamma(zigzag(np.diff(e, prepend=0)) + np.uint64(1))
    if classes > 1:
        w.gamma(labels.astype(np.uint64) + np.uint64(1))
    w.bits(np.asarray(modes, dtype=np.uint8))
    S = len(ks)
    rng = np.empty(2 * S, dtype=np.uint64)
    rng[0::2] = zigzag(np.asarray(los, dtype=np.int64)) + np.uint64(1)
    rng[1::2] = np.asarray(ks, dtype=np.uint64)
    w.gamma(rng)
    cat = [t for t in tables if t is not None]
    if cat:
        w.gamma(np.concatenate(cat).astype(np.uint64) + np.uint64(1))
    starts = segment_starts(bounds, nb, segment_symbols)
    pieces, segments = [], []
    for g0, g1 in zip(starts, starts[1:] + [G]):
        coder = constriction.stream.stack.AnsCoder()
        for j in reversed(range(g0 * classes, g1 * classes)):
            k, s = ks[j], syms[j]
            if k <= 1 or s.size == 0:
                continue
            if modes[j]:
                coder.encode_reverse(s.astype(np.int32), _categorical(tables[j]))
                stats.num_categorical += 1
            else:
                _encode_uniform(coder, s, k)
                stats.num_uniform += 1
        words = coder.get_compressed().astype("<u4", copy=False)
        pieces.append(words.tobytes())
        segments.append([int(g0), int(words.size)])
    side = w.getvalue()
    stats.side_bits = w.nbits
    return side, b"".join(pieces), stats, (segments if len(segments) > 1 else []), classes


class GroupStream:
    """Parsed side information of one tensor's stream; iterating entropy-decodes it subgroup by subgroup.

    Shared by the file decoder and the lazy loader, which fill different layouts.
    Attributes: ``exponents`` (P,) in scan order, ``los`` / ``ks`` (offset and alphabet
    size per subgroup), ``classes``. Iteration yields ``(a, b, cols, lo, symbols)`` for scan
    positions [a, b) and the blocks ``cols`` (an index array, or None for all blocks):
    ``symbols`` is the (b - a) * len(cols) array of ``value - lo`` in (position, block) order,
    or None when every value of the subgroup is ``lo``.
    """

    def __init__(self, side: bytes, ans: bytes, P: int, nb: int, bounds: np.ndarray, what: str, segments=None,
                 classes: int = 1, units: int = 0):
        self.nb, self.bounds, self.what = nb, bounds, what
        r = BitReader(side, what)
        e = np.cumsum(unzigzag(r.gamma(P) - np.uint64(1)))
        if e.size and np.abs(e).max() > MAX_EXPONENT:
            raise LscFormatError(f"{what}: step exponent out of range")
        self.classes = C = int(classes)
        self.cols = [None]
        if C > 1:
            if not 2 <= C <= min(MAX_CLASSES, units) or units < 2 or nb % units:
                raise LscFormatError(f"{what}: invalid number of row classes {C} for {units} block rows")
            labels = r.gamma(units, max_code_bits=2 * C.bit_length() - 1).astype(np.int64) - 1  # labels + 1 <= C
            if labels.max() >= C or np.bincount(labels, minlength=C).min() == 0:
                raise LscFormatError(f"{what}: row class labels must use every class below {C} and no other")
            perm, self.class_starts = class_permutation(labels, nb // units)
            self.cols = [perm[self.class_starts[c]:self.class_starts[c + 1]] for c in range(C)]
            self.inverse = np.empty_like(perm)  # column of each block in class order
            self.inverse[perm] = np.arange(perm.size)
        G = bounds.size - 1
        S = G * C
        self.modes = r.bits(S).astype(bool)
        rng = r.gamma(2 * S)
        los = unzigzag(rng[0::2] - np.uint64(1))
        ks = rng[1::2]
        if np.any(ks > np.uint64(1 << 62)) or np.any(self.modes & (ks > np.uint64(MAX_CATEGORICAL_K))) \
                or np.any(self.modes & (ks < 2)):
            raise LscFormatError(f"{what}: invalid symbol range in a group model")
        if np.any(los.astype(np.float64) + ks.astype(np.float64) > 2.0 ** 62):
            raise LscFormatError(f"{what}: symbol range overflows")
        self.exponents = e.astype(np.int64)
        self.los, self.ks = los, ks.astype(np.int64)
        counts = r.gamma(int(self.ks[self.modes].sum())).astype(np.int64) - 1
        # int32 halves what the lazy loader keeps resident; group sizes are far below 2^31 in valid files
        self.counts = counts.astype(np.int32) if counts.size == 0 or int(counts.max()) < 2**31 else counts
        r.finish()
        self.words = np.frombuffer(ans, dtype="<u4").astype(np.uint32)
        # where each categorical subgroup's table starts in self.counts
        self.table_start = np.concatenate([[0], np.cumsum(np.where(self.modes, self.ks, 0))]).astype(np.int64)
        self.segments = self._segments(segments or [[0, self.words.size]], G)

    def _segments(self, segments, G: int) -> list[tuple[int, int, int, int]]:
        """[(first group, end group, first word, end word)] of each independently coded ANS segment."""
        out, w = [], 0
        for j, (g0, words) in enumerate(segments):
            g1 = segments[j + 1][0] if j + 1 < len(segments) else G
            if (j == 0 and g0 != 0) or not 0 <= g0 < g1 <= G:
                raise LscFormatError(f"{self.what}: invalid ANS segment table")
            out.append((g0, g1, w, w + words))
            w += words
        if w != self.words.size:
            raise LscFormatError(f"{self.what}: ANS segments hold {w} words, the stream {self.words.size}")
        return out

    def value_range(self) -> tuple[int, int]:
        """Smallest and largest decoded value over all subgroups."""
        if self.los.size == 0:
            return 0, 0
        return int(self.los.min()), int((self.los + self.ks - 1).max())

    def __iter__(self):
        """Decode from the start of the ANS stream (each iteration is a fresh, complete pass)."""
        for j in range(len(self.segments)):
            yield from self.segment(j)

    def segment(self, j: int):
        """Decode ANS segment j alone (its groups' subgroups, in order)."""
        g0, g1, w0, w1 = self.segments[j]
        words = self.words[w0:w1]
        coder = constriction.stream.stack.AnsCoder(words) if words.size else constriction.stream.stack.AnsCoder()
        C = self.classes
        for g in range(g0, g1):
            a, b = int(self.bounds[g]), int(self.bounds[g + 1])
            for c, cols in enumerate(self.cols):
                x = g * C + c
                n = (b - a) * (self.nb if cols is None else cols.size)
                k, lo = int(self.ks[x]), int(self.los[x])
                if self.modes[x]:
                    toff = int(self.table_start[x])
                    counts = self.counts[toff:toff + k]
                    if int(counts.sum()) != n:
                        raise LscFormatError(f"{self.what}: group {g} table counts {int(counts.sum())} symbols, expected {n}")
                    s = coder.decode(_categorical(counts), n) if n else np.zeros(0, dtype=np.int32)
                elif k > 1 and n:
                    s = _decode_uniform(coder, n, k)
                    if s.size and int(s.max()) >= k:
                        raise LscFormatError(f"{self.what}: symbol outside its uniform range")
                else:
                    s = None
                yield a, b, cols, lo, s
        if not coder.is_empty():
            raise LscFormatError(f"{self.what}: entropy-coded stream has unused data")


def decode_positions(side: bytes, ans: bytes, P: int, nb: int, order: np.ndarray, bounds: np.ndarray, what: str,
                     segments=None, segment: int | None = None,
                     out: np.ndarray | None = None, classes: int = 1, units: int = 0,
                     stream: GroupStream | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode straight into row-major position order -> (q (P, nb), exponents (P,) int64).

    Row ``order[i]`` of ``q`` holds scan position ``i``, so the file decoder needs no
    reordering copy. ``segment``: decode only that ANS segment (only its rows are written).
    ``out`` (int32, (P, nb)) is filled and returned when every value fits int32 (the
    parallel decoder passes shared memory); otherwise a new array is. ``classes`` and
    ``units``: the tensor's row classes and block rows (from its header entry).
    ``stream``: the :class:`GroupStream` of these arguments, already parsed (a decoder that
    reads a tensor segment by segment parses its side information once).
    """
    gs = GroupStream(side, ans, P, nb, bounds, what, segments, classes, units) if stream is None else stream
    lo_all, hi_all = gs.value_range()
    fits32 = lo_all >= -(2**31) and hi_all <= 2**31 - 1
    if out is not None and fits32 and out.shape == (P, nb) and out.dtype == np.int32:
        q = out
    else:
        q = np.empty((P, nb), dtype=np.int32 if fits32 else np.int64)
    order = np.asarray(order)
    subgroups = gs if segment is None else gs.segment(segment)
    if gs.classes > 1:
        _fill_by_class(gs, subgroups, q, order)
        subgroups = ()
    for a, b, cols, lo, s in subgroups:
        if s is not None and q.dtype != s.dtype:
            s = s.astype(q.dtype)  # int64 files: add the offset in int64
        if b - a == 1:  # one position per group (every tensor with >= min_group blocks): a row view, no gather
            row = q[order[a]]
            if s is None:
                row.fill(lo)
            else:
                np.add(s, q.dtype.type(lo), out=row)
        elif s is None:
            q[order[a:b]] = lo
        else:
            q[order[a:b]] = (s + q.dtype.type(lo)).reshape(b - a, nb)
    e = np.empty(P, dtype=np.int64)
    e[order] = gs.exponents
    return q, e


def _fill_by_class(gs: GroupStream, subgroups, q: np.ndarray, order: np.ndarray) -> None:
    """Write a row-classed tensor's subgroups into ``q``. They arrive class by class for each group
    (``gs.classes`` of them per group): each class fills its contiguous columns of a buffer in class
    order, and one gather per group puts the blocks back in their order (3.5x faster than scattering
    every class into its columns: MiniLM's table 56 -> 16 ms)."""
    buf, dt = None, q.dtype.type
    for i, (a, b, cols, lo, s) in enumerate(subgroups):
        c = i % gs.classes
        if buf is None or buf.shape[0] < b - a:
            buf = np.empty((b - a, gs.nb), dtype=q.dtype)
        x0, x1 = int(gs.class_starts[c]), int(gs.class_starts[c + 1])
        part = buf[:b - a, x0:x1]
        if s is None:
            part.fill(lo)
        else:
            np.add(s.astype(q.dtype, copy=False).reshape(b - a, x1 - x0), dt(lo), out=part)
        if c == gs.classes - 1:
            if b - a == 1:
                np.take(buf[0], gs.inverse, out=q[order[a]])
            else:
                q[order[a:b]] = np.take(buf[:b - a], gs.inverse, axis=1)
