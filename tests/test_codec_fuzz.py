"""Property test: no mutation or truncation of a valid .lsc file escapes as anything but LscFormatError, or hangs."""
import json
import signal
import struct
import zlib

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import lsc  # noqa: E402
from lsc.codec import to_bytes  # noqa: E402
from lsc.codec.format import MAGIC, PREFIX_SIZE  # noqa: E402

CASE_TIMEOUT_S = 5


def _valid_file() -> bytes:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(24, 3))
    lsc.spectral(model, init_bits=4, min_group_symbols=8)
    return to_bytes(lsc.compress_weights(model))


GOOD = _valid_file()
_HLEN = struct.unpack_from("<I", GOOD, 12)[0]
HEADER = json.loads(zlib.decompress(GOOD[PREFIX_SIZE:PREFIX_SIZE + _HLEN]))
DATA = GOOD[PREFIX_SIZE + _HLEN:]


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _must_fail_cleanly(data: bytes) -> None:
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
    try:
        lsc.load(data)
    except lsc.LscFormatError:
        pass
    except _Timeout:
        pytest.fail("decoding hung")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _repack(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    comp = zlib.compress(raw)
    return struct.pack("<8sIIII", MAGIC, 1, len(comp), len(raw), zlib.crc32(comp)) + comp + data


FUZZ = settings(max_examples=1200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FUZZ
@given(cut=st.integers(0, len(GOOD)),
       flips=st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(1, 255)), max_size=4))
def test_mutated_or_truncated_bytes(cut, flips):
    data = bytearray(GOOD)
    for pos, x in flips:
        data[pos] ^= x
    _must_fail_cleanly(bytes(data[:cut]) if cut < len(GOOD) else bytes(data))


_json_value = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=6)
                           | st.floats(allow_nan=True),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                           max_leaves=6)


@FUZZ
@given(tensor=st.integers(0, len(HEADER["tensors"]) - 1), key=st.sampled_from(
    ["name", "kind", "shape", "dtype", "block", "transform", "mean", "std", "min_group", "scan", "side", "len", "crc",
     "zlib", "tied"]), value=_json_value, flips=st.lists(st.tuples(st.integers(0, len(DATA) - 1), st.integers(1, 255)),
                                                          max_size=3), fix_crc=st.booleans())
def test_mutated_header_with_valid_checksums(tensor, key, value, flips, fix_crc):
    """Header fields and stream bytes changed behind valid checksums reach the deep validation and the decoder."""
    header = json.loads(json.dumps(HEADER))
    if key != "name" or not flips:
        header["tensors"][tensor][key] = value
    data = bytearray(DATA)
    for pos, x in flips:
        data[pos] ^= x
    if fix_crc:  # recompute stream checksums so corrupt streams reach the entropy decoder
        off = 0
        for m in header["tensors"]:
            n = m.get("len") if isinstance(m.get("len"), int) and m.get("len") >= 0 else 0
            m["crc"] = zlib.crc32(bytes(data[off:off + n]))
            off += n
    _must_fail_cleanly(_repack(header, bytes(data)))
