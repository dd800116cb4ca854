"""compress_weights / decompress_weights / save / load / file_info.

There is one encoder: :func:`compress_weights` returns a dict of uint8 tensors
(``"__lsc__"``: prefix + header, then one stream per tensor, keyed by name), and
the .lsc file is exactly those byte strings concatenated (:func:`to_bytes`).
Reading a file slices it back into the same dict, so files and compressed state
dicts go through the same validation and decoder. Spectral tensors are decoded
with :func:`lsc.reconstruct.reconstruct`, the function the eval-mode forward
uses, so decoded weights equal the spectral model's eval weights bit for bit.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import zlib
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import buffers as buffers_mod
from ..atomic import atomic_write_bytes, check_writable
from ..blocking import MAX_BLOCK_DIM, MAX_BLOCK_NUMEL, BlockLayout
from ..errors import LscError, LscFormatError, format_errors
from ..grouping import position_groups
from ..morton import morton_order, rowmajor_order
from ..precision import full_precision
from ..quantizer import dequantize, integer_coefficients
from ..reconstruct import compute_dtype_for, reconstruct
from ..rowclasses import MAX_CLASSES, propose_row_classes, row_units
from ..state import QNET_PREFIX, check_attached, get_state, resolve, spectral_root, spectral_state_filter
from ..transforms import TRANSFORMS
from ..wrappers import require_module, unwrap
from .entropy import encode_symbols, group_bounds
from .format import (check_stream, pack_prefix_header, parse_prefix_header, split_streams,
                     zlib_decompress_exact)
from .parallel import StreamDecoder

__all__ = ["compress_weights", "decompress_weights", "save", "load", "file_info", "to_bytes", "from_bytes", "recode",
           "HEADER_KEY"]

HEADER_KEY = "__lsc__"
BUFFERS_KEY = "__lsc_buffers__"  # the one stream holding quantized float buffers, when asked for
MAX_TENSOR_NUMEL = 1 << 34
MAX_SEGMENTS = 1 << 16
_ZLIB_MAX_RATIO = 1100  # deflate cannot expand data more than ~1032x

_DTYPES = {name: getattr(torch, name) for name in (
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128", "bool",
    "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float8_e4m3fn", "float8_e5m2") if isinstance(getattr(torch, name, None), torch.dtype)}
_SPECTRAL_DTYPES = ("float16", "bfloat16", "float32", "float64")
_SCANS = {"morton": morton_order, "rowmajor": rowmajor_order}


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()  # lazy conjugate / negative views hold other bytes
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def _u8(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


# --------------------------------------------------------------------------- encoding

def spectral_meta(entry, min_group: int, scan: str) -> dict:
    """A spectral tensor's header entry without the coding fields (side, segments, classes, len, crc),
    which :func:`_encode_integers` and :func:`compress_weights` add; the size prediction reads it too."""
    par = entry.parametrization
    meta = {"name": entry.name, "kind": "spectral", "shape": list(par.layout.shape), "dtype": _dtype_name(par.orig_dtype),
            "block": list(par.layout.block_shape), "transform": par.transform, "mean": _tensor_bytes(par.mean).hex(),
            "std": _tensor_bytes(par.std).hex(), "min_group": int(min_group), "scan": scan}
    if entry.tied_names:
        meta["tied"] = list(entry.tied_names)
    return meta


def _encode_spectral(entry, min_group: int, scan: str) -> tuple[dict, bytes]:
    par = entry.parametrization
    q, e = par.integer_state(entry.coefficients.detach())
    return _encode_integers(spectral_meta(entry, min_group, scan), par.layout,
                            q.to("cpu").reshape(par.layout.num_blocks, par.layout.block_numel), e)


def _encode_integers(meta: dict, layout: BlockLayout, q: torch.Tensor, e: torch.Tensor) -> tuple[dict, bytes]:
    """Entropy-code integer coefficients (num_blocks, P) and exponents (P,) -> (header entry, stream).

    ``meta`` holds the entry's other fields (name, shape, dtype, block, transform, mean, std,
    min_group, scan, tied); the coding fields (side, segments, classes) are set here."""
    units = row_units(layout)
    labels = propose_row_classes(q, units)[0].numpy() if units else None
    q = q.numpy()
    e = e.to("cpu").numpy().astype(np.int64)
    order = _SCANS[meta["scan"]](layout.block_shape)
    bounds = group_bounds(position_groups(layout, meta["min_group"], meta["scan"]), order)
    side, ans, _, segments, classes = encode_symbols(np.ascontiguousarray(q[:, order].T), e[order], bounds,
                                                     units=units, labels=labels)
    meta = {k: v for k, v in meta.items() if k not in ("side", "segments", "classes", "len", "crc")}
    meta["side"] = len(side)
    if segments:
        meta["segments"] = segments
    if classes > 1:
        meta["classes"] = classes
    return meta, side + ans


def _header_bytes(metas: list[dict], base: dict | None = None) -> bytes:
    """Prefix + header for these tensor entries, in the oldest format version that holds them
    (version 2 readers can read files without row classes)."""
    from .. import __version__
    version = 3 if any("classes" in m for m in metas) else 2
    return pack_prefix_header({"format": "lsc", **(base or {}), "writer": f"lsc {__version__}", "tensors": metas}, version)


def _encode_raw(name: str, t: torch.Tensor) -> tuple[dict, bytes]:
    data = _tensor_bytes(t)
    comp = zlib.compress(data, 9) if data else b""
    use_zlib = len(comp) < len(data)
    meta = {"name": name, "kind": "raw", "shape": list(t.shape), "dtype": _dtype_name(t.dtype), "zlib": use_zlib}
    return meta, comp if use_zlib else data


def _encode_buffers(model: nn.Module, buffers: dict[str, torch.Tensor], tol: float) -> tuple[dict, bytes]:
    """The buffers stream of ``buffers`` (``float_buffers(model)``: the ones the lossy coder takes)."""
    if not tol > 0:
        raise LscError(f"buffer_tolerance must be > 0, got {tol}")
    blob = buffers_mod.encode_buffers(buffers, tol, buffers_mod._bn_eps(model))
    return {"name": BUFFERS_KEY, "kind": "buffers", "shape": [len(blob)], "dtype": "uint8"}, blob


@full_precision
def compress_weights(model: nn.Module, *, scan: str = "morton", buffer_tolerance: float | None = None) -> dict[str, torch.Tensor]:
    """Entropy-code a spectral model -> self-contained dict of uint8 tensors (torch.save-able).

    ``decompress_weights`` turns it back into a plain state_dict with the original
    model's keys; ``to_bytes`` gives the exact bytes of the .lsc file ``lsc.save`` writes.
    ``scan`` ("morton" or "rowmajor") is the in-block scan; keep the default (the
    training rate estimate assumes it). With ``buffer_tolerance`` (e.g. ``2**-8``) float
    buffers such as BatchNorm statistics are quantized (see :mod:`lsc.buffers`) instead
    of stored exactly; ``lsc.quantize_buffers_(model, tol)`` makes the in-memory model
    match the file bit for bit.
    """
    if scan not in _SCANS:
        raise LscError(f"unknown scan {scan!r}; use 'morton' or 'rowmajor'")
    st = check_attached(model, alone=True)
    model = spectral_root(model)  # names as the user's model has them, not a compile / DDP wrapper's
    min_group = int(st.config.get("min_group_symbols", 1024))
    covered = set()
    metas, streams = [], []
    with torch.no_grad():
        if buffer_tolerance is not None:
            lossy = buffers_mod.float_buffers(model)
            meta, data = _encode_buffers(model, lossy, float(buffer_tolerance))
            metas.append(meta)
            streams.append(data)
            covered.update(lossy)
        for entry in st.entries:
            meta, data = _encode_spectral(entry, min_group, scan)
            metas.append(meta)
            streams.append(data)
            covered.add(entry.name)
            covered.update(entry.tied_names)
        for meta, data in raw_entries(model, covered, _encode_raw):
            metas.append(meta)
            streams.append(data)
    for meta, data in zip(metas, streams):
        meta["len"] = len(data)
        meta["crc"] = zlib.crc32(data)
    head = _header_bytes(metas)
    out = {HEADER_KEY: _u8(head)}
    for meta, data in zip(metas, streams):
        out[meta["name"]] = _u8(data)
    return out


def raw_entries(model: nn.Module, covered: set, encode) -> list[tuple[dict, Any]]:
    """``encode(name, tensor) -> (header entry, result)`` for every state-dict tensor the file stores raw, in
    file order: neither lsc's own state nor a name in ``covered``; a tensor tied under several names once,
    its other names listed in the entry's ``tied``."""
    lsc_own = spectral_state_filter(model)
    first: dict[int, dict] = {}
    out = []
    for key, t in model.state_dict(keep_vars=True).items():
        if key.startswith(QNET_PREFIX) or key in covered:
            continue
        if not isinstance(t, torch.Tensor):
            raise LscError(f"{key}: the model's state dict holds a {type(t).__name__}, not a tensor (a module's extra "
                           "state?), which a .lsc file cannot store")
        if lsc_own(key, t):
            continue
        if key == HEADER_KEY:
            raise LscError(f"a model tensor is named {HEADER_KEY!r}, which lsc reserves")
        if id(t) in first:
            first[id(t)].setdefault("tied", []).append(key)
            continue
        meta, result = encode(key, t)
        first[id(t)] = meta
        out.append((meta, result))
    return out


def to_bytes(compressed: dict[str, torch.Tensor]) -> bytes:
    """The .lsc file contents of a dict returned by :func:`compress_weights` (validated first)."""
    header, streams, _ = _parts_from_dict(compressed)
    return _as_bytes(compressed[HEADER_KEY]) + b"".join(bytes(s) for s in streams)


def from_bytes(data) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_bytes`: file bytes -> compressed dict (validated)."""
    header, streams, hsize = _parts_from_bytes(data)
    out = {HEADER_KEY: _u8(bytes(memoryview(data)[:hsize]))}
    for meta, s in zip(header["tensors"], streams):
        out[meta["name"]] = _u8(bytes(s))
    return out


# --------------------------------------------------------------------------- validation

def _fail(msg: str):
    raise LscFormatError(msg)


def _int(v, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        _fail(f"header: {what} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _validate_header(header: dict) -> list[dict]:
    try:
        return _check_header(header)
    except LscFormatError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        raise LscFormatError(f"header: malformed ({type(exc).__name__}: {exc})") from None


def _str_in(v, choices) -> bool:
    return isinstance(v, str) and v in choices


def _check_header(header: dict) -> list[dict]:
    if header.get("format") != "lsc":
        _fail("header: missing 'format': 'lsc'")
    tensors = header.get("tensors")
    if not isinstance(tensors, list):
        _fail("header: 'tensors' must be a list")
    names = set()
    for i, m in enumerate(tensors):
        if not isinstance(m, dict):
            _fail(f"header: tensor #{i} is not an object")
        name = m.get("name")
        if not isinstance(name, str) or not name or name == HEADER_KEY:
            _fail(f"header: tensor #{i} has an invalid name")
        tied = m.get("tied", [])
        if not isinstance(tied, list) or not all(isinstance(t, str) and t and t != HEADER_KEY for t in tied):
            _fail(f"header: {name}: invalid tied names")
        for n in [name, *tied]:
            if n in names:
                _fail(f"header: duplicate tensor name {n!r}")
            names.add(n)
        shape = m.get("shape")
        if not isinstance(shape, list) or len(shape) > 64:
            _fail(f"header: {name}: invalid shape")
        for s in shape:
            _int(s, f"{name}: shape entry", 0, MAX_TENSOR_NUMEL)
        if math.prod(shape) > MAX_TENSOR_NUMEL:
            _fail(f"header: {name}: {math.prod(shape)} elements is over the {MAX_TENSOR_NUMEL} cap")
        if not _str_in(m.get("dtype"), _DTYPES):
            _fail(f"header: {name}: unsupported dtype {m.get('dtype')!r}")
        _int(m.get("len"), f"{name}: len")
        _int(m.get("crc"), f"{name}: crc", 0, 0xFFFFFFFF)
        kind = m.get("kind")
        if kind == "raw":
            if not isinstance(m.get("zlib"), bool):
                _fail(f"header: {name}: 'zlib' must be true or false")
            nbytes = math.prod(shape) * _DTYPES[m["dtype"]].itemsize
            if (not m["zlib"] and m["len"] != nbytes) or (m["zlib"] and nbytes > _ZLIB_MAX_RATIO * m["len"] + 64):
                _fail(f"header: {name}: stream length {m['len']} cannot hold {nbytes} bytes of data")
        elif kind == "buffers":
            if name != BUFFERS_KEY or m["dtype"] != "uint8" or shape != [m["len"]]:
                _fail(f"header: {name}: invalid buffers stream")
        elif kind == "spectral":
            if m["dtype"] not in _SPECTRAL_DTYPES:
                _fail(f"header: {name}: spectral tensors must be floating point")
            block = m.get("block")
            if not isinstance(block, list) or len(block) != len(shape):
                _fail(f"header: {name}: block must have one entry per dimension")
            for b, s in zip(block, shape):
                _int(b, f"{name}: block size", 1, min(max(s, 1), MAX_BLOCK_DIM))
            if math.prod(block) > MAX_BLOCK_NUMEL or math.prod(shape) == 0:
                _fail(f"header: {name}: invalid block layout")
            if not _str_in(m.get("transform"), TRANSFORMS):
                _fail(f"header: {name}: unknown transform {m.get('transform')!r} (register it with lsc.transforms.register_transform)")
            if not _str_in(m.get("scan"), _SCANS):
                _fail(f"header: {name}: unknown scan {m.get('scan')!r}")
            _int(m.get("min_group"), f"{name}: min_group", 1)
            side = _int(m.get("side"), f"{name}: side", 0, m["len"])
            if (m["len"] - side) % 4:
                _fail(f"header: {name}: entropy-coded stream length is not a whole number of 32-bit words")
            segs = m.get("segments", [])
            if not isinstance(segs, list) or len(segs) > MAX_SEGMENTS or not all(
                    isinstance(g, list) and len(g) == 2 for g in segs):
                _fail(f"header: {name}: invalid ANS segments")
            for g in segs:
                _int(g[0], f"{name}: segment group", 0, 1 << 40)
                _int(g[1], f"{name}: segment words", 0, m["len"])
            if "classes" in m:
                _int(m["classes"], f"{name}: classes", 2, MAX_CLASSES)
                if m["classes"] > row_units(BlockLayout(tuple(shape), tuple(block))):
                    _fail(f"header: {name}: {m['classes']} row classes, but the tensor cannot have that many")
            isz = compute_dtype_for(_DTYPES[m["dtype"]]).itemsize
            for key in ("mean", "std"):
                v = m.get(key)
                if not isinstance(v, str) or len(v) != 2 * isz or not re.fullmatch(r"[0-9a-f]*", v):
                    _fail(f"header: {name}: invalid {key}")
        else:
            _fail(f"header: {name}: unknown kind {kind!r}")
    return tensors


def _parts_from_bytes(data):
    header, off = parse_prefix_header(data)
    metas = _validate_header(header)
    streams = split_streams(data, off, [m["len"] for m in metas])
    for m, s in zip(metas, streams):
        check_stream(s, m["len"], m["crc"], m["name"])
    return header, streams, off


def _as_bytes(t) -> bytes:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        _fail("compressed state dict: entries must be 1-D uint8 tensors")
    return t.detach().to("cpu").contiguous().numpy().tobytes()


def _parts_from_dict(sd):
    if not isinstance(sd, dict) or HEADER_KEY not in sd:
        _fail(f"not an lsc compressed state dict (no {HEADER_KEY!r} entry)")
    head = _as_bytes(sd[HEADER_KEY])
    header, off = parse_prefix_header(head)
    if off != len(head):
        _fail(f"{HEADER_KEY}: {len(head) - off} unexpected bytes after the header")
    metas = _validate_header(header)
    names = {m["name"] for m in metas}
    extra = set(sd) - names - {HEADER_KEY}
    if extra:
        _fail(f"compressed state dict has entries the header does not list: {sorted(extra)[:5]}")
    streams = []
    for m in metas:
        if m["name"] not in sd:
            _fail(f"compressed state dict is missing the stream of {m['name']!r}")
        s = _as_bytes(sd[m["name"]])
        check_stream(s, m["len"], m["crc"], m["name"])
        streams.append(s)
    return header, streams, off


# --------------------------------------------------------------------------- decoding

def _spectral_job(m: dict, data) -> tuple:
    """The entropy-decoding job of one spectral tensor (see :class:`lsc.codec.parallel.StreamDecoder`)."""
    layout = BlockLayout(tuple(m["shape"]), tuple(m["block"]))
    order = _SCANS[m["scan"]](layout.block_shape)
    bounds = group_bounds(position_groups(layout, m["min_group"], m["scan"]), order)
    data = bytes(data)
    return (data[:m["side"]], data[m["side"]:], layout.block_numel, layout.num_blocks, order, bounds, m["name"],
            m.get("segments"), m.get("classes", 1), row_units(layout))


def _rebuild_spectral(m: dict, q_positions: np.ndarray, e: np.ndarray, device: torch.device | None = None) -> dict:
    """Decoded integers (P, num_blocks) in row-major position order -> weight (and what made it).

    The weight is rebuilt on ``device`` (the CPU by default): a model on a GPU gets the bits
    its own eval forward computes there, since a transform's float rounding is per device.
    """
    dtype = _DTYPES[m["dtype"]]
    layout = BlockLayout(tuple(m["shape"]), tuple(m["block"]))
    # (num_blocks, P) as a transposed view: reconstruct reads it once, converting as it goes
    q = torch.from_numpy(q_positions).T
    cdt = compute_dtype_for(dtype)
    mean = _tensor_from_bytes(bytes.fromhex(m["mean"]), cdt, [])
    std = _tensor_from_bytes(bytes.fromhex(m["std"]), cdt, [])
    e_t = torch.from_numpy(e)
    if device is None or device.type == "cpu":
        w = reconstruct(q, e_t, layout, mean, std, dtype, m["transform"])
    else:
        w = reconstruct(q.T.to(device).T, e_t.to(device), layout, mean.to(device), std.to(device), dtype, m["transform"])
    return {"weight": w, "q": q, "exponent": e_t, "mean": mean, "std": std, "layout": layout, "transform": m["transform"]}


def _decode_raw(m: dict, data) -> torch.Tensor:
    dtype = _DTYPES[m["dtype"]]
    nbytes = math.prod(m["shape"]) * dtype.itemsize
    raw = zlib_decompress_exact(data, nbytes, m["name"]) if m["zlib"] else bytes(data)
    return _tensor_from_bytes(raw, dtype, m["shape"])


def _decode_all(header: dict, streams, keep_integers: bool = False, workers: int | None = None,
                devices: dict[str, torch.device] | None = None):
    """Decode every tensor; on bad data raise the LscFormatError of the first bad tensor in file order.

    ``devices``: name -> device to rebuild that spectral weight on (default: the CPU)."""
    metas = header["tensors"]
    decoded: dict[int, Any] = {}  # file position -> tensor (or dict of buffers)
    errors: dict[int, LscFormatError] = {}
    spectral: dict[str, dict] = {}
    spectral_at, jobs = [], []
    for i, (m, s) in enumerate(zip(metas, streams)):
        try:
            if m["kind"] == "spectral":
                jobs.append(_guarded(m, _spectral_job, m, s))
                spectral_at.append(i)
            elif m["kind"] == "buffers":
                decoded[i] = _guarded(m, buffers_mod.decode_buffers, bytes(s))
            else:
                decoded[i] = _guarded(m, _decode_raw, m, s)
        except LscFormatError as exc:
            errors[i] = exc
            break
    if errors:  # a bad raw stream stops the reading; a spectral tensor before it may still be the first bad one
        first_raw_error = min(errors)
        jobs = [job for job, i in zip(jobs, spectral_at) if i < first_raw_error]
        spectral_at = [i for i in spectral_at if i < first_raw_error]
    if jobs:
        # entropy decoding runs in worker processes when it pays; weights are rebuilt here as
        # tensors finish, in whatever order they do
        with StreamDecoder(jobs, workers) as decoder, _one_torch_thread(decoder.parallel):
            spectral_failed = False
            for j in decoder.completed():
                i, m = spectral_at[j], metas[spectral_at[j]]
                if spectral_failed and not decoder.parallel:
                    break  # serial: nothing later can come first
                try:
                    q, e = decoder.get(j)
                    d = _guarded(m, _rebuild_spectral, m, q, e, (devices or {}).get(m["name"]))
                except LscFormatError as exc:
                    errors[i], spectral_failed = exc, True
                    continue
                decoded[i] = d["weight"]
                if keep_integers:
                    spectral[m["name"]] = d
    if errors:
        raise errors[min(errors)]
    _check_buffer_names(metas, [decoded[i] for i, m in enumerate(metas) if m["kind"] == "buffers"])
    plain: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for i, m in enumerate(metas):
        if m["kind"] == "buffers":
            plain.update(decoded[i])
            continue
        plain[m["name"]] = decoded[i]
        for tied in m.get("tied", []):
            plain[tied] = decoded[i]
    return plain, spectral


def _check_buffer_names(metas: list[dict], buffers: list[dict]) -> None:
    """Names are unique in a file (FORMAT.md): a buffer of the buffers stream (``buffers``: its decoded
    name -> tensor dicts) must not shadow a tensor of the header."""
    taken = {n for m in metas if m["kind"] != "buffers" for n in (m["name"], *m.get("tied", []))} | {HEADER_KEY}
    for decoded in buffers:
        clash = sorted(set(decoded) & taken)
        if clash:
            raise LscFormatError(f"{BUFFERS_KEY}: buffer names {clash[:3]} are also tensor names in the header")


@contextlib.contextmanager
def _one_torch_thread(active: bool):
    """While worker processes decode, rebuild weights on one thread: more torch threads only
    fight the workers for the cores (1.4x slower on 2 cores)."""
    n = torch.get_num_threads()
    if not active or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _guarded(m: dict, fn, *args):
    """fn(*args), with any failure on crafted data reported as LscFormatError naming the tensor."""
    return format_errors(m["name"], fn, *args)


@full_precision
def decompress_weights(compressed: dict[str, torch.Tensor], *, workers: int | None = None) -> "OrderedDict[str, torch.Tensor]":
    """Compressed dict from :func:`compress_weights` -> plain state_dict with the original model's keys.

    ``workers``: entropy-decoding processes for large models (default: the usable CPUs on
    Linux; 1 decodes in this process). The result does not depend on it.
    """
    header, streams, _ = _parts_from_dict(compressed)
    return _decode_all(header, streams, workers=workers)[0]


# --------------------------------------------------------------------------- files

def save(model: nn.Module, path, *, buffer_tolerance: float | None = None) -> int:
    """Write the .lsc file of a spectral model atomically (temp file + rename); returns its size in bytes.

    ``path`` may also be a writable binary file object (an open file, ``io.BytesIO``): the bytes are
    written at its position, and closing it is the caller's business.
    ``buffer_tolerance``: quantize float buffers too (see :func:`compress_weights`).
    """
    stream = hasattr(path, "write")
    if stream and isinstance(path, io.TextIOBase):
        raise LscError(f"{path!r} is a text stream; open the file in binary mode ('wb')")
    if not stream:
        check_writable(path)  # before the encoding work (seconds on a large model), not after
    data = to_bytes(compress_weights(model, buffer_tolerance=buffer_tolerance))
    _write_all(path, data) if stream else atomic_write_bytes(path, data)
    return len(data)


def _write_all(stream, data: bytes) -> None:
    """Write every byte to a binary stream: an unbuffered one (a socket's file with a timeout) may take part
    of it per call, and a short write must not pass for a whole file."""
    view = memoryview(data)
    while view:
        n = stream.write(view)
        if n is None:
            if isinstance(stream, io.RawIOBase):  # a non-blocking raw stream that took nothing now
                raise OSError(f"the stream took none of the {len(view)} bytes left to write (a non-blocking stream?)")
            return  # a duck-typed writer that returns nothing takes everything
        if n <= 0:
            raise OSError(f"the stream accepted no bytes, {len(view)} left to write")
        view = view[n:]


def recode(src) -> bytes:
    """The bytes of an .lsc file (path, bytes or binary file object) re-encoded by this version's entropy coder.

    Every spectral tensor's integers, exponents and statistics are kept; only their coding
    changes (an older file gets the row classes of format version 3 where they pay), so the
    result decodes to bit-identical weights. Raw and buffer streams are copied unchanged.
    """
    header, streams, _ = _parts_from_bytes(_read(src))
    metas = [dict(m) for m in header["tensors"]]
    out = [bytes(s) for s in streams]
    spectral = [i for i, m in enumerate(metas) if m["kind"] == "spectral"]
    # integers only (no weight is rebuilt), each re-encoded as it arrives: the decoder's buffers are its own
    with StreamDecoder([_spectral_job(metas[i], streams[i]) for i in spectral]) as decoder:
        for j in decoder.completed():
            i = spectral[j]
            q, e = decoder.get(j)  # q: (P, num_blocks), positions row-major
            layout = BlockLayout(tuple(metas[i]["shape"]), tuple(metas[i]["block"]))
            metas[i], out[i] = _encode_integers(metas[i], layout, torch.from_numpy(q).T.contiguous(), torch.from_numpy(e))
    for m, s in zip(metas, out):
        m["len"], m["crc"] = len(s), zlib.crc32(s)
    return _header_bytes(metas, header) + b"".join(out)


def _read(src) -> bytes:
    """The bytes of a file given as a path, as bytes, or as a readable binary file object (read from its position)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if hasattr(src, "read"):
        data = src.read()
        if not isinstance(data, (bytes, bytearray)):
            raise LscError(f"{src!r} is a text stream; open the file in binary mode ('rb')")
        return bytes(data)
    with open(os.fspath(src), "rb") as f:
        return f.read()


@full_precision
def load(path, model: nn.Module | None = None, *, strict: bool = True, lazy=False, workers: int | None = None,
         **lazy_options):
    """Read a .lsc file (path, bytes, binary file object, or the dict :func:`compress_weights` returns).

    Without ``model``: returns the plain state_dict (on the CPU). With a plain ``model``: loads
    it (``load_state_dict(strict=strict)``), rebuilding each weight on the device of the
    model's tensor, and returns the model. With a spectral model:
    sets its coefficients, statistics and (frozen) exponents so that its eval-mode
    weights equal the file's decoded weights bit for bit, and returns the model.
    ``lazy=True`` (or ``"packed"`` / ``"entropy"``): keep the weights compressed in memory
    and decode each one when its module runs (see :func:`lsc.lazy.load_lazy`; options
    such as ``cache=N`` are passed through).
    ``workers``: entropy-decoding processes for large files (default: the usable CPUs on
    Linux; 1 decodes in this process). The decoded weights do not depend on it.
    """
    if model is not None:
        require_module(model, "lsc.load(path, model)")
    if lazy:  # issue 5: per-layer decompression on the fly
        from ..lazy import load_lazy
        if model is None:
            raise LscError("lazy loading needs the model to load into: lsc.load(path, model, lazy=True)")
        return load_lazy(path, model, mode="packed" if lazy is True else lazy, strict=strict, **lazy_options)
    header, streams, _ = _parts_from_dict(path) if isinstance(path, dict) else _parts_from_bytes(_read(path))
    is_spectral = model is not None and getattr(_unwrap(model), "_lsc", None) is not None
    # a plain model's weights are rebuilt where its tensors live: on a GPU, its output then equals
    # the eval forward of the spectral model on that GPU bit for bit (a spectral model rebuilds its own)
    inner = None if model is None else unwrap(model)  # the file's keys are the bare model's
    # meta tensors (a model built under torch.device("meta") so that it never holds two copies) get the CPU's
    devices = None if model is None or is_spectral else {
        k: v.device for k, v in inner.state_dict().items() if not v.is_meta}
    if devices:
        _factors_where_their_weight_lives(header, devices)
    plain, spec = _decode_all(header, streams, keep_integers=is_spectral, workers=workers, devices=devices)
    if model is None:
        return plain
    if not is_spectral:
        _load_into_plain(inner, header, plain, strict)
        return model
    _load_into_spectral(model, header, plain, spec, strict)
    return model


def _factors_where_their_weight_lives(header: dict, devices: dict) -> None:
    """Add to ``devices`` the factors of each weight the model holds unfactored (a file of a
    ``lsc.factorize``d model): rebuilt and multiplied on that weight's device, as a lazy load does."""
    from ..lowrank import factor_of
    for m in header["tensors"]:
        f = factor_of(m["name"])
        if f is not None and m["name"] not in devices and f[0] in devices:
            devices[m["name"]] = devices[f[0]]


def _load_into_plain(model: nn.Module, header: dict, plain: dict, strict: bool) -> None:
    from ..lowrank import FACTOR_KEY, fold_factored_state_dict
    own = model.state_dict(keep_vars=True)  # the tensors themselves: ties show as one object under two names
    if any(FACTOR_KEY.match(k) and k not in own for k in plain):  # a factored file into an unfactored model
        devices = {k: t.device for k, t in own.items() if not t.is_meta}
        _factors_where_their_weight_lives(header, devices)  # raw factors too: all of a weight's on one device
        plain = fold_factored_state_dict({k: v.to(devices[k]) if FACTOR_KEY.match(k) and k in devices else v
                                          for k, v in plain.items()}, model)
    groups = tie_groups(own)
    plain = fill_tied_names(plain, groups)
    check_fits(own, plain, strict)
    check_no_meta_buffers_outside_state(model, own)
    meta = any(t.is_meta for t in own.values())
    # copying into a meta tensor is a no-op: such a model takes the decoded tensors themselves
    model.load_state_dict(plain, strict=strict, assign=meta)
    if not meta:
        return
    for names in groups:  # assign gave each tied name a Parameter of its own: tie them again
        for name in names[1:]:
            owner, attr = resolve(model, name)
            if attr in owner._parameters:
                owner._parameters[attr] = model.get_parameter(names[0])
    left = [k for k, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise LscError(f"tensors still on the meta device after loading (not in the file): {left[:5]}")


def check_no_meta_buffers_outside_state(model: nn.Module, own: dict) -> None:
    """Refuse, before the model is touched, a model built on the meta device whose non-persistent buffers
    (Hugging Face's ``position_ids``, rotary ``inv_freq``) are on "meta" too: no file holds them, and a
    forward would read garbage (NaN outputs) where loading seemed to succeed."""
    left = [n for n, b in model.named_buffers() if b.is_meta and n not in own]
    if left:
        raise LscError(f"buffers on the meta device that no file holds (non-persistent): {left[:5]}; build the model "
                       "with real buffers, e.g. under accelerate.init_empty_weights() (include_buffers=False keeps "
                       "buffers on the CPU), or create them on a device before loading")


def check_fits(own: dict, state: dict, strict: bool) -> None:
    """Refuse a file that does not fit the model before anything is copied into it (PyTorch's
    ``load_state_dict`` copies every tensor that fits and raises afterwards, leaving a half-loaded model)."""
    for k, t in state.items():
        if k in own and tuple(own[k].shape) != tuple(t.shape):
            raise LscError(f"{k}: file has shape {tuple(t.shape)}, model has {tuple(own[k].shape)}")
    if strict:
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise LscError(f"file does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def tie_groups(state: dict) -> list[list[str]]:
    """Names of ``model.state_dict(keep_vars=True)`` that hold one tensor (tied weights), in its order:
    the groups of two or more."""
    by_tensor: dict[int, list[str]] = {}
    for name, t in state.items():
        by_tensor.setdefault(id(t), []).append(name)
    return [names for names in by_tensor.values() if len(names) > 1]


def fill_tied_names(state: dict, groups: list[list[str]]) -> dict:
    """``state`` with every name of a tied group that it lacks taken from one it has.

    Checkpoints store a tied tensor once (safetensors must; Hugging Face's ``save_pretrained`` drops a
    language-model head tied to the embeddings), so a file compressed from one lacks the other names.
    """
    out = dict(state)
    for names in groups:
        have = next((n for n in names if n in state), None)
        if have is not None:
            out.update({n: state[have] for n in names if n not in state})
    return out


def _unwrap(model):
    """The spectral model inside ``model``'s wrappers, or ``model`` when it is not spectral."""
    try:
        return spectral_root(model)
    except LscError:
        return model


@torch.no_grad()
def _load_into_spectral(model, header, plain, spec, strict):
    """Everything is checked and computed first, then assigned: a file that does not fit leaves the model as it was."""
    root = _unwrap(model)
    st = get_state(root)
    consumed, coded, dense = set(), [], []
    for entry in st.entries:
        par = entry.parametrization
        names = [entry.name, *entry.tied_names]
        d = spec.get(entry.name)
        if d is not None:
            if d["layout"] != par.layout:
                raise LscError(f"{entry.name}: file has shape {d['layout'].shape} block {d['layout'].block_shape}, "
                               f"model has {par.layout.shape} block {par.layout.block_shape}")
            if TRANSFORMS.get(d["transform"]) != TRANSFORMS.get(par.transform):  # aliases are one transform
                raise LscError(f"{entry.name}: file holds {d['transform']!r} coefficients, the model's transform is "
                               f"{par.transform!r}; call lsc.spectral with transform={d['transform']!r} (or load the "
                               "file into a plain model)")
            if d["weight"].dtype != par.orig_dtype:  # the file's weight is rounded to its own dtype
                raise LscError(f"{entry.name}: file holds it as {d['weight'].dtype}, the model as {par.orig_dtype}, so the "
                               f"model's eval weights could not equal the file's; cast the model first (model.to("
                               f"{d['weight'].dtype})) or load the file into a plain model")
            coded.append((entry, d, _coefficients_for(entry, d)))
            consumed.update(names)
        elif entry.name in plain:
            if tuple(plain[entry.name].shape) != par.layout.shape:
                raise LscError(f"{entry.name}: file has shape {tuple(plain[entry.name].shape)}, model has {par.layout.shape}")
            dense.append((entry, plain[entry.name]))
            consumed.update(n for n in names if n in plain)
        elif strict:
            raise LscError(f"{entry.name}: not in the file")
    raw = {k: v for k, v in plain.items() if k not in consumed}
    lsc_own = spectral_state_filter(root)
    own = {k: t.detach() for k, t in root.state_dict(keep_vars=True).items()
           if not k.startswith(QNET_PREFIX) and not lsc_own(k, t) and k not in consumed}
    check_fits(own, raw, strict)
    for entry, d, (coeffs, e) in coded:
        par = entry.parametrization
        par.mean.copy_(d["mean"])
        par.std.copy_(d["std"])
        entry.coefficients.copy_(coeffs)
        par.frozen_exponent = e.to(torch.float32)
    for entry, weight in dense:
        setattr(entry.module, entry.attr, weight.to(entry.coefficients.device))  # right_inverse
    st.rate_cache = None  # the next quantization_loss measures the loaded model afresh
    if raw:
        root.load_state_dict({k: v for k, v in raw.items() if k in own}, strict=False)


def _coefficients_for(entry, d: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(coefficients, exponents) that make ``entry``'s eval weight the file's decoded weight, checked to
    round back to the file's integers in the coefficients' dtype; the model is not touched."""
    par, coeffs = entry.parametrization, entry.coefficients
    dev = coeffs.device
    e = d["exponent"].to(dev)
    step = par.step(e)
    q = d["q"].to(dev).reshape(par.layout.coeff_shape)
    new = dequantize(q, step).to(coeffs.dtype)
    if not torch.equal(integer_coefficients(new.to(step.dtype), step), q):
        raise LscError(f"{entry.name}: integer coefficients too large to hold exactly in {coeffs.dtype}")
    return new, e


# --------------------------------------------------------------------------- inspection

def file_info(src) -> dict[str, Any]:
    """Per-tensor sizes of a .lsc file (path, bytes, binary file object, or compressed dict) and totals equal to the file size.

    Returns ``{"rows": [{name, kind, shape, dtype, numel, bits_per_weight, bytes, stream_bytes, side_bytes, tied}],
    "totals": {...}}``; ``totals["file_bytes"] == header_bytes + sum(row bytes)``.
    """
    if isinstance(src, dict):
        header, streams, hsize = _parts_from_dict(src)
    else:
        header, streams, hsize = _parts_from_bytes(_read(src))
    rows = []
    for m, s in zip(header["tensors"], streams):
        numel = math.prod(m["shape"])
        if m["kind"] == "buffers":
            try:
                numel = sum(t.numel() for t in buffers_mod.decode_buffers(bytes(s)).values())
            except Exception as exc:
                raise LscFormatError(f"{m['name']}: cannot decode ({type(exc).__name__}: {exc})") from None
        side = m.get("side", 0) if m["kind"] == "spectral" else 0
        rows.append({"name": m["name"], "kind": m["kind"], "shape": tuple(m["shape"]), "dtype": m["dtype"],
                     "block": tuple(m["block"]) if m["kind"] == "spectral" else None, "numel": numel,
                     "bits_per_weight": 8.0 * m["len"] / max(numel, 1), "bytes": m["len"],
                     "stream_bytes": m["len"] - side, "side_bytes": side, "tied": list(m.get("tied", []))})
    body = sum(r["bytes"] for r in rows)
    numel = sum(r["numel"] for r in rows)
    totals = {"tensors": len(rows), "numel": numel, "header_bytes": hsize,
              "stream_bytes": sum(r["stream_bytes"] for r in rows), "side_bytes": sum(r["side_bytes"] for r in rows),
              "file_bytes": hsize + body, "bits_per_weight": 8.0 * (hsize + body) / max(numel, 1)}
    return {"rows": rows, "totals": totals}
