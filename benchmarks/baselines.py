"""Compressors that users compare lsc against, with real encode and decode.

Every baseline takes a float state_dict and returns
``(compressed_bytes, decoded_state_dict, encode_seconds, decode_seconds)``.
Sizes are the length of an actual zstd-19 file (see container.py) and the
decoded state_dict is rebuilt from those bytes alone, so the metrics measured
on it are honest.

Conventions shared by all quantising baselines: only float tensors with 2+
dims (Linear/Conv/Embedding weights; conv kernels viewed as (out, -1)) are
quantised; 1-D tensors (biases, norms) are stored as fp16, which costs under
1% of the bytes; non-float tensors are stored raw.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

try:  # works both as `benchmarks.baselines` and as a script-local import
    from .container import pack, unpack
except ImportError:  # pragma: no cover
    from container import pack, unpack

__all__ = ["fp32_zstd", "fp16_zstd", "int8_zstd", "int4_zstd", "svd_int8",
           "prune_int8", "decode", "n_params"]


# ---------------------------------------------------------------- helpers

def n_params(state_dict) -> int:
    """Number of float elements: the denominator of bits/parameter."""
    return sum(t.numel() for t in state_dict.values() if t.is_floating_point())


def _timed(encode, state_dict):
    t0 = time.perf_counter()
    blob = encode(state_dict)
    t1 = time.perf_counter()
    out = decode(blob)
    t2 = time.perf_counter()
    return len(blob), out, t1 - t0, t2 - t1


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.is_floating_point() else t).numpy()


def _quantisable(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dim() >= 2


def quant_rows(w2: np.ndarray, qmax: int):
    """Symmetric round-to-nearest per row; scale stored as fp16."""
    amax = np.abs(w2).max(axis=1)
    scale = (amax / qmax).astype(np.float16)
    scale[scale == 0] = 1
    q = np.clip(np.rint(w2 / scale.astype(np.float32)[:, None]), -qmax, qmax)
    return q.astype(np.int8), scale


def _dequant(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[:, None]


def _pack4(q: np.ndarray) -> np.ndarray:
    u = (q.reshape(-1).astype(np.int16) + 8).astype(np.uint8)  # 1..15
    if u.size % 2:
        u = np.append(u, np.uint8(8))
    return u[0::2] | (u[1::2] << 4)


def _unpack4(p: np.ndarray, n: int) -> np.ndarray:
    u = np.empty(p.size * 2, np.uint8)
    u[0::2], u[1::2] = p & 15, p >> 4
    return u[:n].astype(np.int8) - 8


class _Writer:
    """Accumulates per-tensor records for container.pack."""

    def __init__(self):
        self.arrays, self.meta = {}, []

    def add(self, name, t, kind, **arrays):
        self.meta.append({"n": name, "k": kind, "s": list(t.shape),
                          "d": str(t.dtype).removeprefix("torch.")})
        for key, arr in arrays.items():
            self.arrays[f"{name}|{key}"] = arr

    def raw(self, name, t, half=False):
        a = _np(t)
        self.add(name, t, "raw", a=a.astype(np.float16) if half and t.is_floating_point() else a)

    def blob(self) -> bytes:
        return pack(self.arrays, self.meta)


def decode(blob: bytes) -> dict:
    """Decode any baseline container back to a torch state_dict."""
    arrays, meta = unpack(blob)
    out = {}
    for rec in meta:
        name, kind, shape = rec["n"], rec["k"], rec["s"]
        get = lambda key: arrays[f"{name}|{key}"]  # noqa: E731
        if kind == "raw":
            w = get("a").astype(np.float32) if get("a").dtype == np.float16 else get("a")
        elif kind == "q8":
            w = _dequant(get("q"), get("s"))
        elif kind == "q4":
            m = shape[0]
            n = int(np.prod(shape)) // m
            w = _dequant(_unpack4(get("q"), m * n).reshape(m, n), get("s"))
        elif kind == "svd":
            u = _dequant(get("u"), get("us")) * get("S")[None, :]
            w = u @ _dequant(get("v"), get("vs"))
        else:
            raise ValueError(f"unknown record kind {kind!r}")
        out[name] = torch.from_numpy(np.array(w).reshape(shape)).to(getattr(torch, rec["d"]))
    return out


# ---------------------------------------------------------------- baselines

def fp32_zstd(state_dict):
    """Lossless reference: fp32 tensors + zstd-19."""
    def enc(sd):
        w = _Writer()
        for k, t in sd.items():
            w.raw(k, t)
        return w.blob()
    return _timed(enc, state_dict)


def fp16_zstd(state_dict):
    """All float tensors cast to fp16 + zstd-19."""
    def enc(sd):
        w = _Writer()
        for k, t in sd.items():
            w.raw(k, t, half=True)
        return w.blob()
    return _timed(enc, state_dict)


def _rtn(state_dict, bits: int, prune: float = 0.0, scope: str = "global"):
    qmax = 2 ** (bits - 1) - 1

    def enc(sd):
        w = _Writer()
        thr = _global_threshold(sd, prune) if prune > 0 and scope == "global" else None
        for k, t in sd.items():
            if not _quantisable(t):
                w.raw(k, t, half=True)
                continue
            w2 = _np(t).reshape(t.shape[0], -1)
            if thr is not None:
                w2 = np.where(np.abs(w2) <= thr, np.float32(0), w2)
            elif prune > 0:
                w2 = _magnitude_prune(w2, prune)
            q, s = quant_rows(w2, qmax)
            if bits == 8:
                w.add(k, t, "q8", q=q, s=s)
            else:
                w.add(k, t, "q4", q=_pack4(q), s=s)
        return w.blob()
    return _timed(enc, state_dict)


def int8_zstd(state_dict):
    """Per-output-channel symmetric int8 RTN, fp16 scales, zstd-19."""
    return _rtn(state_dict, 8)


def int4_zstd(state_dict):
    """Per-output-channel symmetric int4 RTN (levels -7..7, two per byte)."""
    return _rtn(state_dict, 4)


def _magnitude_prune(w2: np.ndarray, fraction: float) -> np.ndarray:
    k = int(round(fraction * w2.size))
    if k <= 0:
        return w2
    flat = w2.reshape(-1).copy()
    flat[np.argpartition(np.abs(flat), k - 1)[:k]] = 0
    return flat.reshape(w2.shape)


def _global_threshold(sd, fraction: float) -> float:
    mags = np.concatenate([np.abs(_np(t)).ravel() for t in sd.values() if _quantisable(t)])
    k = int(round(fraction * mags.size))
    return float(np.partition(mags, k - 1)[k - 1]) if k > 0 else -1.0


def prune_int8(state_dict, fraction: float, scope: str = "global"):
    """Magnitude pruning of `fraction` of all 2-D+ weights, then int8 + zstd-19
    (zstd turns the runs of zeros into the size saving).

    scope="global" uses one magnitude threshold for all weights (the usual
    and much stronger choice: it prunes the big, redundant layers hardest);
    scope="layer" prunes the same fraction of every weight tensor."""
    if scope not in ("global", "layer"):
        raise ValueError("scope must be 'global' or 'layer'")
    return _rtn(state_dict, 8, prune=fraction, scope=scope)


# --------------------------------------------------------------- SVD + int8

def _svd_factors(k: int, U, S, Vt):
    uq, us = quant_rows(U[:, :k], 127)
    vq, vs = quant_rows(Vt[:k], 127)
    return uq, us, S[:k].astype(np.float32), vq, vs


def _single_thread_blas():
    try:
        from threadpoolctl import threadpool_limits  # ships with scikit-learn
        return threadpool_limits(1, user_api="blas")
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()


def _truncation_errors(S, Vt, x):
    """err[k-1] = relative output error of the rank-k truncation, k=1..r.

    ||X(W_k - W)^T|| = ||X V_{k:} diag(S_{k:})|| because U has orthonormal
    columns, so one pass gives the whole (monotone) error curve.  Without
    inputs x this is the relative Frobenius error of the weight."""
    if x is None:
        col = S.astype(np.float64) ** 2
    else:
        col = (((x.astype(np.float64) @ Vt.T) * S) ** 2).sum(0)
    tail = np.cumsum(col[::-1])[::-1]               # tail[j] = sum_{i>=j} col[i]
    return np.sqrt(np.append(tail[1:], 0.0) / max(tail[0], 1e-300))


def svd_int8(state_dict, eps: float, calib: dict | None = None):
    """Post-training truncated SVD with int8 factors (Dyro, "Posttraining
    compression of neural networks via SVD").

    Per 2-D weight W (conv kernels as (out, -1)) the rank k is the smallest
    whose *layer output* relative error ||W_k x - W x|| / ||W x|| is <= eps,
    found by binary search over the monotone error curve.  x are calibration
    inputs `calib[name]` (N, fan_in); weights without them (embeddings) use
    the Frobenius error, i.e. the output error for isotropic inputs.  As in
    the reference, U_k and V_k are then quantised (int8 per row, fp16
    scales) and Sigma_k is kept in fp32; if k would not beat the break-even
    rank m*n/(m+n) the layer stays dense (plain int8).
    """
    calib = calib or {}

    def enc(sd):
        w = _Writer()
        for name, t in sd.items():
            if not _quantisable(t):
                w.raw(name, t, half=True)
                continue
            w2 = _np(t).reshape(t.shape[0], -1)
            m, n = w2.shape
            x = calib.get(name)
            x = None if x is None else _np(x).reshape(-1, n)
            with _single_thread_blas():  # multi-threaded OpenBLAS SVD can be 100x
                U, S, Vt = np.linalg.svd(w2, full_matrices=False)  # slower on busy CPUs
            errs = _truncation_errors(S, Vt, x)
            k = int(np.searchsorted(-errs, -eps)) + 1   # first k with err <= eps
            if k > (m * n) // (m + n):
                q, s = quant_rows(w2, 127)
                w.add(name, t, "q8", q=q, s=s)
                continue
            uq, us, s, vq, vs = _svd_factors(k, U, S, Vt)
            w.add(name, t, "svd", u=uq, us=us, S=s, v=vq, vs=vs)
        return w.blob()
    return _timed(enc, state_dict)
