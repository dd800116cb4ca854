"""The fast decode paths give exactly what the plain ones give: Elias-gamma chain strategies,
entropy decoding in worker processes, and its fallbacks."""
import os

import numpy as np
import pytest
import torch
from torch import nn

import lsc
from lsc.codec import parallel, to_bytes
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
    narrow = BitReader(w.getvalue())._synchronized(v.size, 64, 32)  # tiny lanes: may not meet, never wrong
    assert narrow is None or np.array_equal(narrow, expected)


def test_gamma_reader_wide_values_and_truncation():
    v = np.array([1, 2**57 - 1, 2**57, 2**60 + 12345, 2**63 - 1, 3] * 50, dtype=np.uint64)
    w = BitWriter()
    w.gamma(v)
    data = w.getvalue()
    assert np.array_equal(BitReader(data).gamma(v.size), v)
    with pytest.raises(lsc.LscFormatError, match="Elias-gamma"):
        BitReader(data[: len(data) // 2]).gamma(v.size)


def _big_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 64), nn.LayerNorm(64), nn.Linear(64, 10))
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
    monkeypatch.setattr(parallel.StreamDecoder, "_start", lambda self, w: (used.append(w), real(self, w)))
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
    good = (b"", b"", 2, 4, order, bounds, "fine")
    garbage = (b"\x00\x01\xff", b"\x12" * 8, 2, 4, order, bounds, "layer.weight")
    with parallel.StreamDecoder([good, garbage], workers=2) as dec:
        assert dec.parallel
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
