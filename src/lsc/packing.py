"""Fixed-width bit packing of integer coefficients per frequency band (lazy loading, mode "packed").

The integer coefficients of one tensor, laid out (num_blocks, P) as
:func:`lsc.reconstruct.reconstruct` takes them, are stored column by column
(one column = one in-block frequency position): each column is offset by its
minimum and stored with the bit width of its range. Columns of equal width are
packed together, row-major, 8 values into ``w`` bytes (little-endian bit order).

Unpacking is a handful of vectorized integer ops (byte gathers, shifts, masks)
on any torch device, and can produce any range of rows, so a large tensor is
unpacked and reconstructed chunk by chunk without ever holding all its integers.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["PackedCoefficients", "int_dtype_for"]

_MAX_PACKED_WIDTH = 56  # wider columns (absurd in practice) are kept as raw int64


def int_dtype_for(lo: int, hi: int) -> torch.dtype:
    """Smallest signed torch integer dtype holding [lo, hi]."""
    for dt, bits in ((torch.int8, 8), (torch.int16, 16), (torch.int32, 32)):
        if -(1 << (bits - 1)) <= lo and hi < (1 << (bits - 1)):
            return dt
    return torch.int64


def _bit_width(r: np.ndarray) -> np.ndarray:
    """Bits needed for unsigned values 0..r (0 for r == 0)."""
    w = np.zeros(r.shape, dtype=np.int64)
    x = r.astype(np.uint64)
    while np.any(x):
        nz = x > 0
        w += nz
        x = x >> np.uint64(1)
    return w


def _planes(w: int) -> list[tuple[int, int]]:
    """(bit offset, plane width) of a w-bit value cut into planes of 8, 4, 2 and 1 bits (no waste)."""
    out, off = [], 0
    for p in (8, 4, 2, 1):
        while w - off >= p:
            out.append((off, p))
            off += p
    return out


def _pack_plane(vals: np.ndarray, p: int) -> np.ndarray:
    """Values < 2**p (p in 1, 2, 4, 8), length a multiple of 8 -> bytes, 8/p values per byte (lowest first)."""
    per = 8 // p
    v = vals.astype(np.uint8).reshape(-1, per)
    out = np.zeros(v.shape[0], dtype=np.uint8)
    for j in range(per):
        out |= v[:, j] << np.uint8(j * p)
    return out


_SHIFTS: dict = {}


def _unpack_plane(data: torch.Tensor, p: int, v0: int, v1: int) -> torch.Tensor:
    """Values v0..v1-1 of a plane, uint8, on data's device."""
    if p == 8:
        return data[v0:v1]
    per = 8 // p
    b0, b1 = v0 // per, -(-v1 // per)
    key = (p, data.device)
    sh = _SHIFTS.get(key)
    if sh is None:
        sh = _SHIFTS[key] = torch.arange(0, 8, p, dtype=torch.uint8, device=data.device)
    vals = ((data[b0:b1].unsqueeze(-1) >> sh) & ((1 << p) - 1)).reshape(-1)
    return vals[v0 - b0 * per: v1 - b0 * per]


_PACK_CHUNK = 1 << 20  # values per packing pass: the uint64 temporaries stay small for any tensor


def _packed_planes(q: np.ndarray, cols: np.ndarray, lo: np.ndarray, planes: list) -> list[np.ndarray]:
    """The bytes of each bit plane of columns ``cols`` of ``q`` offset by ``lo`` (row-major values, zero-padded
    to a multiple of 8), packed a few block rows at a time so loading never holds uint64 copies of the tensor."""
    nb, k = q.shape[0], cols.size
    rows = max(8, (_PACK_CHUNK // max(k, 1)) // 8 * 8)  # a multiple of 8 rows: whole bytes in every plane
    out = [[] for _ in planes]
    for r0 in range(0, nb, rows):
        v = (q[r0:r0 + rows, cols].astype(np.int64) - lo).reshape(-1).astype(np.uint64)
        if v.size % 8:
            v = np.concatenate([v, np.zeros(8 - v.size % 8, dtype=np.uint64)])
        for j, (off, pw) in enumerate(planes):
            out[j].append(_pack_plane((v >> np.uint64(off)) & np.uint64((1 << pw) - 1), pw))
    return [np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8) for parts in out]


class PackedCoefficients(nn.Module):
    """Integer coefficients (num_blocks, P) packed per column; ``rows(r0, r1)`` unpacks a row range.

    Each column (frequency position) is offset by its minimum and needs ``w`` bits;
    columns of equal width are stored together, row-major, cut into bit planes of
    8, 4, 2 and 1 bits (10 bits = one byte plane + one 2-bit plane), so unpacking
    is a broadcast shift and mask per plane and nothing is wasted. All data are
    non-persistent buffers: ``model.to(device)`` moves them and unpacking runs there.

    ``rows`` returns integer-valued floats in ``float_dtype`` when every coefficient is
    exactly representable (what :func:`lsc.quantizer.dequantize` converts them to
    anyway, so the result is identical and one pass cheaper), else int64.
    """

    def __init__(self, q: np.ndarray, float_dtype: torch.dtype = torch.float32):
        super().__init__()
        q = np.asarray(q)
        if not np.issubdtype(q.dtype, np.integer):
            q = q.astype(np.int64)
        nb, P = q.shape
        self.num_rows, self.num_cols = int(nb), int(P)
        lo = q.min(0).astype(np.int64) if nb else np.zeros(P, dtype=np.int64)
        hi = q.max(0).astype(np.int64) if nb else np.zeros(P, dtype=np.int64)
        exact = 1 << {torch.float64: 53}.get(float_dtype, 24)
        # exact in floats: the coefficients, and what the planes sum to before lo is added (hi - lo, up to 2 amax)
        amax = int(max(np.abs(lo).max(), np.abs(hi).max(), (hi - lo).max())) if P else 0
        self.dtype = float_dtype if amax <= exact else torch.int64
        width = _bit_width((hi - lo).astype(np.uint64))
        self.register_buffer("lo", torch.from_numpy(lo.copy()).to(self.dtype), persistent=False)
        self.groups: list[tuple[int, list]] = []  # (width, [(offset, plane width)])
        for w in sorted(set(width.tolist())):
            cols = np.flatnonzero(width == w)
            i = len(self.groups)
            planes = _planes(int(w)) if w <= _MAX_PACKED_WIDTH else []
            self.groups.append((int(w), planes))
            self.register_buffer(f"cols{i}", torch.from_numpy(cols.astype(np.int64)), persistent=False)
            if w > _MAX_PACKED_WIDTH:
                self.register_buffer(f"raw{i}", torch.from_numpy(q[:, cols].astype(np.int64)), persistent=False)
                continue
            for j, plane in enumerate(_packed_planes(q, cols, lo[cols], planes)):
                self.register_buffer(f"data{i}_{j}", torch.from_numpy(plane), persistent=False)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """Integer coefficients of rows r0..r1-1, (r1 - r0, P), on the buffers' device (see class doc)."""
        n = r1 - r0
        out = None if len(self.groups) == 1 else torch.empty((n, self.num_cols), dtype=self.dtype, device=self.lo.device)
        for i, (w, planes) in enumerate(self.groups):
            cols = getattr(self, f"cols{i}")
            k = cols.numel()
            lo = self.lo if out is None else self.lo[cols]
            if w > _MAX_PACKED_WIDTH:
                vals = getattr(self, f"raw{i}")[r0:r1]
            elif w == 0:
                vals = lo.expand(n, k)
            else:
                vals = None
                for j, (off, pw) in enumerate(planes):
                    v = _unpack_plane(getattr(self, f"data{i}_{j}"), pw, r0 * k, r1 * k).to(self.dtype)
                    vals = v if vals is None else vals.add_(v, alpha=1 << off)
                vals = vals.reshape(n, k).add_(lo)
            if out is None:
                return vals.contiguous() if w else vals.clone()
            out.index_copy_(1, cols, vals)
        return out
