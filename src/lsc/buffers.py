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
Non-float buffers (``num_batches_tracked``) are left to the raw path.

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

import numpy as np
import torch
from torch import nn

__all__ = ["BN_EPS", "buffer_rules", "quantized_values", "encode_buffers", "decode_buffers", "quantize_buffers_",
           "choose_buffer_tolerance", "float_buffers"]

BN_EPS = 1e-5
_MAGIC = b"LSCB1"
MAX_DECODED_VALUES = 1 << 26  # float buffers are statistics (BatchNorm etc.): far smaller in practice


def float_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Persistent floating-point buffers of a model (what a state dict would carry), by name."""
    out = {}
    for mod_name, module in model.named_modules():
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        for attr, b in module._buffers.items():
            if b is None or attr in non_persistent or not b.is_floating_point() or b.numel() == 0:
                continue
            if ".parametrizations." in f".{mod_name}." or mod_name.endswith("parametrizations"):
                continue  # lsc's own per-tensor statistics live with the spectral tensor
            out[f"{mod_name}.{attr}" if mod_name else attr] = b
    return out


def _bn_eps(model: nn.Module | None) -> dict[str, float]:
    eps = {}
    if model is not None:
        for mod_name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                eps[mod_name] = float(m.eps)
    return eps


def buffer_rules(buffers: dict[str, torch.Tensor], tol: float, eps: dict[str, float] | None = None) -> dict[str, dict]:
    """The quantization rule of each float buffer: ``{"kind": "logvar"|"mean"|"uniform", ...}``."""
    eps = eps or {}
    rules = {}
    for name, b in buffers.items():
        if not b.is_floating_point() or b.numel() == 0:
            continue
        prefix, _, attr = name.rpartition(".")
        e = eps.get(prefix, BN_EPS)
        if attr == "running_var" and bool((b >= 0).all()):
            rules[name] = dict(kind="logvar", step=2.0 * tol / math.log(2.0), eps=e)
        elif attr == "running_mean" and f"{prefix}.running_var" in buffers and \
                buffers[f"{prefix}.running_var"].shape == b.shape and bool((buffers[f"{prefix}.running_var"] >= 0).all()):
            rules[name] = dict(kind="mean", tol=float(tol), eps=e, var=f"{prefix}.running_var")
        else:
            x = b.detach().double()
            scale = float(x.std(unbiased=False)) if b.numel() > 1 else 0.0
            if not scale > 0:
                scale = float(x.abs().max()) or 1.0
            rules[name] = dict(kind="uniform", step=float(tol) * scale)
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
        syms[name] = q.astype(np.int64)
    return syms, vals


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
    if width == 0:
        return np.full(n, lo, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: n * width].reshape(n, width)
    u = (bits.astype(np.uint64) << np.arange(width, dtype=np.uint64)[None, :]).sum(1)
    return u.astype(np.int64) + lo


_KINDS = ("logvar", "mean", "uniform")


def _rule_from(kind: str, extra: float, tol: float, name: str) -> dict:
    if kind == "logvar":
        return dict(kind=kind, step=2.0 * tol / math.log(2.0), eps=extra)
    if kind == "mean":
        return dict(kind=kind, tol=tol, eps=extra, var=name.rpartition(".")[0] + ".running_var")
    return dict(kind=kind, step=extra)


def encode_buffers(buffers: dict[str, torch.Tensor], tol: float = 2.0 ** -8, eps: dict[str, float] | None = None) -> bytes:
    """Self-describing bytes for every float buffer in ``buffers`` (others are ignored: store them raw)."""
    import zlib
    rules = buffer_rules(buffers, tol, eps)
    syms, _ = _symbols(buffers, rules)
    entries, payload = [], []
    for name, rule in rules.items():
        lo, width, data = _pack(syms[name])
        b = buffers[name]
        extra = rule["step"] if rule["kind"] == "uniform" else rule["eps"]
        entries.append([name, list(b.shape), str(b.dtype).replace("torch.", ""), _KINDS.index(rule["kind"]), extra,
                        lo, width])
        payload.append(data)
    header = zlib.compress(json.dumps([float(tol), entries], separators=(",", ":")).encode(), 9)
    return _MAGIC + struct.pack("<I", len(header)) + header + b"".join(payload)


def decode_buffers(blob: bytes) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_buffers`: ``{name: tensor}`` with the original shapes and dtypes."""
    import zlib
    if blob[:5] != _MAGIC:
        raise ValueError("not an lsc buffer blob")
    (hlen,) = struct.unpack("<I", blob[5:9])
    tol, entries = json.loads(zlib.decompress(blob[9:9 + hlen], bufsize=1 << 16))
    pos = 9 + hlen
    total = sum(math.prod(int(x) for x in e[1]) for e in entries)
    if total > MAX_DECODED_VALUES or any(not 0 <= int(e[6]) <= 64 for e in entries):
        raise ValueError(f"buffer blob claims {total} values or an invalid bit width")  # no giant allocation
    vals: dict[str, np.ndarray] = {}
    syms = {}
    meta = {}
    for name, shape, dtype, kind, extra, lo, width in entries:
        n = math.prod(shape)
        nbytes = (n * width + 7) // 8
        if pos + nbytes > len(blob):
            raise ValueError(f"buffer blob is truncated inside {name!r}")
        syms[name] = _unpack(lo, width, blob[pos:pos + nbytes], n)
        pos += nbytes
        meta[name] = (shape, dtype, _rule_from(_KINDS[kind], extra, tol, name))
    for name in sorted(meta, key=lambda n: meta[n][2]["kind"] == "mean"):
        shape, dtype, rule = meta[name]
        q = syms[name]
        if rule["kind"] == "logvar":
            vals[name] = _decode_var(q, rule)
        elif rule["kind"] == "mean":
            vals[name] = q.astype(np.float64) * _mean_step(vals[rule["var"]], rule)
        else:
            vals[name] = q.astype(np.float64) * rule["step"]
    return {n: torch.from_numpy(vals[n]).reshape(meta[n][0]).to(getattr(torch, meta[n][1])) for n in meta}


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
