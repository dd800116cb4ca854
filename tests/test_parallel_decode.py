"""The fast decode paths give exactly what the plain ones give: Elias-gamma chain strategies,
entropy decoding in worker processes, and its fallbacks."""
import os

import numpy as np
import pytest
import torch
from torch import nn

import lsc
from lsc.codec import parallel, to_bytes
from lsc import LscFormatError
from lsc.codec.elias import BitReader, BitWriter, _bitlen

linux_fork = pytest.mark.skipif(parallel.default_workers() < 2, reason="needs Linux fork and 2 CPUs")


def _gamma_stream(rng, sizes, p):
    values = [rng.geometric(p, n).astype(np.uint64) for n in sizes]
    w = BitWriter()
    for v in values:
        w.gamma(v)
        w.bits(np.array([1, 0, 1]))
    return values, w.getvalue()


@pytest.mark.parametrize("p", [0.95, 0.3, 0.02, 0.0005])
def test_gamma_reader_strategies_agree(p):
    rng = np.random.default_rng(int(p * 1e4))
    values, data = _gamma_stream(rng, [3, 200, 5000, 40000], p)
    r = BitReader(data)
    for v in values:
        assert np.array_equal(r.gamma(v.size), v)
        assert r.bits(3).tolist() == [1, 0, 1]
    r.finish()
    # every strategy finds the same code starts (the synchronized lanes must not guess)
    v = values[-1]
    lengths = 2 * _bitlen(v) - 1
    expected = np.cumsum(lengths) - lengths
    w = BitWriter()
    w.gamma(v)
    for strategy in ("_walk", "_doubling", "_code_starts"):
        assert np.array_equal(getattr(BitReader(w.getvalue()), strategy)(v.size), expected), strategy
    data = w.getvalue()
    narrow = BitReader(data)._synchronized(v.size, 64, 32, 8 * len(data))  # tiny lanes: may not meet, never wrong
    assert narrow is None or np.array_equal(narrow, expected)
    part = BitReader(data)._synchronized(v.size, 4096, 1024, int(expected[v.size // 3]))  # a span: its starts only
    assert part is None or np.array_equal(part, expected[: v.size // 3])


def test_gamma_reader_short_codes_before_long_ones():
    """A read of short codes followed by long ones (row-class labels, then a tensor's tables): the reader's
    span grows until it holds every code, and the next read starts right after the last one."""
    rng = np.random.default_rng(1)
    short = rng.integers(1, 4, 20000).astype(np.uint64)
    long = rng.integers(2**30, 2**40, 3000).astype(np.uint64)
    w = BitWriter()
    w.gamma(short)
    w.gamma(long)
    w.gamma(short[:500])
    data = w.getvalue()
    r = BitReader(data)
    assert np.array_equal(r.gamma(300, max_code_bits=3), short[:300])
    assert np.array_equal(r.gamma(short.size - 300, max_code_bits=3), short[300:])
    assert np.array_equal(r.gamma(long.size), long)
    assert np.array_equal(r.gamma(500), short[:500])
    r.finish()
    with pytest.raises(LscFormatError):
        BitReader(data).gamma(short.size + long.size + 501)
    with pytest.raises(LscFormatError, match="corrupt or truncated"):  # codes beyond the caller's bound
        BitReader(data).gamma(short.size + 1000, max_code_bits=3)
    # lanes too narrow to meet among the long codes still give every short code's start
    lengths = 2 * _bitlen(short) - 1
    starts = BitReader(data)._synchronized(short.size, 64, 32, 8 * len(data))
    assert starts is not None and np.array_equal(starts, np.cumsum(lengths) - lengths)
    assert BitReader(data)._synchronized(short.size + long.size, 64, 32, 8 * len(data)) is None


def test_gamma_reader_wide_values_and_truncation():
    v = np.array([1, 2**57 - 1, 2**57, 2**60 + 12345, 2**63 - 1, 3] * 50, dtype=np.uint64)
    w = BitWriter()
    w.gamma(v)
    data = w.getvalue()
    assert np.array_equal(BitReader(data).gamma(v.size), v)
    with pytest.raises(lsc.LscFormatError, match="Elias-gamma"):
        BitReader(data[: len(data) // 2]).gamma(v.size)


def _plain_model():
    return nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 64), nn.LayerNorm(64), nn.Linear(64, 10))


def _big_model():
    torch.manual_seed(0)
    m = _plain_model()
    lsc.spectral(m, init_bits=8)
    m.eval()
    return m, to_bytes(lsc.compress_weights(m))


def _same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@linux_fork
def test_parallel_decode_is_bitwise_the_serial_decode(monkeypatch):
    model, data = _big_model()
    serial = lsc.load(data, workers=1)
    monkeypatch.setattr(parallel, "MIN_PARALLEL_SYMBOLS", 0)
    used = []
    real = parallel.StreamDecoder._start
    monkeypatch.setattr(parallel.StreamDecoder, "_start", lambda self, *a: (used.append(a[2]), real(self, *a)))
    _same(lsc.load(data, workers=2), serial)
    assert used == [2]
    # into a spectral model, whose coefficients are set from the integers in shared memory
    a, _ = _big_model()
    b, _ = _big_model()
    lsc.load(data, a, workers=2)
    lsc.load(data, b, workers=1)
    _same(a.state_dict(), b.state_dict())
    a.eval()
    with torch.no_grad():  # eval weights: the file's, which are the trained model's
        x = torch.randn(5, 96)
        assert torch.equal(a(x), model(x))


@linux_fork
def test_parallel_decode_reports_undecodable_streams(monkeypatch):
    """A stream that passes its checksum but does not decode raises LscFormatError naming it."""
    monkeypatch.setattr(parallel, "MIN_PARALLEL_SYMBOLS", 0)
    bounds = np.array([0, 1, 2])
    order = np.arange(2)
    good = (b"", b"", 2, 4, order, bounds, "fine", None, 1, 0)
    garbage = (b"\x00\x01\xff", b"\x12" * 8, 2, 64, order, bounds, "layer.weight", None, 1, 0)
    with parallel.StreamDecoder([good, garbage], workers=2) as dec:
        assert dec.parallel and 1 in dec._remote  # the larger job went to the worker process
        assert sorted(dec.completed()) == [0, 1]
        with pytest.raises(lsc.LscFormatError, match=r"layer\.weight"):
            dec.get(1)


def _die_in_worker(token, i):
    os._exit(3)


@linux_fork
def test_parallel_decode_falls_back_when_workers_die(monkeypatch):
    _, data = _big_model()
    serial = lsc.load(data, workers=1)
    monkeypatch.setattr(parallel, "MIN_PARALLEL_SYMBOLS", 0)
    monkeypatch.setattr(parallel, "_work", _die_in_worker)  # forked workers inherit the patch
    _same(lsc.load(data, workers=2), serial)


def test_decode_falls_back_when_processes_cannot_start(monkeypatch):
    _, data = _big_model()
    serial = lsc.load(data, workers=1)
    monkeypatch.setattr(parallel, "MIN_PARALLEL_SYMBOLS", 0)

    def refuse(*a, **k):
        raise AssertionError("daemonic processes are not allowed to have children")
    monkeypatch.setattr(parallel.cf, "ProcessPoolExecutor", refuse)
    _same(lsc.load(data, workers=2), serial)


@linux_fork
def test_a_fork_that_fails_part_way_leaves_no_worker_behind(monkeypatch):
    """The OS refusing the second fork (EAGAIN) used to leave the first worker blocked on the call queue:
    the load fell back and gave the right weights, but the interpreter then waited for it forever at exit."""
    _, data = _big_model()
    serial = lsc.load(data, workers=1)
    monkeypatch.setattr(parallel, "MIN_PARALLEL_SYMBOLS", 0)
    real_fork, forks = os.fork, []

    def fork():
        forks.append(1)
        if len(forks) == 2:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_fork()
    monkeypatch.setattr(os, "fork", fork)
    _same(lsc.load(data, workers=3), serial)
    monkeypatch.setattr(os, "fork", real_fork)
    import multiprocessing
    assert len(forks) == 2 and not multiprocessing.active_children()


@pytest.mark.parametrize("workers", [1, 2])
def test_the_first_bad_tensor_in_file_order_is_named(monkeypatch, workers):
    """A bad raw stream late in the file must not hide a bad spectral one before it."""
    import zlib
    from lsc.codec.api import _header_bytes, _parts_from_bytes
    monkeypatch.setattr(parallel, "MIN_PARALLEL_SYMBOLS", 0)
    torch.manual_seed(0)
    model = _plain_model()
    with torch.no_grad():
        model[4].weight.zero_()  # written raw (excluded below) and zlib-compressed
        model[4].bias.zero_()
    lsc.spectral(model, init_bits=8, exclude="4.*")
    header, streams, _ = _parts_from_bytes(to_bytes(lsc.compress_weights(model.eval())))
    streams = [bytes(x) for x in streams]
    kinds = [m["kind"] for m in header["tensors"]]
    spec, raw = kinds.index("spectral"), len(kinds) - 1 - kinds[::-1].index("raw")
    assert spec < raw
    streams[spec] += b"\x01\x00\x00\x00"  # one stray ANS word
    assert header["tensors"][raw]["zlib"]
    streams[raw] = b"\xff" * len(streams[raw])  # not a zlib stream
    metas = [dict(m, len=len(x), crc=zlib.crc32(x)) for m, x in zip(header["tensors"], streams)]
    bad = _header_bytes(metas, header) + b"".join(streams)
    with pytest.raises(lsc.LscFormatError, match=rf"^{header['tensors'][spec]['name']}: "):
        lsc.load(bad, workers=workers)


def _segmented(monkeypatch):
    """A file whose larger tensors are cut into several ANS segments."""
    from lsc.codec import entropy
    monkeypatch.setattr(entropy, "SEGMENT_SYMBOLS", 2000)
    model, data = _big_model()
    metas = lsc.codec.api._parts_from_bytes(data)[0]["tensors"]
    assert max(len(m.get("segments", [])) for m in metas) >= 4
    return model, data


def test_segmented_streams_decode_exactly(monkeypatch):
    model, data = _segmented(monkeypatch)
    plain = lsc.load(data, workers=1)
    for name, w in [("0.weight", model[0].weight), ("2.weight", model[2].weight)]:
        assert torch.equal(plain[name], w)
    lazy = lsc.load(data, _plain_model(), lazy="entropy")
    with torch.no_grad():
        x = torch.randn(3, 96)
        assert torch.equal(lazy(x), model(x))


@linux_fork
def test_segments_spread_over_workers(monkeypatch):
    model, data = _segmented(monkeypatch)
    serial = lsc.load(data, workers=1)
    monkeypatch.setattr(parallel, "MIN_PARALLEL_SYMBOLS", 0)
    split = []
    real = parallel.StreamDecoder._plan
    monkeypatch.setattr(parallel.StreamDecoder, "_plan",
                        staticmethod(lambda costs, w, c: split.append(real(costs, w, c)) or split[-1]))
    _same(lsc.load(data, workers=3), serial)
    assert any(split[0]) and not all(split[0])  # some units in workers, some decoded by the caller


def test_bad_segment_tables_are_format_errors():
    from lsc.codec.entropy import GroupStream
    bounds = np.array([0, 1, 2])
    w = BitWriter()
    w.gamma(np.array([1, 1], dtype=np.uint64))   # exponents
    w.bits(np.array([0, 0]))                     # modes: uniform
    w.gamma(np.array([1, 1, 1, 1], dtype=np.uint64))  # lo = 0, K = 1 for both groups
    side = w.getvalue()
    GroupStream(side, b"", 2, 4, bounds, "t", [[0, 0], [1, 0]])  # valid: two empty segments
    for bad in ([[1, 0]], [[0, 0], [0, 0]], [[0, 0], [5, 0]], [[0, 1]]):
        with pytest.raises(lsc.LscFormatError, match="segment"):
            GroupStream(side, b"", 2, 4, bounds, "t", bad)
