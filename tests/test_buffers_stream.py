"""The `buffers` stream (FORMAT.md §2.1b): crafted blobs are rejected before anything is allocated,
and non-finite float buffers never go through the lossy quantizer."""
import io
import json
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import lsc
from lsc.buffers import (decode_buffers, encode_buffers, float_buffers, quantize_buffers_, quantized_values,
                         _pack, _unpack)
from lsc.errors import LscFormatError

HUGE = 1 << 40  # values no machine could allocate: a check that comes after the allocation fails loudly


def _blob(entries, tol=1.0, payload=b"", comp=None):
    """A buffers stream as a writer (or an attacker) would lay it out."""
    comp = zlib.compress(json.dumps([tol, entries]).encode()) if comp is None else comp
    return b"LSCB1" + struct.pack("<I", len(comp)) + comp + payload


def _entry(name="a.x", shape=(2,), dtype="float32", kind=2, extra=1.0, lo=0, width=0):
    return [name, list(shape) if isinstance(shape, (list, tuple)) else shape, dtype, kind, extra, lo, width]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaNs included."""
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# ------------------------------------------------------------------ 1. the JSON inside is inflated with a cap

def test_json_zip_bomb_is_rejected_before_inflating_it_all():
    c = zlib.compressobj(1)
    comp = c.compress(b"[1.0,") + c.compress(b" " * (64 << 20)) + c.compress(b"[]]") + c.flush()
    with pytest.raises(LscFormatError, match="JSON"):
        decode_buffers(_blob(None, comp=comp))


def test_bytes_after_the_json_zlib_stream_are_rejected():
    comp = zlib.compress(json.dumps([1.0, [_entry()]]).encode()) + b"junk"
    with pytest.raises(LscFormatError, match="JSON"):
        decode_buffers(_blob(None, comp=comp))


@pytest.mark.parametrize("comp", [b"", b"not zlib", zlib.compress(b"[1.0, [")[:-3], zlib.compress(b"{]"),
                                  zlib.compress(b"[1.0, [], 3]"), zlib.compress(b"{}"), zlib.compress(b"[1.0, {}]"),
                                  zlib.compress(b"[" * 100000 + b"]" * 100000)])
def test_bad_json_is_a_format_error(comp):
    with pytest.raises(LscFormatError):
        decode_buffers(_blob(None, comp=comp))


@pytest.mark.parametrize("head", [b"", b"LSCB", b"LSCB2\0\0\0\0", b"LSCB1\x01\0", b"LSCB1\xff\xff\xff\xff"])
def test_bad_magic_or_json_length_is_a_format_error(head):
    with pytest.raises(LscFormatError):
        decode_buffers(head)


# ------------------------------------------------------------------ 2. entries are validated before any allocation

def test_negative_shape_cannot_cancel_the_value_cap():
    entries = [_entry("a.big", [HUGE]), _entry("a.neg", [-HUGE])]
    with pytest.raises(LscFormatError, match="shape"):
        decode_buffers(_blob(entries))


def test_total_value_cap_counts_every_entry():
    entries = [_entry(f"m{i}.x", [1 << 25]) for i in range(3)]  # each under 2^26, together over it
    with pytest.raises(LscFormatError, match="values"):
        decode_buffers(_blob(entries))


@pytest.mark.parametrize("field,bad", [
    ("shape", dict(shape=[-1])), ("shape", dict(shape=[2.0])), ("shape", dict(shape=[True])),
    ("shape", dict(shape=["2"])), ("shape", dict(shape=[0, HUGE])), ("shape", dict(shape=[1] * 65)),
    ("shape", dict(shape=2)),
    ("kind", dict(kind=3)), ("kind", dict(kind=-1)), ("kind", dict(kind=True)), ("kind", dict(kind="uniform")),
    ("kind", dict(kind=2.0)),
    ("width", dict(width=65)), ("width", dict(width=-1)), ("width", dict(width=1.5)), ("width", dict(width=False)),
    ("dtype", dict(dtype="int32")), ("dtype", dict(dtype="complex64")), ("dtype", dict(dtype="__class__")),
    ("dtype", dict(dtype="float")), ("dtype", dict(dtype=None)),
    ("extra", dict(extra="1")),
    ("extra", dict(extra=0.0)), ("extra", dict(extra=-1.0)), ("extra", dict(kind=0, extra=-1e-5)),
    ("lo", dict(lo=1 << 63)), ("lo", dict(lo=-(1 << 63) - 1)), ("lo", dict(lo=1.5)),
    ("lo", dict(lo=(1 << 63) - 2, width=2)),
    ("name", dict(name=7)), ("name", dict(name=None)),
])
def test_every_entry_field_is_checked(field, bad):
    e = _entry(**bad)
    payload = bytes(1) if bad.get("width") == 2 else b""  # the right size, so only the field is wrong
    with pytest.raises(LscFormatError, match=field):
        decode_buffers(_blob([e], payload=payload))


@pytest.mark.parametrize("entries", [[["a.x", [2], "float32", 2, 1.0, 0]], [None], ["a.x"], 5])
def test_malformed_entry_lists_are_rejected(entries):
    with pytest.raises(LscFormatError):
        decode_buffers(_blob(entries))


@pytest.mark.parametrize("tol", [float("nan"), float("inf"), 0.0, -1.0, "1", None, True])
def test_tol_must_be_a_positive_finite_number(tol):
    with pytest.raises(LscFormatError, match="tol"):
        decode_buffers(_blob([_entry()], tol=tol))


def test_payload_size_is_checked_before_unpacking():
    entries = [_entry("a.x", [1 << 20], lo=-(1 << 63), width=64)]  # needs 8 MiB of payload
    with pytest.raises(LscFormatError, match="truncated"):
        decode_buffers(_blob(entries, payload=bytes(100)))


def test_mean_needs_its_variance_entry_with_the_same_shape():
    with pytest.raises(LscFormatError, match="running_var"):
        decode_buffers(_blob([_entry("bn.running_mean", [3], kind=1, extra=1e-5)]))
    entries = [_entry("bn.running_var", [1], kind=0, extra=1e-5), _entry("bn.running_mean", [3], kind=1, extra=1e-5)]
    with pytest.raises(LscFormatError, match="running_var"):
        decode_buffers(_blob(entries))
    entries = [_entry("bn.running_var", [3], kind=2), _entry("bn.running_mean", [3], kind=1, extra=1e-5)]
    with pytest.raises(LscFormatError, match="running_var"):
        decode_buffers(_blob(entries))


@pytest.mark.parametrize("width", [1, 3, 7, 8, 13, 31, 32, 33, 52, 57, 63, 64])
def test_unpack_inverts_pack_at_every_width(width):
    rng = np.random.default_rng(width)
    lo = -(1 << 63) if width == 64 else -(1 << (width - 1))
    q = np.concatenate([[lo, lo + (1 << width) - 1], rng.integers(lo, lo + (1 << width) - 1, 997, endpoint=True)])
    lo2, w, data = _pack(q.astype(np.int64))
    assert w == width and len(data) == (q.size * width + 7) // 8
    assert np.array_equal(_unpack(lo2, w, data, q.size), q)


def test_wide_symbols_unpack_in_memory_proportional_to_the_values():
    n = 1 << 15
    u = np.arange(n, dtype="<u8") * np.uint64(0x9E3779B97F4A7C15)  # every bit plane busy
    blob = _blob([_entry("a.x", [n], dtype="float64", lo=-(1 << 63), width=64)], payload=u.tobytes())
    tracemalloc.start()
    try:
        out = decode_buffers(blob)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert torch.equal(out["a.x"], torch.from_numpy((u ^ np.uint64(1 << 63)).view(np.int64).astype(np.float64)))
    assert peak < 128 * n  # a deterministic count of numpy's allocations; unpacking bit by bit took ~1 KiB per value


# ------------------------------------------------------------------ 3. names and the end of the blob

def test_duplicate_names_are_rejected():
    entries = [_entry("x", [1], lo=1), _entry("x", [1], lo=2)]
    with pytest.raises(LscFormatError, match="duplicate"):
        decode_buffers(_blob(entries))


def test_bytes_after_the_last_entry_are_rejected():
    good = encode_buffers({"a.x": torch.randn(10)}, 2 ** -8)
    decode_buffers(good)
    with pytest.raises(LscFormatError, match="trailing"):
        decode_buffers(good + b"GARBAGE")


def test_every_truncation_of_a_real_blob_is_a_format_error():
    bufs = {"bn.running_mean": torch.randn(5), "bn.running_var": torch.rand(5), "p.s": torch.randn(3, 2)}
    blob = encode_buffers(bufs, 2 ** -8)
    for cut in range(len(blob)):
        with pytest.raises(LscFormatError):
            decode_buffers(blob[:cut])


# ------------------------------------------------------------------ 4. non-finite buffers are never quantized

def _special():
    return {"attn.mask": torch.full((4, 4), float("-inf")).triu(1),
            "p.init": torch.tensor([0.5, float("nan"), 1.0]),
            "p.big": torch.tensor([float("inf"), 1.0], dtype=torch.float64),
            "p.scale": torch.tensor([1.0, 2.0, 3.0]),
            "bn.running_mean": torch.tensor([0.1, float("nan")]), "bn.running_var": torch.tensor([1.0, 2.0]),
            "bn2.running_mean": torch.tensor([0.3, 0.2]), "bn2.running_var": torch.tensor([float("inf"), 2.0])}


def test_encode_decode_equals_quantized_values_with_non_finite_buffers():
    bufs = _special()
    dec = decode_buffers(encode_buffers(bufs, 2 ** -8))
    want = quantized_values(bufs, 2 ** -8)
    assert set(dec) == set(want) == {"p.scale", "bn.running_var", "bn2.running_mean"}
    for k in want:
        assert _same(dec[k], want[k]) and bool(torch.isfinite(dec[k]).all())


def test_non_finite_buffers_are_left_to_the_raw_path():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            for k, v in _special().items():
                self.register_buffer(k.replace(".", "_"), v)
    m = M()
    assert set(float_buffers(m)) == {"p_scale", "bn_running_var", "bn2_running_mean"}
    before = {k: v.clone() for k, v in m.state_dict().items()}
    quantize_buffers_(m, 2 ** -8)
    for k in ("attn_mask", "p_init", "p_big", "bn_running_mean", "bn2_running_var"):
        assert _same(getattr(m, k), before[k])


def test_saved_file_keeps_non_finite_buffers_exactly():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.register_buffer("mask", torch.full((4, 4), float("-inf")).triu(1))
            self.register_buffer("init", torch.tensor([0.5, float("nan"), 1.0]))
            self.register_buffer("scale", torch.tensor([1.0, 2.0, 3.0]))
    m = M()
    lsc.spectral(m)
    buf = io.BytesIO()
    lsc.save(m, buf, buffer_tolerance=2 ** -8)
    out = lsc.load(buf.getvalue())
    assert _same(out["mask"], m.mask) and _same(out["init"], m.init)
    assert _same(out["scale"], quantized_values({"scale": m.scale}, 2 ** -8)["scale"])


def test_variance_plus_eps_of_zero_is_not_quantized_in_the_log_domain():
    bufs = {"bn.running_var": torch.tensor([0.0, 1.0, 4.0]), "bn.running_mean": torch.tensor([0.5, -1.0, 2.0])}
    eps = {"bn": 0.0}
    dec = decode_buffers(encode_buffers(bufs, 2 ** -8, eps))
    want = quantized_values(bufs, 2 ** -8, eps)
    for k in bufs:
        assert _same(dec[k], want[k]) and bool(torch.isfinite(dec[k]).all())
    assert float((dec["bn.running_mean"] - bufs["bn.running_mean"]).abs().max()) < 0.1


def test_values_too_large_for_their_step_raise_instead_of_wrapping():
    bufs = {"a.x": torch.tensor([1e30, 1e30 + 2e14], dtype=torch.float64)}  # |q| ~ 2^69 at this tolerance
    with pytest.raises(lsc.LscError, match="a.x"):
        encode_buffers(bufs, 2 ** -16)
    with pytest.raises(lsc.LscError, match="tolerance"):
        encode_buffers({"a.x": torch.randn(3)}, float("nan"))


def test_the_writer_never_writes_what_the_reader_rejects(monkeypatch):
    import lsc.buffers as lb
    monkeypatch.setattr(lb, "MAX_DECODED_VALUES", 10)
    with pytest.raises(lsc.LscError, match="values"):
        encode_buffers({"a.x": torch.randn(11)})
    monkeypatch.setattr(lb, "MAX_JSON_BYTES", 64)
    with pytest.raises(lsc.LscError, match="JSON"):
        encode_buffers({"a." + "x" * 100: torch.randn(3)})


def test_float8_fnuz_buffers_round_trip_in_the_blob():
    """lsc 0.3's first writer put float8 *fnuz* buffers in the blob; its files must stay readable."""
    if not hasattr(torch, "float8_e4m3fnuz"):
        pytest.skip("this torch has no float8_e4m3fnuz")
    b = torch.tensor([0.375, 1.5, 0.9375]).to(torch.float8_e4m3fnuz)
    out = decode_buffers(encode_buffers({"f8": b}, 0.01))["f8"]
    assert out.dtype == b.dtype and torch.equal(out.float(), quantized_values({"f8": b}, 0.01)["f8"].float())


def test_a_non_finite_step_written_by_the_first_0_3_writer_still_loads():
    """That writer stored a buffer holding an inf with a NaN or inf step: its values decode to NaN, as they
    did then, and the rest of the file (the weights) loads."""
    for extra in (float("nan"), float("inf")):
        out = decode_buffers(_blob([_entry("m.mask", [2], kind=2, extra=extra, lo=0, width=1)], payload=b"\x02"))
        assert out["m.mask"].shape == (2,) and not torch.isfinite(out["m.mask"]).any()


@pytest.mark.parametrize("dtype,value,decoded", [
    # just above the float16 tie between 1 and 1 + 2^-10: float32 rounds it onto the tie, which goes to even (1)
    ("float16", 1 + 2 ** -11 + 2 ** -40, 1.0),
    ("bfloat16", 1 + 2 ** -8 + 2 ** -40, 1.0),
    # a value float32 keeps: one rounding, the nearest float16
    ("float16", 1 + 2 ** -11 + 2 ** -20, 1 + 2 ** -10),
])
def test_narrow_buffers_round_through_float32_as_the_spec_says(dtype, value, decoded):
    """FORMAT.md §2.1b: a float64 value is cast to float32, then to the narrower dtype, each to nearest even."""
    got = decode_buffers(_blob([_entry(dtype=dtype, extra=value, lo=1)]))["a.x"]
    assert got.dtype == getattr(torch, dtype) and got.tolist() == [decoded, decoded]
