"""A tensor's side information (docs/FORMAT.md, "Side information") comes from the file, so reading it
must cost memory proportional to it with a small constant: a crafted file of a few MiB must not make
the reader expand every bit into several int64 tables (an 8 MiB file once cost ~1.9 GB before any
check). And :class:`BitWriter` / :class:`BitReader` round-trip every value exactly."""
import tracemalloc
import zlib

import numpy as np
import pytest

import lsc
from lsc import LscFormatError
from lsc.codec.elias import BitReader, BitWriter
from lsc.codec.format import pack_prefix_header


def _spectral_file(side: bytes, shape, block, min_group: int, ans: bytes = b"") -> bytes:
    meta = {"name": "w", "kind": "spectral", "shape": list(shape), "dtype": "float32", "block": list(block),
            "transform": "dct", "mean": np.float32(0).tobytes().hex(), "std": np.float32(1).tobytes().hex(),
            "min_group": min_group, "scan": "rowmajor", "side": len(side)}
    stream = side + ans
    meta.update(len=len(stream), crc=zlib.crc32(stream))
    return pack_prefix_header({"format": "lsc", "writer": "test", "tensors": [meta]}) + stream


def _peak_bytes(fn) -> int:
    """Peak traced allocation (numpy's included) while ``fn`` runs, which must raise LscFormatError."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with pytest.raises(LscFormatError):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_random_side_information_of_several_mib_is_rejected_cheaply():
    side = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    data = _spectral_file(side, (64, 64), (8, 8), 1024)
    peak = _peak_bytes(lambda: lsc.load(data, workers=1))
    # the file itself and its copies are a few times its size; the old reader took ~230x
    assert peak < 16 * len(side), f"peak {peak / len(side):.1f}x the side information"


def test_side_information_of_huge_all_one_tables_is_read_in_proportional_memory():
    """Every frequency its own group, every group categorical with K = 32768, and then all-one bits: the
    reader walks 256 * 32768 one-bit table codes (count 0 each), the worst case for its lane traces. Before
    them, the 512 range codes span the whole stream: lanes that wide once walked a million steps."""
    P, K = 256, 1 << 15
    w = BitWriter()
    w.gamma(np.ones(P, dtype=np.uint64))          # exponents all 0
    w.bits(np.ones(P, dtype=np.uint8))            # every subgroup categorical
    w.gamma(np.tile(np.array([1, K], dtype=np.uint64), P))   # lo = 0, K = 32768
    w.bits(np.ones(P * K, dtype=np.uint8))        # the tables: P * K counts of 0
    side = w.getvalue()
    data = _spectral_file(side, (16, 16), (16, 16), 1)
    peak = _peak_bytes(lambda: lsc.load(data, workers=1))
    # the decoder's counts are 8 bytes per one-bit code, twice at once (64x the side information's bytes
    # each), the jump table 4; the old reader peaked at over 80 bytes per bit
    assert peak < 28 * 8 * len(side), f"peak {peak / len(side):.1f}x the side information"


def _mixed_stream(rng):
    """Chunks of gamma codes of values of every magnitude (1 .. 2**63 - 1) mixed with raw bits."""
    parts = []
    for _ in range(40):
        n = int(rng.integers(1, 3000))
        kind = rng.integers(0, 4)
        if kind == 0:
            v = rng.geometric(rng.choice([0.9, 0.3, 0.02]), n).astype(np.uint64)
        elif kind == 1:  # log-uniform over all 63 magnitudes, wide ones (> 2**57) included
            bits = rng.integers(0, 63, n).astype(np.uint64)
            v = (np.uint64(1) << bits) | (rng.integers(0, 2**63, n, dtype=np.uint64) & ((np.uint64(1) << bits) - np.uint64(1)))
        elif kind == 2:  # the extremes
            v = rng.choice(np.array([1, 2, 3, 2**56 - 1, 2**56, 2**57 - 1, 2**57, 2**62, 2**63 - 1], dtype=np.uint64), n)
        else:
            parts.append(("bits", rng.integers(0, 2, n).astype(np.uint8)))
            continue
        parts.append(("gamma", v))
    return parts


@pytest.mark.parametrize("seed", range(4))
def test_bit_writer_and_reader_round_trip(seed):
    rng = np.random.default_rng(seed)
    parts = _mixed_stream(rng)
    w = BitWriter()
    for kind, v in parts:
        getattr(w, kind)(v)
    data = w.getvalue()
    assert len(data) == -(-w.nbits // 8)
    r = BitReader(data)
    for kind, v in parts:
        if kind == "bits":
            assert np.array_equal(r.bits(v.size), v)
        else:
            # short reads walk, long ones use the lanes; a bound on the codes' length takes another path
            bound = 2 * int(v.max()).bit_length() - 1 if rng.random() < 0.3 else None
            got = r.gamma(v.size, max_code_bits=bound)
            assert got.dtype == np.uint64 and np.array_equal(got, v)
    assert r.remaining == 8 * len(data) - w.nbits
    r.finish()
    # one read of everything at once (no raw bits in between) gives the same values
    gammas = [v for kind, v in parts if kind == "gamma"]
    w = BitWriter()
    for v in gammas:
        w.gamma(v)
    allv = np.concatenate(gammas)
    r = BitReader(w.getvalue())
    assert np.array_equal(r.gamma(allv.size), allv)
    r.finish()
    for strategy in ("_walk", "_doubling", "_code_starts"):  # every chain strategy finds the same starts
        lengths = 2 * np.array([int(x).bit_length() for x in allv[:5000]]) - 1
        assert np.array_equal(getattr(BitReader(w.getvalue()), strategy)(lengths.size), np.cumsum(lengths) - lengths)


def test_reader_rejects_truncation_and_trailing_bits():
    w = BitWriter()
    w.gamma(np.array([5, 2**40, 1, 2**62 + 3], dtype=np.uint64))
    data = w.getvalue()
    with pytest.raises(LscFormatError, match="corrupt or truncated"):
        BitReader(data[:-3]).gamma(4)
    with pytest.raises(LscFormatError, match="truncated"):
        BitReader(data).bits(8 * len(data) + 1)
    r = BitReader(data + b"\x00")
    r.gamma(4)
    with pytest.raises(LscFormatError, match="trailing"):
        r.finish()
    with pytest.raises(LscFormatError, match="corrupt"):  # 63 zeros: no valid code is that long
        BitReader(bytes(8) + b"\xff" * 16).gamma(1)


@pytest.mark.parametrize("pattern", ["random", "ones"])
def test_bit_reader_memory_is_a_few_bytes_per_bit(pattern):
    """Reading every code of N bits (the jump table, the lanes, the values) stays below 24 bytes per bit,
    8 of which are the uint64 values returned when every code is one bit long."""
    N = 1 << 22
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, N // 8, dtype=np.uint8).tobytes() if pattern == "random" else b"\xff" * (N // 8)
    count = len(BitReader(data)._doubling(N)) if pattern == "random" else N  # the codes the stream holds
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        r = BitReader(data)
        try:
            vals = r.gamma(count)
        except LscFormatError:  # random bits may end in a corrupt code: the lanes and table were built anyway
            vals = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 24 * N, f"{peak / N:.1f} bytes per bit"
    if pattern == "ones":
        assert vals is not None and vals.size == N and (vals == 1).all()
