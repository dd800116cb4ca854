"""Compressing float buffers (BatchNorm running statistics and the like).

Buffers are not trained, so they are not reparameterized; they are quantized
once, with an error bound stated in units that matter to the model's output:

* ``running_var`` (BatchNorm): quantized in the log domain, ``log2(var + eps)``
  with step ``2 * tol / ln 2``, so the normalizing standard deviation is off by
  at most a relative ``tol / 2``.
* ``running_mean`` (BatchNorm): per channel, step ``tol * sqrt(var + eps)`` (with
  the *decoded* variance), so the normalized activation ``(x - mean) / std`` is
  off by at most ``tol / 2``.
* any other float buffer: step ``tol * std(buffer)`` (absolute error ``<= tol/2 * std``).

The integer symbols are stored bit-packed at the width of their range (for a
few hundred values an entropy coder's table would cost more than it saves).
Non-float buffers (``num_batches_tracked``) are left to the raw path, and so are float buffers
holding an inf or a NaN (a causal attention mask): they have no quantized form, so they stay exact.

    tol = lsc.choose_buffer_tolerance(model, x, max_rel_error=1e-3)   # coarsest tol within budget
    blob = lsc.encode_buffers(dict(model.named_buffers()), tol)        # bytes for the file
    decoded = lsc.decode_buffers(blob)                                 # {name: tensor}
    lsc.quantize_buffers_(model, tol)                                  # or: apply the decoded values in place

:func:`encode_buffers` / :func:`decode_buffers` are the hooks for the file codec:
the blob is self-describing (names, shapes, dtypes, rules), and decoding is exact:
``decode_buffers(encode_buffers(b, tol))`` equals ``quantized_values(b, tol)`` bit for bit.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .errors import LscError, LscFormatError

__all__ = ["BN_EPS", "buffer_rules", "quantized_values", "encode_buffers", "decode_buffers", "quantize_buffers_",
           "choose_buffer_tolerance", "float_buffers"]

BN_EPS = 1e-5
_MAGIC = b"LSCB1"
MAX_DECODED_VALUES = 1 << 26  # float buffers are statistics (BatchNorm etc.): far smaller in practice
MAX_JSON_BYTES = 16 << 20     # the blob's JSON inflates to at most this (a zip bomb stops here)
MAX_DIMS = 64
# every real floating dtype torch names (the float8 *fnuz* variants too: lsc 0.3's first writer put them here)
_FLOAT_DTYPES = tuple(sorted({str(d).replace("torch.", "") for d in vars(torch).values()
                              if isinstance(d, torch.dtype) and d.is_floating_point and not str(d).endswith("_x2")}))
_SYMBOL_LIMIT = 2.0 ** 62     # |q| below this: symbols and their spans fit int64


def _dtype_name(b: torch.Tensor) -> str:
    return str(b.dtype).replace("torch.", "")


def _quantizable(b: torch.Tensor) -> bool:
    """Whether the lossy path can take ``b``: a non-finite value has no quantized form (the step
    would be NaN and every value with it), so masks holding -inf and the like stay raw, exact."""
    if not b.is_floating_point() or b.numel() == 0 or _dtype_name(b) not in _FLOAT_DTYPES:
        return False
    x = b.detach() if b.dtype == torch.float64 else b.detach().float()  # float8 has no isfinite
    return bool(torch.isfinite(x).all())


def float_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Persistent float buffers of a model that the lossy buffer codec takes, by state-dict key (a wrapper
    may rename those); the caller stores every other buffer raw (non-finite ones included)."""
    from .state import QNET_PREFIX, spectral_state_filter
    lsc_own = spectral_state_filter(model)  # lsc's per-tensor statistics live with the spectral tensor
    params = {id(p) for _, p in model.named_parameters(remove_duplicate=False)}
    out, seen = {}, set()
    for name, b in model.state_dict(keep_vars=True).items():
        if (not isinstance(b, torch.Tensor) or id(b) in params or lsc_own(name, b) or id(b) in seen
                or name.startswith(QNET_PREFIX) or not _quantizable(b)):
            continue
        seen.add(id(b))
        out[name] = b
    return out


def _bn_eps(model: nn.Module | None) -> dict[str, float]:
    eps = {}
    if model is not None:
        for mod_name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                eps[mod_name] = float(m.eps)
    return eps


def _check_tol(tol: float) -> None:
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise LscError(f"buffer tolerance must be a finite number > 0, got {tol!r}")


def _log_domain(b: torch.Tensor, e: float) -> bool:
    """Whether a variance can be coded as ``log2(var + eps)``: that must be finite."""
    x = b.detach().double()
    return math.isfinite(e) and e >= 0 and bool((x >= 0).all()) and bool((x + e > 0).all())


def _uniform_step(name: str, b: torch.Tensor, tol: float) -> float:
    x = b.detach().double()
    scale = float(x.std(unbiased=False)) if b.numel() > 1 else 0.0
    if not scale > 0:
        scale = float(x.abs().max()) or 1.0
    step = float(tol) * scale
    if not (math.isfinite(step) and step > 0):
        raise LscError(f"buffer {name!r} cannot be quantized at tolerance {tol} (step {step}); store it exactly")
    return step


def buffer_rules(buffers: dict[str, torch.Tensor], tol: float, eps: dict[str, float] | None = None) -> dict[str, dict]:
    """The quantization rule of each float buffer: ``{"kind": "logvar"|"mean"|"uniform", ...}``.

    Buffers the lossy path cannot take (non-finite values, non-float) get no rule: store them raw."""
    _check_tol(tol)
    eps = eps or {}
    ok = {n: b for n, b in buffers.items() if _quantizable(b)}
    logvar = {n for n, b in ok.items()
              if n.rpartition(".")[2] == "running_var" and _log_domain(b, eps.get(n.rpartition(".")[0], BN_EPS))}
    rules = {}
    for name, b in ok.items():
        prefix, _, attr = name.rpartition(".")
        e = eps.get(prefix, BN_EPS)
        var = f"{prefix}.running_var"
        if name in logvar:
            rules[name] = dict(kind="logvar", step=2.0 * tol / math.log(2.0), eps=e)
        elif attr == "running_mean" and var in logvar and ok[var].shape == b.shape:
            rules[name] = dict(kind="mean", tol=float(tol), eps=e, var=var)
        else:
            rules[name] = dict(kind="uniform", step=_uniform_step(name, b, tol))
    return rules


def _decode_var(q: np.ndarray, rule: dict) -> np.ndarray:
    return np.maximum(np.exp2(q.astype(np.float64) * rule["step"]) - rule["eps"], 0.0)


def _mean_step(var_decoded: np.ndarray, rule: dict) -> np.ndarray:
    return rule["tol"] * np.sqrt(var_decoded + rule["eps"])


def _symbols(buffers: dict[str, torch.Tensor], rules: dict[str, dict]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(integer symbols, decoded float64 values) for every ruled buffer."""
    syms, vals = {}, {}
    order = sorted(rules, key=lambda n: rules[n]["kind"] == "mean")  # variances before the means that need them
    for name in order:
        rule = rules[name]
        x = buffers[name].detach().to("cpu", torch.float64).numpy().reshape(-1)
        if rule["kind"] == "logvar":
            q = np.round(np.log2(x + rule["eps"]) / rule["step"])
            vals[name] = _decode_var(q, rule)
        elif rule["kind"] == "mean":
            step = _mean_step(vals[rule["var"]], rule)
            q = np.round(x / step)
            vals[name] = q * step
        else:
            q = np.round(x / rule["step"])
            vals[name] = q * rule["step"]
        syms[name] = _symbols_of(name, q)
    return syms, vals


def _symbols_of(name: str, q: np.ndarray) -> np.ndarray:
    """``q`` as int64; values too large for their step would wrap around silently otherwise."""
    if q.size and not float(np.abs(q).max()) < _SYMBOL_LIMIT:
        raise LscError(f"buffer {name!r} cannot be quantized at this tolerance (values too large for their step)")
    return q.astype(np.int64)


def quantized_values(buffers: dict[str, torch.Tensor], tol: float, eps: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """What the decoder will return for each float buffer (same shape and dtype)."""
    rules = buffer_rules(buffers, tol, eps)
    _, vals = _symbols(buffers, rules)
    return {n: torch.from_numpy(v).reshape(buffers[n].shape).to(buffers[n].dtype) for n, v in vals.items()}


def _pack(q: np.ndarray) -> tuple[int, int, bytes]:
    lo = int(q.min()) if q.size else 0
    span = int(q.max()) - lo if q.size else 0
    width = max(span, 0).bit_length()
    if width == 0:
        return lo, 0, b""
    u = (q - lo).astype(np.uint64)
    bits = ((u[:, None] >> np.arange(width, dtype=np.uint64)[None, :]) & np.uint64(1)).astype(np.uint8)
    return lo, width, np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def _unpack(lo: int, width: int, data: bytes, n: int) -> np.ndarray:
    """Inverse of :func:`_pack`. Each value is gathered from the (at most 9) bytes holding its bits,
    so memory stays a few words per value at any width (unpacking to one byte per bit took 64x that)."""
    if width == 0:
        return np.full(n, lo, dtype=np.int64)
    buf = np.frombuffer(bytes(data) + bytes(9), dtype=np.uint8)
    start = np.arange(n, dtype=np.int64) * width
    at, shift = start >> 3, (start & 7).astype(np.uint64)
    del start
    u = np.zeros(n, dtype=np.uint64)
    for k in range(8):
        u |= buf[at + k].astype(np.uint64) << np.uint64(8 * k)
    u >>= shift
    if width > 56:  # the value may reach into a 9th byte
        u |= (buf[at + 8].astype(np.uint64) << np.uint64(1)) << (np.uint64(63) - shift)
    if width < 64:
        u &= np.uint64((1 << width) - 1)
    return (u + np.uint64(lo % (1 << 64))).view(np.int64)  # two's complement: lo + u, which fits int64


_KINDS = ("logvar", "mean", "uniform")


def _rule_from(kind: str, extra: float, tol: float, name: str) -> dict:
    if kind == "logvar":
        return dict(kind=kind, step=2.0 * tol / math.log(2.0), eps=extra)
    if kind == "mean":
        return dict(kind=kind, tol=tol, eps=extra, var=name.rpartition(".")[0] + ".running_var")
    return dict(kind=kind, step=extra)


def encode_buffers(buffers: dict[str, torch.Tensor], tol: float = 2.0 ** -8, eps: dict[str, float] | None = None) -> bytes:
    """Self-describing bytes for every float buffer in ``buffers`` that has a rule (see
    :func:`buffer_rules`; others are ignored: store them raw)."""
    rules = buffer_rules(buffers, tol, eps)
    total = sum(buffers[n].numel() for n in rules)
    if total > MAX_DECODED_VALUES:
        raise LscError(f"{total} float buffer values are more than a reader accepts ({MAX_DECODED_VALUES}); "
                       "store them raw")
    syms, _ = _symbols(buffers, rules)
    entries, payload = [], []
    for name, rule in rules.items():
        lo, width, data = _pack(syms[name])
        b = buffers[name]
        extra = rule["step"] if rule["kind"] == "uniform" else rule["eps"]
        entries.append([name, list(b.shape), _dtype_name(b), _KINDS.index(rule["kind"]), extra, lo, width])
        payload.append(data)
    js = json.dumps([float(tol), entries], separators=(",", ":")).encode()
    if len(js) > MAX_JSON_BYTES:
        raise LscError(f"buffer names and shapes take {len(js)} bytes of JSON, "
                       f"over the {MAX_JSON_BYTES} a reader accepts")
    header = zlib.compress(js, 9)
    return _MAGIC + struct.pack("<I", len(header)) + header + b"".join(payload)


class _Entry(NamedTuple):
    name: str
    shape: tuple
    dtype: str
    kind: str
    extra: float
    lo: int
    width: int

    @property
    def n(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return (self.n * self.width + 7) // 8


def _fail(msg: str):
    raise LscFormatError(f"buffers: {msg}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _inflate_json(comp: bytes) -> bytes:
    """The JSON, inflating at most :data:`MAX_JSON_BYTES` (a few KiB can otherwise inflate to GiBs)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(comp, MAX_JSON_BYTES + 1)
    except zlib.error as exc:
        _fail(f"JSON: corrupt zlib data ({exc})")
    if len(out) > MAX_JSON_BYTES:
        _fail(f"JSON inflates to more than {MAX_JSON_BYTES} bytes")
    if not d.eof or d.unused_data or d.unconsumed_tail:
        _fail("JSON: zlib stream is truncated or followed by other bytes")
    return out


def _read_json(blob: bytes) -> tuple[float, list, int]:
    """(tol, raw entries, offset of the payload), the framing and the JSON's top level checked."""
    if len(blob) < 9 or blob[:5] != _MAGIC:
        _fail("not an lsc buffer blob (bad magic or too short)")
    (hlen,) = struct.unpack_from("<I", blob, 5)
    if hlen > len(blob) - 9:
        _fail(f"JSON length {hlen} runs past the end of the {len(blob)}-byte blob")
    try:
        top = json.loads(_inflate_json(blob[9:9 + hlen]))
    except (ValueError, RecursionError) as exc:
        _fail(f"JSON: invalid ({type(exc).__name__}: {exc})"[:300])
    if not (isinstance(top, list) and len(top) == 2 and isinstance(top[1], list)):
        _fail("JSON must be [tol, entries]")
    if not (_is_number(top[0]) and top[0] > 0):
        _fail(f"tol must be a finite number > 0, got {top[0]!r}")
    return float(top[0]), top[1], 9 + hlen


def _check_entry(i: int, e) -> _Entry:
    """One entry, every field in range, so that nothing sized by it can be absurd."""
    if not (isinstance(e, list) and len(e) == 7):
        _fail(f"entry {i} must be [name, shape, dtype, kind, extra, lo, width]")
    name, shape, dtype, kind, extra, lo, width = e
    where = f"entry {i} ({str(name)[:80]!r})"
    if not isinstance(name, str):
        _fail(f"{where}: name must be a string")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(_is_int(d) and 0 <= d <= MAX_DECODED_VALUES for d in shape)):
        _fail(f"{where}: shape must be at most {MAX_DIMS} ints in 0..{MAX_DECODED_VALUES}, got {str(shape)[:100]}")
    if dtype not in _FLOAT_DTYPES:
        _fail(f"{where}: dtype must be one of {_FLOAT_DTYPES}, got {str(dtype)[:40]!r}")
    if not (_is_int(kind) and 0 <= kind < len(_KINDS)):
        _fail(f"{where}: kind must be 0, 1 or 2, got {kind!r}")
    # NaN / inf: what the first 0.3 writer stored for a buffer holding an inf (its values then decode to NaN,
    # as they did); such files must still load, weights and all
    if not (isinstance(extra, (int, float)) and not isinstance(extra, bool)
            and (not math.isfinite(extra) or (extra > 0 if kind == 2 else extra >= 0))):
        _fail(f"{where}: extra (eps, or the step of kind 2) must be a number in range, got {extra!r}")
    if not (_is_int(width) and 0 <= width <= 64):
        _fail(f"{where}: width must be an int in 0..64, got {width!r}")
    if not (_is_int(lo) and -(1 << 63) <= lo and lo + (1 << width) - 1 < (1 << 63)):
        _fail(f"{where}: lo {lo!r} with width {width} gives symbols outside int64")
    return _Entry(name, tuple(shape), dtype, _KINDS[kind], float(extra), lo, width)


def _check_entries(raw: list, payload: int) -> list[_Entry]:
    """All entries, and how they fit together: unique names, the value cap, means with their
    variances, payload sizes adding up to exactly the bytes left in the blob."""
    entries, seen, total = [], {}, 0
    for i, e in enumerate(raw):
        entry = _check_entry(i, e)
        if entry.name in seen:
            _fail(f"duplicate name {entry.name!r}")
        total += entry.n
        if total > MAX_DECODED_VALUES:
            _fail(f"entries claim more than {MAX_DECODED_VALUES} values")
        seen[entry.name] = entry
        entries.append(entry)
    for e in entries:
        var = seen.get(e.name.rpartition(".")[0] + ".running_var")
        if e.kind == "mean" and (var is None or var.kind != "logvar" or var.shape != e.shape):
            _fail(f"{e.name!r}: a running_mean entry needs a running_var entry of kind 0 and the same shape")
    need = sum(e.nbytes for e in entries)
    if need > payload:
        _fail(f"truncated: the entries need {need} payload bytes, {payload} left")
    if need < payload:
        _fail(f"{payload - need} trailing bytes after the last entry")
    return entries


def decode_buffers(blob: bytes) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_buffers`: ``{name: tensor}`` with the original shapes and dtypes.

    Bad data raises :class:`LscFormatError`; everything is validated before anything is allocated."""
    blob = bytes(blob)
    tol, raw, pos = _read_json(blob)
    entries = _check_entries(raw, len(blob) - pos)
    syms = {}
    for e in entries:
        syms[e.name] = _unpack(e.lo, e.width, blob[pos:pos + e.nbytes], e.n)
        pos += e.nbytes
    vals: dict[str, np.ndarray] = {}
    with np.errstate(all="ignore"):  # crafted symbols may overflow to inf: that is what the file says
        for e in sorted(entries, key=lambda e: e.kind == "mean"):  # variances before the means that need them
            rule, q = _rule_from(e.kind, e.extra, tol, e.name), syms[e.name]
            if e.kind == "logvar":
                vals[e.name] = _decode_var(q, rule)
            elif e.kind == "mean":
                vals[e.name] = q.astype(np.float64) * _mean_step(vals[rule["var"]], rule)
            else:
                vals[e.name] = q.astype(np.float64) * rule["step"]
    return {e.name: torch.from_numpy(vals[e.name]).reshape(e.shape).to(getattr(torch, e.dtype)) for e in entries}


@torch.no_grad()
def quantize_buffers_(model: nn.Module, tol: float = 2.0 ** -8) -> dict:
    """Replace the model's float buffers by their decoded values, in place. Returns sizes in bytes."""
    bufs = float_buffers(model)
    blob = encode_buffers(bufs, tol, _bn_eps(model))
    decoded = decode_buffers(blob)
    for name, value in decoded.items():
        bufs[name].copy_(value.to(bufs[name].device))
    raw = sum(b.numel() * b.element_size() for b in bufs.values())
    return dict(raw_bytes=raw, compressed_bytes=len(blob), tensors=len(decoded), tol=tol)


@torch.no_grad()
def choose_buffer_tolerance(model: nn.Module, inputs, max_rel_error: float = 1e-3, *, forward=None,
                            candidates=None) -> float:
    """The coarsest tolerance whose quantized buffers keep ``||f(x) - f_q(x)|| / ||f(x)||`` within budget.

    ``forward(model, inputs)`` defaults to ``model(inputs)``; the model is evaluated in eval mode
    and left unchanged.
    """
    forward = forward or (lambda m, x: m(x))
    candidates = candidates or [2.0 ** -k for k in range(1, 17)]
    was_training = model.training
    model.eval()
    bufs = float_buffers(model)
    saved = {n: b.detach().clone() for n, b in bufs.items()}
    eps = _bn_eps(model)
    ref = forward(model, inputs).double()
    chosen = candidates[-1]
    try:
        for tol in sorted(candidates, reverse=True):  # coarsest first
            for n, v in quantized_values(saved, tol, eps).items():
                bufs[n].copy_(v)
            out = forward(model, inputs).double()
            err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
            if err <= max_rel_error:
                chosen = tol
                break
    finally:
        for n, b in bufs.items():
            b.copy_(saved[n])
        model.train(was_training)
    return chosen
