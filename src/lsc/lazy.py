"""Inference that keeps weights compressed in memory: per-layer decompression on the fly.

``lsc.load(path, model, lazy=True)`` (or :func:`load_lazy`) loads a .lsc file into a
plain model so that every spectral tensor stays in memory in compact form and is
decoded just before the module that owns it runs, then released:

* each compressed parameter is replaced by an empty placeholder and a
  ``torch.nn.utils.parametrize`` parametrization whose forward decodes the tensor
  from a compact store, so the model keeps its class and ``module.weight``
  still works (it decodes on access);
* forward pre/post hooks on every module owning such a tensor open a *scope*:
  inside it each tensor is decoded at most once (a module that reads its weight
  twice, nn.MultiheadAttention reading ``out_proj.weight``, RNNs reading
  ``_flat_weights``) and everything decoded is dropped when the module returns.
  Tied tensors share one store and are decoded once per use;
* decoding ends in :func:`lsc.reconstruct.reconstruct`, the decoder of the eval
  forward and of the file loader, so outputs equal the densely loaded model's
  bit for bit (on the device that decodes).

Two in-memory representations (``mode``):

``"entropy"``  the file's ANS streams themselves (smallest; constriction decodes
               on the CPU at every use, then the inverse transform runs on the
               model's device);
``"packed"``   integer coefficients bit-packed per frequency position
               (:mod:`lsc.packing`; somewhat larger, unpacked by integer tensor ops
               on the model's device, no CPU work).

``cache=N`` keeps the N most recently decoded tensors (an LRU) to trade memory for
speed. Large tensors (more than ``chunk_numel`` elements) are reconstructed
block-row chunk by chunk into the output so that decoding needs little more than
the output itself; on the first decode on each device the chunked result is
checked bit for bit against a whole-tensor :func:`reconstruct` (matrix-product
kernels may differ with the row count) and chunking is turned off for that tensor
if they differ.

A file of a factorized model (``lsc.factorize``) loads into the unfactored model too, as it does
densely: each factor stays compact and the weight is decoded from its factors and multiplied per use
(:func:`lsc.lowrank.fold_factors`, as dense loading folds them).

Lazy models are for inference (the decoded weights carry no gradient);
``model.to(device)`` moves the compact stores too, and a cast (``model.half()``) casts
the decoded weights (decoding still runs at the file's precision). They may run in
many threads at once, and ``copy.deepcopy`` gives a copy with its own cache.
"""
from __future__ import annotations

import contextlib
import math
import threading
import tracemalloc
import types
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .blocking import BlockLayout
from .buffers import decode_buffers
from .codec import api as _api
from .codec.entropy import GroupStream, decode_positions, group_bounds
from .errors import LscError, LscFormatError
from .grouping import position_groups
from .packing import PackedCoefficients, int_dtype_for
from .precision import full_precision
from .reconstruct import compute_dtype_for, reconstruct
from .rowclasses import row_units
from .state import parametrization_key, resolve
from .wrappers import inner_module, unwrap_for_conversion

__all__ = ["load_lazy", "lazy_info", "LazyParametrization", "DecodeMemoryTracker", "MODES"]

MODES = ("entropy", "packed")
DEFAULT_CHUNK_NUMEL = 1 << 19
MIN_CHUNK_NUMEL = 1 << 14


# --------------------------------------------------------------------------- integer coefficients

def _read_meta(m: dict):
    dtype = _api._DTYPES[m["dtype"]]
    layout = BlockLayout(tuple(m["shape"]), tuple(m["block"]))
    cdt = compute_dtype_for(dtype)
    mean = _api._tensor_from_bytes(bytes.fromhex(m["mean"]), cdt, []).clone()
    std = _api._tensor_from_bytes(bytes.fromhex(m["std"]), cdt, []).clone()
    order = _api._SCANS[m["scan"]](layout.block_shape)
    bounds = group_bounds(position_groups(layout, m["min_group"], m["scan"]), order)
    return dtype, layout, mean, std, order, bounds


def _codec_integers(m: dict, data: bytes, layout, order, bounds, transpose: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(q (num_blocks, P) int64, exponents (P,) int64) with the codec's own decoder (row-major positions);
    ``transpose=False``: q as the decoder gives it, (P, num_blocks), without a transposed copy."""
    side, ans = data[:m["side"]], data[m["side"]:]
    q, e = decode_positions(side, ans, layout.block_numel, layout.num_blocks, order, bounds, m["name"],
                            m.get("segments"), classes=m.get("classes", 1), units=row_units(layout))
    return (np.ascontiguousarray(q.T, dtype=np.int64) if transpose else q), e


def _stream_integers(gs: GroupStream, layout, order) -> torch.Tensor:
    """Same symbols as :func:`lsc.codec.entropy.decode_positions`, decoded group by group straight into a
    (num_blocks, P) array of the narrowest integer dtype (no int64 copy of the whole tensor)."""
    P, nb = layout.block_numel, layout.num_blocks
    # allocated by torch (so decode-memory tracking sees it) and filled through a NumPy view
    q_t = torch.empty((nb, P), dtype=int_dtype_for(*gs.value_range()))
    q = q_t.numpy()
    for a, b, blocks, lo, s in gs:
        cols = order[a:b]
        if blocks is not None:  # one row class: its blocks only
            at = np.ix_(blocks, cols)
            q[at] = lo if s is None else (np.asarray(s).reshape(b - a, blocks.size).T + np.asarray(lo, dtype=q.dtype))
            continue
        if s is None:
            q[:, cols] = lo
            continue
        q[:, cols] = np.asarray(s).reshape(b - a, nb).T  # no int64 temporary: offset in place
        if lo:
            q[:, cols] += np.asarray(lo, dtype=q.dtype)
    return q_t


# --------------------------------------------------------------------------- compact stores

def _apply_keeping_dtypes(store, apply, fn, device, *args, **kwargs):
    """``store._apply(fn)`` for a store: a cast changes ``store.dtype`` (the decoded weight's) only; the
    compact form, the statistics and any inner store keep the file's dtypes, and a move moves them all."""
    probe = fn(torch.zeros(0, dtype=store.dtype, device=device))
    if probe.is_floating_point():
        store.dtype = probe.dtype

    def keep_dtype(t):
        moved = fn(t.new_empty(0))
        return fn(t) if moved.dtype == t.dtype else t.to(moved.device)
    return apply(keep_dtype, *args, **kwargs)


class _Store(nn.Module):
    """One compressed tensor in compact form; ``decode(device)`` -> the dense weight."""

    def __init__(self, m: dict, layout: BlockLayout, dtype, mean, std, exponent: np.ndarray, chunk_numel: int):
        super().__init__()
        self.name, self.layout, self.transform = m["name"], layout, m["transform"]
        self.file_dtype = self.dtype = dtype  # the file's dtype, and the decoded weight's (model.half() changes it)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.register_buffer("exponent", torch.from_numpy(np.ascontiguousarray(exponent)), persistent=False)
        self.chunks = self._plan(chunk_numel)
        self.chunk_ok: dict[torch.device, bool] = {}
        self.last = None  # weakref to the last decoded tensor (for tests and introspection)

    def _plan(self, chunk_numel: int):
        L = self.layout
        # chunks of numel/8 elements, between MIN_CHUNK_NUMEL and chunk_numel: decoding temporaries stay a
        # fraction of the output for mid-size tensors and bounded for huge ones
        chunk_numel = max(min(MIN_CHUNK_NUMEL, chunk_numel), min(chunk_numel, L.numel // 8))
        if not L.shape or L.numel <= chunk_numel or L.grid[0] < 2:
            return None
        per_row = L.num_blocks // L.grid[0] * L.block_numel
        step = max(1, chunk_numel // per_row)
        cuts = list(range(0, L.grid[0], step)) + [L.grid[0]]
        if len(cuts) > 2 and cuts[-1] - cuts[-2] < step // 2:  # no small last chunk
            del cuts[-2]
        return None if len(cuts) <= 2 else list(zip(cuts[:-1], cuts[1:]))

    def _apply(self, fn, *args, **kwargs):
        """A cast (``model.half()``) changes only the dtype of the decoded weight: the compact form and the
        statistics keep the file's dtypes, so decoding runs at the file's precision and only its result is cast."""
        return _apply_keeping_dtypes(self, super()._apply, fn, self.mean.device, *args, **kwargs)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    @property
    def decoded_nbytes(self) -> int:
        """Bytes of the decoded weight."""
        return self.layout.numel * self.dtype.itemsize

    @property
    def compact_nbytes(self) -> int:
        raise NotImplementedError

    def _rows(self, source, r0: int, r1: int) -> torch.Tensor:
        raise NotImplementedError

    def _source(self, device):
        raise NotImplementedError

    def _reconstruct(self, q, layout, device):
        return reconstruct(q, self.exponent.to(device), layout, self.mean.to(device), self.std.to(device),
                           self.file_dtype, self.transform)

    def decode_chunk(self, src, g0: int, g1: int, device) -> torch.Tensor:
        """Rows of block rows g0..g1-1 (one entry of ``self.chunks``) of the weight."""
        L = self.layout
        rpb, b0 = L.num_blocks // L.grid[0], L.block_shape[0]
        sub = BlockLayout((min(L.shape[0], g1 * b0) - g0 * b0,) + L.shape[1:], L.block_shape)
        return self._reconstruct(self._rows(src, g0 * rpb, g1 * rpb), sub, device)

    def gather_rows(self, idx: torch.Tensor, device) -> torch.Tensor | None:
        """weight[idx] decoding only the chunks that hold the rows (None if chunking is not verified here)."""
        device = torch.device(device)
        if len(self.layout.shape) != 2 or not self.check_chunking(device):
            return None
        uniq, inv = torch.unique(idx, return_inverse=True)
        if uniq.numel():
            lo, hi = uniq[[0, -1]].tolist()
            if lo < 0 or hi >= self.layout.shape[0]:  # as a dense nn.Embedding (no row here is left undecoded)
                raise IndexError(f"index out of range in self: {lo if lo < 0 else hi} for the "
                                 f"{self.layout.shape[0]} rows of {self.name}")
        b0 = self.layout.block_shape[0]
        table = torch.empty((uniq.numel(), self.layout.shape[1]), dtype=self.dtype, device=device)
        bounds = torch.tensor([[g0 * b0, g1 * b0] for g0, g1 in self.chunks], device=uniq.device)
        cuts = torch.searchsorted(uniq, bounds.reshape(-1)).reshape(-1, 2).tolist()
        src = None
        for (g0, g1), (i0, i1) in zip(self.chunks, cuts):
            if i1 > i0:
                src = self._source(device) if src is None else src
                w = self.decode_chunk(src, g0, g1, device)
                table[i0:i1] = w[uniq[i0:i1] - g0 * b0]
        return torch.nn.functional.embedding(inv, table)

    def check_chunking(self, device) -> bool:
        """Whether decoding chunk by chunk gives the whole weight bit for bit on ``device`` (the BLAS may
        round a product of fewer rows differently). Checked once per device, at load for the model's own,
        chunk by chunk against one whole decode: at most the whole weight and one chunk at a time."""
        if not self.chunks:
            return False
        device = torch.device(device)
        ok = self.chunk_ok.get(device)
        if ok is None:
            L, b0 = self.layout, self.layout.block_shape[0]
            src = self._source(device)
            full = self._reconstruct(self._rows(src, 0, L.num_blocks), L, device)
            ok = all(torch.equal(self.decode_chunk(src, g0, g1, device), full[g0 * b0: min(L.shape[0], g1 * b0)])
                     for g0, g1 in self.chunks)
            self.chunk_ok[device] = ok
        return ok

    def decode(self, device) -> torch.Tensor:
        device = torch.device(device)
        L = self.layout
        if not self.check_chunking(device):  # no chunks, or chunking found inexact on this device
            return self._reconstruct(self._rows(self._source(device), 0, L.num_blocks), L, device).to(self.dtype)
        src = self._source(device)
        out = torch.empty(L.shape, dtype=self.dtype, device=device)  # chunks are cast as they are copied in
        for g0, g1 in self.chunks:
            w = self.decode_chunk(src, g0, g1, device)
            out[g0 * L.block_shape[0]: g0 * L.block_shape[0] + w.shape[0]].copy_(w)
        return out


class _EntropyStore(_Store):
    """Mode "entropy": the file's side information and ANS stream, decoded on the CPU per use."""

    def __init__(self, m, data: bytes, verify: bool, chunk_numel: int):
        dtype, layout, mean, std, order, bounds = _read_meta(m)
        self.__dict__["_order"], self.__dict__["_bounds"] = order, bounds
        side, ans = data[:m["side"]], data[m["side"]:]
        # Side information (tables, ranges, exponents) is parsed once here; each use only re-runs
        # the ANS decoder, so decoding allocates no bit-level scratch.
        gs = GroupStream(side, ans, layout.block_numel, layout.num_blocks, bounds, m["name"], m.get("segments"),
                         m.get("classes", 1), row_units(layout))
        e = np.empty(layout.block_numel, dtype=np.int64)
        e[order] = gs.exponents
        super().__init__(m, layout, dtype, mean, std, e, chunk_numel)
        self.__dict__["_groups"] = gs  # plain attribute: stays on the CPU
        self.side_nbytes = len(side)
        if verify:
            q_ref, e_ref = _codec_integers(m, data, layout, order, bounds, transpose=False)
            q = _stream_integers(gs, layout, order).numpy()
            if not (np.array_equal(q, q_ref.T) and np.array_equal(e, e_ref)):
                raise LscError(f"{self.name}: lazy entropy decoder disagrees with the codec")

    @property
    def compact_nbytes(self) -> int:
        gs = self.__dict__["_groups"]
        arrays = [v for v in vars(gs).values() if isinstance(v, np.ndarray)]
        arrays += [c for c in gs.cols if c is not None] + [np.asarray(self.__dict__["_order"]), self.__dict__["_bounds"]]
        owners = {}
        for a in arrays:  # views (a row class's columns) count once, with the array they look into
            while isinstance(a.base, np.ndarray):
                a = a.base
            owners[id(a)] = a
        return sum(a.nbytes for a in owners.values()) + sum(b.numel() * b.element_size() for b in self.buffers())

    def _source(self, device):
        q = _stream_integers(self.__dict__["_groups"], self.layout, self.__dict__["_order"])
        return q.to(device)

    def _rows(self, source, r0, r1):
        return source[r0:r1]


class _PackedStore(_Store):
    """Mode "packed": integer coefficients bit-packed per frequency position, unpacked on the model's device."""

    def __init__(self, m, data: bytes, verify: bool, chunk_numel: int):
        dtype, layout, mean, std, order, bounds = _read_meta(m)
        # the integers in their narrowest dtype, group by group (no int64 copy of the tensor)
        gs = GroupStream(data[:m["side"]], data[m["side"]:], layout.block_numel, layout.num_blocks, bounds, m["name"],
                         m.get("segments"), m.get("classes", 1), row_units(layout))
        q = _stream_integers(gs, layout, order).numpy()
        e = np.empty(layout.block_numel, dtype=np.int64)
        e[order] = gs.exponents
        del gs
        super().__init__(m, layout, dtype, mean, std, e, chunk_numel)
        self.packed = PackedCoefficients(q, mean.dtype)
        if verify:  # the codec's own decoder, compared block row range by range (no second unpacked copy)
            q_ref, e_ref = _codec_integers(m, data, layout, order, bounds, transpose=False)
            step = max(1, (1 << 20) // max(layout.block_numel, 1))
            same = np.array_equal(e, e_ref) and all(
                np.array_equal(self.packed.rows(r, min(r + step, layout.num_blocks)).numpy(), q_ref[:, r:r + step].T)
                for r in range(0, layout.num_blocks, step))
            if not same:
                raise LscError(f"{self.name}: bit packing does not round-trip")

    @property
    def compact_nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _source(self, device):
        if self.packed.lo.device != device:
            self.packed.to(device)
        return self.packed

    def _rows(self, source, r0, r1):
        return source.rows(r0, r1)


class _FactoredStore(nn.Module):
    """A weight that the file holds as ``lsc.factorize`` factors (``X.parametrizations.W.original0/1[/2]``),
    loaded into a model where ``X.W`` is a plain weight: each factor stays compact (a store of its own, or
    the raw tensor when the file holds it raw) and ``decode`` multiplies the decoded factors as dense loading
    folds them (:func:`lsc.lowrank.fold_factors`), so the weight equals the densely loaded one bit for bit."""

    def __init__(self, name: str, factors: dict, shape: tuple[int, ...]):
        super().__init__()
        from .lowrank import folded_shape
        self.name = name
        fold = folded_shape({i: tuple(f.shape) for i, f in factors.items()}, name)
        # the model's shape when the numbers fit (conv kernels factored as matrices); else check_fits names it
        self.shape = tuple(shape) if shape is not None and math.prod(shape) == math.prod(fold) else fold
        self.index = sorted(factors)
        self.stores = nn.ModuleDict({str(i): f for i, f in factors.items() if isinstance(f, _Store)})
        for i, f in factors.items():
            if not isinstance(f, _Store):
                self.register_buffer(f"raw{i}", f, persistent=False)
        dtypes = {f.file_dtype if isinstance(f, _Store) else f.dtype for f in factors.values()}
        self.file_dtype = self.dtype = torch.promote_types(*dtypes) if len(dtypes) > 1 else dtypes.pop()
        self.last = None

    def _apply(self, fn, *args, **kwargs):
        device = next(iter(self.buffers()), torch.empty(0)).device
        return _apply_keeping_dtypes(self, super()._apply, fn, device, *args, **kwargs)

    def _factor(self, i: int, device) -> torch.Tensor:
        if str(i) in self.stores:
            return self.stores[str(i)].decode(device)
        return getattr(self, f"raw{i}").to(device)

    @property
    def decoded_nbytes(self) -> int:
        """Bytes of the decoded weight and of its decoded factors (alive together while they are multiplied)."""
        factors = sum(math.prod(s.shape) * s.file_dtype.itemsize for s in self.stores.values())
        return math.prod(self.shape) * self.dtype.itemsize + factors

    @property
    def compact_nbytes(self) -> int:
        raw = sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))
        return raw + sum(s.compact_nbytes for s in self.stores.values())

    def check_chunking(self, device) -> bool:
        """Factors decode whole (see :meth:`_Store.check_chunking`)."""
        return False

    def gather_rows(self, idx: torch.Tensor, device) -> None:
        return None  # rows of a product are not a copy of the stored rows: the whole weight is decoded

    def decode(self, device) -> torch.Tensor:
        from .lowrank import fold_factors
        device = torch.device(device)
        w = fold_factors({i: self._factor(i, device) for i in self.index}, self.name)
        return w.reshape(self.shape).to(self.dtype)


def _fold_factored(plan: list, raw: dict, own: dict) -> tuple[list, dict]:
    """``plan`` and ``raw`` with the factors of each weight that the model holds unfactored gathered into one
    :class:`_FactoredStore` under the weight's name, as dense loading folds them
    (:func:`lsc.lowrank.fold_factored_state_dict`). A weight whose factor names the model has (some or all:
    a model factorized the same way, or otherwise) is left as it is, for the usual checks to judge."""
    from .lowrank import factor_of
    groups: dict[str, dict[int, tuple[str, Any]]] = {}
    stems: dict[str, str] = {}
    for src in ([(store, names[0]) for store, names in plan if len(names) == 1], [(t, n) for n, t in raw.items()]):
        for f, n in src:
            factor = factor_of(n)
            if factor is not None:
                key, idx = factor
                groups.setdefault(key, {})[idx] = (n, f)
                stems[key] = n[:n.rindex("original")]  # "X.parametrizations.W."
    groups = {key: fs for key, fs in groups.items() if not any(k.startswith(stems[key]) for k in own)}
    if not groups:
        return plan, raw
    where = {n: key for key, fs in groups.items() for n, _ in fs.values()}
    folded = {key: (_FactoredStore(key, {i: f for i, (_, f) in fs.items()},
                                   tuple(own[key].shape) if key in own else None), [key]) for key, fs in groups.items()}
    out = []  # each weight where its first factor was
    for store, names in plan:
        key = where.get(names[0]) if len(names) == 1 else None
        if key is None:
            out.append((store, names))
        elif key in folded:
            out.append(folded.pop(key))
    return out + list(folded.values()), {n: t for n, t in raw.items() if n not in where}


# --------------------------------------------------------------------------- runtime: scopes, cache, hooks

class _Runtime:
    """Per-model state: open decode scopes (one memo per running module), the LRU cache, counters.

    A served model may run in several threads at once: each thread has its own scopes, and the
    cache is changed under a lock (decoding itself runs outside it, in parallel).
    """

    def __init__(self, mode: str, cache: int):
        self.mode, self.capacity = mode, int(cache)
        self._local = threading.local()
        self._lock = threading.Lock()
        self.cache: OrderedDict = OrderedDict()
        self.decodes = 0
        self.stores: list[_Store] = []
        self.tracker: DecodeMemoryTracker | None = None

    def __getstate__(self):
        """``copy.deepcopy(model)``: the copy gets its own runtime (stores copied, no cache, scopes or tracker)."""
        state = self.__dict__.copy()
        state.update(_local=None, _lock=None, cache=OrderedDict(), decodes=0, tracker=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local, self._lock = threading.local(), threading.Lock()

    @property
    def scopes(self) -> list[dict]:
        """This thread's open scopes, innermost last."""
        scopes = getattr(self._local, "scopes", None)
        if scopes is None:
            scopes = self._local.scopes = []
        return scopes

    def _cached(self, ckey) -> torch.Tensor | None:
        if not self.capacity:
            return None
        with self._lock:
            w = self.cache.get(ckey)
            if w is not None:
                self.cache.move_to_end(ckey)
            return w

    @full_precision
    def get(self, store: _Store, device) -> torch.Tensor:
        key = id(store)
        scopes = self.scopes
        for memo in reversed(scopes):
            if key in memo:
                return memo[key]
        ckey = (key, torch.device(device))
        w = self._cached(ckey)
        if w is None:
            ctx = (self.tracker.tracking(numpy=self.mode == "entropy") if self.tracker is not None
                   else contextlib.nullcontext())
            # out of inference mode: a kept weight must serve later forwards that record a graph (an input gradient)
            with ctx, torch.inference_mode(False), torch.no_grad():
                w = store.decode(device)
            store.last = weakref.ref(w)
            with self._lock:
                self.decodes += 1
                if self.capacity:
                    self.cache[ckey] = w
                    self.cache.move_to_end(ckey)
                    while len(self.cache) > self.capacity:
                        self.cache.popitem(last=False)
        if scopes:
            scopes[-1][key] = w
        return w

    @full_precision
    def embedding(self, module: nn.Embedding, store: _Store, device, idx: torch.Tensor) -> torch.Tensor:
        """An nn.Embedding forward that decodes only the chunks holding the looked-up rows (copies only, so
        bitwise equal to the dense lookup); falls back to the whole weight when that is not possible."""
        key = id(store)
        full = next((memo[key] for memo in reversed(self.scopes) if key in memo), None)
        if full is None:
            full = self._cached((key, torch.device(device)))
        if full is None and module.max_norm is None and not idx.is_floating_point():
            ctx = (self.tracker.tracking(numpy=self.mode == "entropy") if self.tracker is not None
                   else contextlib.nullcontext())
            with ctx, torch.no_grad():
                out = store.gather_rows(idx, device)
            if out is not None:
                with self._lock:
                    self.decodes += 1
                return out
        return nn.functional.embedding(idx, module.weight, module.padding_idx, module.max_norm, module.norm_type,
                                       module.scale_grad_by_freq, module.sparse)

    def clear_cache(self) -> None:
        with self._lock:
            self.cache.clear()

    def resize_cache(self, n: int) -> None:
        with self._lock:
            self.capacity = n
            while len(self.cache) > n:
                self.cache.popitem(last=False)


class LazyParametrization(nn.Module):
    """``weight = decode(store)``: the placeholder ``original`` only tells the device."""

    def __init__(self, store: _Store, runtime: _Runtime):
        super().__init__()
        self.store = store  # a submodule, so model.to(device) moves packed data and statistics
        self.__dict__["runtime"] = runtime  # plain attribute: shared by all tensors, not a submodule

    @property
    def runtime(self) -> _Runtime:
        return self.__dict__["runtime"]

    def _apply(self, fn, *args, **kwargs):
        self.runtime.clear_cache()  # cached weights have the old device or dtype
        return super()._apply(fn, *args, **kwargs)

    # Under torch.compile the weight is decoded eagerly (a graph break), as a spectral weight is: the decoder
    # writes through out= views and keeps Python-side caches, which tracing cannot follow.
    @torch.compiler.disable
    def forward(self, placeholder: torch.Tensor) -> torch.Tensor:
        _refuse_tracing(self.store.name)
        _refuse_training(self.store.name, placeholder)
        return self.__dict__["runtime"].get(self.store, placeholder.device)

    def extra_repr(self) -> str:
        return f"{self.store.name}: {self.__dict__['runtime'].mode}, {self.store.compact_nbytes} bytes"


def _refuse_tracing(name: str) -> None:
    """A lazy weight is entropy-decoded at each call, which torch.export and torch.jit.trace cannot record."""
    if torch.compiler.is_exporting() or torch.jit.is_tracing():
        raise LscError(f"{name}: a model loaded with lazy=... decodes its weights at each call, which torch.export "
                       "and torch.jit.trace cannot record; load the file with lsc.load(path, model) (dense weights) "
                       "to export or trace it")


def _refuse_training(name: str, placeholder: torch.Tensor) -> None:
    """A lazy weight has no trainable tensor (its placeholder is empty): an optimizer would silently do nothing."""
    if placeholder.requires_grad and torch.is_grad_enabled():
        raise LscError(f"{name}: a model loaded with lazy=... is inference only and its weights cannot be trained "
                       "(requires_grad was set on its placeholders); to fine-tune, load the file dense with "
                       "lsc.load(path, model), or into a spectral model")


@torch.compiler.disable  # decoded eagerly under torch.compile, as LazyParametrization.forward is
def _embedding_forward(self, input):
    par = self.parametrizations.weight[0]
    _refuse_tracing(par.store.name)
    _refuse_training(par.store.name, self.parametrizations.weight.original)
    return par.runtime.embedding(self, par.store, self.parametrizations.weight.original.device, input)


# Hooks find the runtime on their module (not in a closure), so that a deep copy uses its own.
def _pre_hook(module, args):
    module.__dict__["_lsc_lazy_runtime"].scopes.append({})


def _post_hook(module, args, output):
    scopes = module.__dict__["_lsc_lazy_runtime"].scopes
    if scopes:
        scopes.pop()
    if isinstance(module, nn.RNNBase):
        _release_flat_weights(module)
    return None


_STALE = torch.empty(0)  # what released RNN weakrefs point to: never a weight, so the next forward re-reads


def _release_flat_weights(module: nn.RNNBase) -> None:
    """RNNs keep strong references to their weights in _flat_weights: drop them, and point the weakrefs
    at no weight, so that the next forward re-reads (decodes) them in its own scope even when the
    decoded weights are still alive in the cache."""
    n = len(module._flat_weights_names)
    module._flat_weights, module._flat_weight_refs = [None] * n, [weakref.ref(_STALE)] * n


class _FlatWeights(threading.local):
    """An RNN's _flat_weights and _flat_weight_refs, one pair per thread: a thread releasing its weights
    never touches those another thread's forward is reading. A deep copy starts empty."""

    def __init__(self, n: int):
        self.n = n
        self._flat_weights, self._flat_weight_refs = [None] * n, [weakref.ref(_STALE)] * n

    def __deepcopy__(self, memo):
        return type(self)(self.n)


def _thread_attribute(name: str) -> property:
    return property(lambda self: getattr(self.__dict__["_lsc_flat"], name),
                    lambda self, value: setattr(self.__dict__["_lsc_flat"], name, value))


def _per_thread_flat_weights(module: nn.RNNBase) -> None:
    module.__dict__["_lsc_flat"] = _FlatWeights(len(module._flat_weights_names))
    cls = type(module)  # parametrize's own subclass for this module alone
    for name in ("_flat_weights", "_flat_weight_refs"):
        module.__dict__.pop(name, None)
        setattr(cls, name, _thread_attribute(name))


# --------------------------------------------------------------------------- loading

def _target_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


@torch.no_grad()
def load_lazy(src, model: nn.Module, *, mode: str = "packed", cache: int = 0, strict: bool = True,
              verify: bool = True, chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> nn.Module:
    """Load a .lsc file (path, bytes, or compressed dict) into a plain ``model``, keeping weights compressed.

    Every spectral tensor of the file becomes a parametrization of its module that
    decodes it when read (``module.weight``) and holds nothing dense between uses;
    other tensors (raw-coded buffers, parameters lsc did not compress) are loaded
    normally. The model may live on any device, or on the meta device (raw tensors
    are then assigned and everything decodes on the CPU; move it with ``.to``).

    Args:
        mode: ``"packed"`` (bit-packed integers, decoded by tensor ops on the model's
            device; fast) or ``"entropy"`` (the ANS streams; smallest, CPU entropy decoding per use).
        cache: keep the N most recently decoded tensors (0: decode at every use).
        strict: the file and the model must hold exactly the same tensors.
        verify: check at load time that the in-memory form decodes to the codec's integers.
        chunk_numel: tensors larger than this are reconstructed in chunks of about this many elements.

    Returns the model (in place), in eval mode. ``lazy_info(model)`` reports the memory it holds.
    """
    if mode not in MODES:
        raise LscError(f"unknown lazy mode {mode!r}; use one of {MODES}")
    outer, model = model, unwrap_for_conversion(model, "lsc.load(path, model, lazy=True)")
    if getattr(model, "_lsc", None) is not None:
        raise LscError("lazy loading takes a plain model; load into a spectral model with lsc.load(path, model)")
    if getattr(model, "_lsc_lazy", None) is not None:
        raise LscError("model was already loaded lazily")
    if isinstance(src, dict):
        header, streams, _ = _api._parts_from_dict(src)
    else:
        header, streams, _ = _api._parts_from_bytes(_api._read(src))
    device = _target_device(model)
    runtime = _Runtime(mode, cache)
    raw: dict[str, torch.Tensor] = {}
    buffers: list[dict] = []
    plan = []
    for m, s in zip(header["tensors"], streams):
        names = [m["name"], *m.get("tied", [])]
        try:
            if m["kind"] == "spectral":
                store = (_PackedStore if mode == "packed" else _EntropyStore)(m, bytes(s), verify, chunk_numel)
                plan.append((store, names))
                continue
            if m["kind"] == "buffers":  # lossy float buffers (saved with buffer_tolerance): small, decoded now
                buffers.append(decode_buffers(bytes(s)))
                continue
            t = _api._decode_raw(m, s)
        except (LscError, KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # constriction can raise (or panic) on crafted data
            raise LscFormatError(f"{m['name']}: cannot decode ({type(exc).__name__}: {exc})") from None
        for n in names:
            raw[n] = t
    _api._check_buffer_names(header["tensors"], buffers)
    for decoded in buffers:
        raw.update(decoded)
    own_state = model.state_dict(keep_vars=True)
    # a file of a factorized model (lsc.factorize) into the unfactored model: each weight is decoded from its
    # factors and multiplied, as dense loading folds them
    plan, raw = _fold_factored(plan, raw, own_state)
    groups = _api.tie_groups(own_state)  # a checkpoint may hold a tied tensor under one of its names only
    plan = [(store, names + [n for g in groups if set(g) & set(names) for n in g if n not in names])
            for store, names in plan]
    raw = _api.fill_tied_names(raw, groups)
    # everything is checked before the model is touched: a file that does not fit leaves it as it was
    # (a spectral tensor's shape stands in as an empty meta tensor)
    in_file = {**{n: torch.empty(store.shape, device="meta") for store, names in plan for n in names}, **raw}
    _api.check_fits(own_state, in_file, strict)
    _api.check_no_meta_buffers_outside_state(model, own_state)
    own = set(own_state)
    targets = []
    for store, names in plan:
        for n in names:
            module, attr = resolve(model, n)
            if module is None or n not in own:
                continue
            old = module._parameters.get(attr)
            if old is None:
                raise LscError(f"{n}: lazy loading replaces parameters only, and this is not a parameter of the model")
            if parametrize.is_parametrized(module, attr):
                raise LscError(f"{n}: is already parametrized")
            targets.append((store, module, attr, old))
    owners: dict[int, nn.Module] = {}
    for store, _ in plan:
        store.to(device)
        store.check_chunking(device)  # now, so that no forward pays for it (nor holds its whole weight)
        runtime.stores.append(store)
    for store, module, attr, old in targets:
        dev = device if old.is_meta else old.device
        if not old.is_meta and old.is_floating_point() and old.dtype != store.dtype:
            store.dtype = old.dtype  # a cast model (.half()): decoded at the file's precision, then cast, as dense loading
        module._parameters[attr] = nn.Parameter(torch.empty(0, dtype=store.dtype, device=dev), requires_grad=False)
        parametrize.register_parametrization(module, attr, LazyParametrization(store, runtime), unsafe=True)
        owners[id(module)] = module
    if raw:
        meta = any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
        keep = {k: v.to(device) for k, v in raw.items() if k in own}
        model.load_state_dict(keep, strict=False, assign=meta)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise LscError(f"tensors still on the meta device after loading (not in the file): {left[:5]}; "
                       "build the model on a real device (weights are freed as they are replaced)")
    for module in owners.values():
        if isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward:
            module.forward = types.MethodType(_embedding_forward, module)
        module.__dict__["_lsc_lazy_runtime"] = runtime
        module.register_forward_pre_hook(_pre_hook)
        module.register_forward_hook(_post_hook, always_call=True)
        module._register_load_state_dict_pre_hook(_refuse_load_state_dict, with_module=True)
        if isinstance(module, nn.RNNBase):
            _per_thread_flat_weights(module)
    model.__dict__["_lsc_lazy"] = runtime
    model._register_state_dict_hook(_dense_state_dict_hook)
    return outer.eval()


def _lazy_tensors(module: nn.Module):
    """(attribute name, LazyParametrization) of each lazily decoded tensor of ``module`` itself."""
    if not parametrize.is_parametrized(module):
        return []
    return [(attr, plist[0]) for attr, plist in module.parametrizations.items()
            if isinstance(plist[0], LazyParametrization)]


def _dense_state_dict_hook(model, state_dict, prefix, local_metadata):
    """``model.state_dict()`` of a lazy model holds the decoded weights under the model's own keys, not the
    empty placeholders: saving it gives an ordinary dense checkpoint (each tensor decoded once)."""
    decoded = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for attr, par in _lazy_tensors(module):
            name = f"{path}.{attr}" if path else attr
            placeholder = parametrization_key(prefix, name) + "original"
            if placeholder in state_dict:
                device = state_dict.pop(placeholder).device
                key = id(par.store)
                if key not in decoded:
                    decoded[key] = par.runtime.get(par.store, device)
                state_dict[prefix + name] = decoded[key]
    return state_dict


def _refuse_load_state_dict(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """A lazy model's weights are decoded from its file: a state dict cannot replace them."""
    attrs = [attr for attr, _ in _lazy_tensors(module)]
    keys = [k for a in attrs for k in (prefix + a, f"{prefix}parametrizations.{a}.original")]
    if attrs and (strict or any(k in state_dict for k in keys)):
        raise LscError(f"{prefix + attrs[0]}: a lazily loaded model decodes its weights from its .lsc file and "
                       "cannot load a state dict into them; load the file again (lsc.load(path, model, lazy=True)), "
                       "or load the state dict into a plain model (a lazy model's state_dict() is a dense one)")


def _runtime(model) -> _Runtime:
    m = model
    while m is not None:
        rt = m.__dict__.get("_lsc_lazy")
        if rt is not None:
            return rt
        m = inner_module(m)
    raise LscError("model was not loaded with lsc.load(..., lazy=True)")


def lazy_info(model: nn.Module) -> dict[str, Any]:
    """Memory a lazily loaded model holds: compact stores, other tensors, the largest decoded tensor."""
    rt = _runtime(model)
    compact = sum(s.compact_nbytes for s in rt.stores)
    seen, other = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        other += t.numel() * t.element_size()
    store_buffers = sum(b.numel() * b.element_size() for s in rt.stores for b in s.buffers())
    largest = max((s.decoded_nbytes for s in rt.stores), default=0)
    return {"mode": rt.mode, "tensors": len(rt.stores), "compact_bytes": compact,
            "other_bytes": other - store_buffers, "resident_bytes": compact + other - store_buffers,
            "largest_decoded_bytes": largest, "dense_bytes": sum(math.prod(s.shape) * s.dtype.itemsize for s in rt.stores),
            "decodes": rt.decodes, "cache": rt.capacity}


def set_cache(model: nn.Module, n: int) -> None:
    """Change the number of decoded tensors a lazy model keeps (0 disables the cache and frees it)."""
    _runtime(model).resize_cache(int(n))


__all__ += ["set_cache"]


# --------------------------------------------------------------------------- measurement

class DecodeMemoryTracker:
    """Counts the bytes of tensors created while decoding, for as long as they stay alive.

    Installed on a lazy model (``track_decode_memory(model)``), it sees every tensor
    the decoders allocate (through a TorchDispatchMode) and follows each storage
    until the last tensor using it dies (weakref finalizers), so ``peak`` is the
    largest number of bytes that decoded weights and their temporaries held at once,
    on any device. NumPy allocations of the entropy decoder are added from tracemalloc
    (``numpy_peak``).
    """

    def __init__(self):
        self.live: dict[int, list] = {}
        self.current = 0
        self.peak = 0
        self.numpy_peak = 0

    def reset_peak(self) -> None:
        self.peak = self.current
        self.numpy_peak = 0

    def _release(self, ptr: int) -> None:
        ent = self.live.get(ptr)
        if ent is None:
            return
        ent[1] -= 1
        if ent[1] == 0:
            self.current -= ent[0]
            del self.live[ptr]

    @staticmethod
    def _ptr(t: torch.Tensor) -> tuple[int, int]:
        try:
            st = t.untyped_storage()
        except Exception:  # noqa: BLE001  (sparse and other storage-less tensors)
            return 0, 0
        return st.data_ptr(), st.nbytes()

    def track(self, t: torch.Tensor, input_ptrs=()) -> None:
        ptr, nbytes = self._ptr(t)
        if nbytes == 0 or ptr == 0:
            return
        ent = self.live.get(ptr)
        if ent is None:
            if ptr in input_ptrs:  # a view of (or the same) tensor that existed before decoding
                return
            self.live[ptr] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            ent[1] += 1
        weakref.finalize(t, self._release, ptr)

    @contextlib.contextmanager
    def tracking(self, numpy: bool = True):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                ins = {tracker._ptr(t)[0] for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        tracker.track(t, ins)
                return out

        started = numpy and not tracemalloc.is_tracing()
        if started:
            tracemalloc.start()
        if numpy:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
        try:
            with _Mode():
                yield self
        finally:
            if numpy:
                self.numpy_peak = max(self.numpy_peak, tracemalloc.get_traced_memory()[1] - base)
            if started:
                tracemalloc.stop()


def track_decode_memory(model: nn.Module, enable: bool = True) -> DecodeMemoryTracker | None:
    """Attach (or with ``enable=False`` remove) a :class:`DecodeMemoryTracker` to a lazy model."""
    rt = _runtime(model)
    rt.tracker = DecodeMemoryTracker() if enable else None
    return rt.tracker


__all__ += ["track_decode_memory"]
