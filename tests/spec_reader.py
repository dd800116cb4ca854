"""An independent reader of `.lsc` files, written from docs/FORMAT.md alone.

It deliberately imports nothing from ``lsc``: if it decodes every file lsc writes to the
integers lsc stored, the specification is complete (tests/test_format_spec.py checks that).
Section numbers (§) refer to docs/FORMAT.md. Speed is not a goal; plain loops are fine.
"""
from __future__ import annotations

import json
import math
import re
import struct
import zlib

import constriction
import numpy as np

MAGIC = b"\x89LSC\r\n\x1a\n"
# §2 dtypes -> numpy dtype of the stored bytes; types numpy lacks are kept as their bit patterns
NP_DTYPES = {"float16": "<f2", "bfloat16": "<u2", "float32": "<f4", "float64": "<f8", "int8": "i1",
             "int16": "<i2", "int32": "<i4", "int64": "<i8", "uint8": "u1", "uint16": "<u2", "uint32": "<u4",
             "uint64": "<u8", "bool": "?", "complex64": "<c8", "complex128": "<c16", "float8_e4m3fn": "u1",
             "float8_e5m2": "u1"}


class SpecFormatError(ValueError):
    """Any violation of the specification (§1 asks for one error type for all)."""


def _check(cond, msg):
    if not cond:
        raise SpecFormatError(msg)


def _inflate_exact(data: bytes, size: int, what: str) -> bytes:
    """§1 / §2.1: zlib data must inflate to exactly ``size`` bytes (never inflate more)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, size + 1)
    except zlib.error as exc:
        raise SpecFormatError(f"{what}: bad zlib data ({exc})") from None
    _check(len(out) == size and d.eof and not d.unused_data and not d.unconsumed_tail, f"{what}: wrong inflated size")
    return out


# ------------------------------------------------------------------ §1 layout, §2 header

def read(data: bytes) -> dict:
    """§1 layout and §2 header: file bytes -> {name: decoded entry}; tied names share their entry.

    The file size is checked before any stream is read, each stream's crc before it is decoded (§1)."""
    _check(len(data) >= 24 and data[:8] == MAGIC, "wrong magic or truncated prefix")
    version, hlen, hraw, hcrc = struct.unpack_from("<IIII", data, 8)
    _check(version <= 3, f"version {version} is newer than this reader's 3: upgrade")   # §1, §4
    _check(version >= 1, "version 0 is invalid")
    _check(24 + hlen <= len(data), "truncated header")
    _check(hraw <= 256 << 20, "header too large")
    comp = data[24:24 + hlen]
    _check(zlib.crc32(comp) == hcrc, "header crc mismatch")
    try:
        header = json.loads(_inflate_exact(comp, hraw, "header").decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SpecFormatError(f"header is not JSON: {exc}") from None
    _check(isinstance(header, dict) and header.get("format") == "lsc", "not an lsc header")
    metas = header["tensors"]
    total = 24 + hlen + sum(m["len"] for m in metas)
    _check(len(data) >= total, "truncated streams")
    _check(len(data) == total, "trailing bytes after the last stream")
    out, off = {}, 24 + hlen
    for m in metas:
        stream = data[off:off + m["len"]]
        off += m["len"]
        _check(zlib.crc32(stream) == m["crc"], f"{m['name']}: stream crc mismatch")
        if m["kind"] == "raw":
            out[m["name"]] = decode_raw(m, stream)
        elif m["kind"] == "spectral":
            out[m["name"]] = decode_spectral(m, stream)
        elif m["kind"] == "buffers":
            out.update(decode_buffers(stream))
            continue
        else:
            raise SpecFormatError(f"unknown kind {m['kind']!r}")
        for t in m.get("tied", []):
            out[t] = out[m["name"]]
    return out


def decode_raw(m: dict, stream: bytes) -> dict:
    """§2.1: row-major little-endian element bytes, optionally zlib-compressed."""
    dt = np.dtype(NP_DTYPES[m["dtype"]])
    nbytes = math.prod(m["shape"]) * dt.itemsize
    raw = _inflate_exact(stream, nbytes, m["name"]) if m["zlib"] else stream
    _check(len(raw) == nbytes, f"{m['name']}: raw stream has the wrong size")
    return {"kind": "raw", "dtype": m["dtype"], "shape": tuple(m["shape"]), "bytes": raw,
            "array": np.frombuffer(raw, dtype=dt).reshape(m["shape"])}


def decode_buffers(blob: bytes) -> dict:
    """§2.1b: bit-packed quantized float buffers -> {name: entry with float64 `values`}."""
    _check(blob[:5] == b"LSCB1", "buffers: bad magic")
    (h,) = struct.unpack_from("<I", blob, 5)
    tol, entries = json.loads(zlib.decompress(blob[9:9 + h]))
    pos, syms = 9 + h, {}
    for name, shape, dtype, kind, extra, lo, width in entries:
        n = math.prod(shape)
        nbytes = (n * width + 7) // 8                    # each entry starts on a whole byte
        bits = np.unpackbits(np.frombuffer(blob[pos:pos + nbytes], np.uint8), bitorder="little")
        pos += nbytes
        u = bits[:n * width].reshape(n, width).astype(np.uint64) << np.arange(width, dtype=np.uint64)
        syms[name] = u.sum(axis=1).astype(np.int64) + lo
    out = {}
    # variances first: a mean's step depends on the decoded variance of its BatchNorm
    for name, shape, dtype, kind, extra, lo, width in sorted(entries, key=lambda e: e[3] == 1):
        q = syms[name].astype(np.float64)
        if kind == 0:
            v = np.maximum(np.exp2(q * (2.0 * tol / math.log(2.0))) - extra, 0.0)
        elif kind == 1:
            var = out[name.rpartition(".")[0] + ".running_var"]["values"].reshape(-1)
            v = q * (tol * np.sqrt(var + extra))
        else:
            v = q * extra
        out[name] = {"kind": "buffer", "dtype": dtype, "shape": tuple(shape), "values": v.reshape(shape)}
    return out


# ------------------------------------------------------------------ §2.2 spectral tensors

class Bits:
    """§2.2 side information: a bit string, MSB of each byte first."""

    def __init__(self, data: bytes):
        self.s = "".join(f"{b:08b}" for b in data)
        self.pos = 0

    def bit(self) -> int:
        _check(self.pos < len(self.s), "side information truncated")
        self.pos += 1
        return int(self.s[self.pos - 1])

    def gamma(self) -> int:
        """EG(v): floor(log2 v) zeros, then v in binary."""
        one = self.s.find("1", self.pos)
        _check(one >= 0, "side information truncated")
        z = one - self.pos
        _check(one + z + 1 <= len(self.s), "side information truncated")
        v = int(self.s[one:one + z + 1], 2)
        self.pos = one + z + 1
        return v

    def finish(self):
        rest = self.s[self.pos:]
        _check(len(rest) < 8 and "1" not in rest, "side information has trailing bits")


def unzz(u: int) -> int:
    """§2.2: inverse of zz(x) = 2x (x >= 0), -2x - 1 (x < 0)."""
    return u // 2 if u % 2 == 0 else -(u + 1) // 2


def scan_order(block: tuple, scan: str) -> np.ndarray:
    """§2.2 Scan: row-major position indices listed in scan order."""
    P = math.prod(block)
    if scan == "rowmajor" or not block:
        return np.arange(P)
    planes = max(1, math.ceil(math.log2(max(block))))
    coords = np.indices(block).reshape(len(block), P)
    # key digits, most significant first: bit plane (high to low), then dimension 0, 1, ...
    digits = [(coords[d] >> plane) & 1 for plane in reversed(range(planes)) for d in range(len(block))]
    return np.lexsort(digits[::-1])  # lexsort's last key is the primary one


def _ans_decode(coder, K: int, n: int, counts) -> np.ndarray:
    """§2.2 ANS stream: one group's n symbols (value - lo)."""
    model = constriction.stream.model
    if counts is not None:
        c = np.asarray(counts, dtype=np.float64)
        return coder.decode(model.Categorical(c / c.sum(), perfect=False), n).astype(np.int64)
    sizes = [K]
    while sizes[-1] > 1 << 23:
        sizes.append(-(-sizes[-1] // 4096))
    top = sizes[-1]
    s = coder.decode(model.Uniform(top), n).astype(np.int64) if top > 1 else np.zeros(n, np.int64)
    for _ in sizes[:-1]:
        s = s * 4096 + coder.decode(model.Uniform(4096), n).astype(np.int64)
    _check(s.size == 0 or s.max() < K, "uniform symbol out of range")
    return s


def geometry(m: dict) -> dict:
    """§2.2 Geometry, Groups and Row classes of a spectral header entry: grid, N, P, k, G, C.

    ``classes`` (version 3) is only valid as an int 2..16 on a tensor with n_0 >= 2 block rows,
    N * P >= 4096 coefficients and C <= n_0; absent means C = 1."""
    shape, block = tuple(m["shape"]), tuple(m["block"])
    grid = tuple(-(-s // b) for s, b in zip(shape, block))
    N, P = math.prod(grid), math.prod(block)
    k = max(1, -(-m["min_group"] // N))
    C = 1
    if "classes" in m:
        C = m["classes"]
        _check(type(C) is int and 2 <= C <= 16, f"{m['name']}: classes must be an int 2..16")
        n0 = grid[0] if grid else 0
        _check(n0 >= 2 and N * P >= 4096, f"{m['name']}: tensor too small for row classes")
        _check(C <= n0, f"{m['name']}: more classes than block rows")
    return {"grid": grid, "N": N, "P": P, "k": k, "G": -(-P // k), "C": C}


def read_side(m: dict, side: bytes) -> dict:
    """§2.2 Side information, items 1-5 -> exponents (scan order), labels (one per block row, or None),
    and per subgroup s = g * C + c (group-major, class-minor): modes, ranges (lo, K), tables (or None)."""
    geo = geometry(m)
    P, C = geo["P"], geo["C"]
    r = Bits(side)
    # 1. exponents, delta-coded along the scan
    e_scan, prev = [], 0
    for _ in range(P):
        prev += unzz(r.gamma() - 1)
        _check(abs(prev) <= 4096, "exponent out of range")
        e_scan.append(prev)
    # 2. labels, one per block row (only with classes): each < C, every class used
    labels = None
    if C > 1:
        labels = [r.gamma() - 1 for _ in range(geo["grid"][0])]
        _check(max(labels) < C, f"{m['name']}: row label out of range")
        _check(len(set(labels)) == C, f"{m['name']}: a row class is unused")
    S = geo["G"] * C
    # 3. modes, 4. ranges, 5. tables: per subgroup, in subgroup order
    modes = [r.bit() for _ in range(S)]
    ranges = [(unzz(r.gamma() - 1), r.gamma()) for _ in range(S)]
    for mode, (_, K) in zip(modes, ranges):
        _check(not mode or 2 <= K <= 65536, "categorical subgroup with K outside 2..65536")
    tables = [[r.gamma() - 1 for _ in range(K)] if mode else None for mode, (_, K) in zip(modes, ranges)]
    r.finish()
    return {"exponents": e_scan, "labels": labels, "modes": modes, "ranges": ranges, "tables": tables}


def decode_spectral(m: dict, stream: bytes) -> dict:
    """§2.2: side information + ANS segments -> q (N x P, row-major grid / positions), e (P,).

    With row classes (version 3) every group g is split into C subgroups s = g * C + c; subgroup
    (g, c) holds the group's symbols whose block lies in a block row labelled c: its positions in
    scan order, per position those blocks in block order. A segment holds whole groups."""
    geo = geometry(m)
    grid, N, P, k, G, C = (geo[key] for key in ("grid", "N", "P", "k", "G", "C"))
    shape, block = tuple(m["shape"]), tuple(m["block"])
    order = scan_order(block, m["scan"])
    _check(0 <= m["side"] <= len(stream), "side information longer than the stream")
    side, ans = stream[:m["side"]], stream[m["side"]:]
    _check(len(ans) % 4 == 0, "ANS stream is not whole words")
    info = read_side(m, side)
    modes, ranges, tables, labels = info["modes"], info["ranges"], info["tables"], info["labels"]
    # class of each block: block n is in block row floor(n / (N / n_0))
    block_label = np.zeros(N, np.int64) if labels is None else np.repeat(np.array(labels, np.int64), N // grid[0])
    members = [np.flatnonzero(block_label == c) for c in range(C)]   # blocks of class c, in block order
    words = np.frombuffer(ans, dtype="<u4").astype(np.uint32)
    segs = m.get("segments") or [[0, words.size]]
    _check(sum(w for _, w in segs) == words.size and segs[0][0] == 0, "bad segment table")
    q_scan = np.empty((P, N), dtype=np.int64)     # scan-ordered, transposed: row j = scan position j
    w0 = 0
    for i, (g0, nw) in enumerate(segs):
        g1 = segs[i + 1][0] if i + 1 < len(segs) else G
        _check(g0 < g1 <= G, "bad segment table")
        coder = constriction.stream.stack.AnsCoder(words[w0:w0 + nw])
        w0 += nw
        for g in range(g0, g1):                    # each group with all its subgroups, in subgroup order
            a, b = g * k, min(P, (g + 1) * k)
            for c, cols in enumerate(members):
                sub = g * C + c
                lo, K = ranges[sub]
                n = (b - a) * cols.size
                if K == 1:
                    s = np.zeros(n, np.int64)
                else:
                    _check(tables[sub] is None or sum(tables[sub]) == n, "table counts do not match the subgroup")
                    s = _ans_decode(coder, K, n, tables[sub])
                q_scan[a:b, cols] = (s + lo).reshape(b - a, cols.size)
        _check(coder.is_empty(), "ANS segment has unused data")
    q = np.empty((N, P), dtype=np.int64)
    q[:, order] = q_scan.T
    e = np.empty(P, dtype=np.int64)
    e[order] = info["exponents"]
    sdt = "<f8" if m["dtype"] == "float64" else "<f4"
    mean, std = (float(np.frombuffer(bytes.fromhex(m[key]), dtype=sdt)[0]) for key in ("mean", "std"))
    return {"kind": "spectral", "dtype": m["dtype"], "shape": shape, "block": block, "transform": m["transform"],
            "q": q, "e": e, "mean": mean, "std": std, "scan": m["scan"], "segments": len(segs),
            "classes": C, "labels": labels, "groups": [(mode, lo, K) for mode, (lo, K) in zip(modes, ranges)]}


# ------------------------------------------------------------------ §2.2 reconstruction

def dct_matrix(b: int) -> np.ndarray:
    """§2.2 Reconstruction: orthonormal DCT-II, D[k, i] = sqrt((2 - [k == 0]) / b) cos(pi (2i+1) k / (2b));
    the inverse along a dim is x = D^T c."""
    k, i = np.arange(b)[:, None], np.arange(b)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * b)) * np.sqrt(2.0 / b)
    d[0] /= np.sqrt(2.0)
    return d


def reconstruct(t: dict) -> np.ndarray:
    """§2.2 Reconstruction in float64: the real weight, before the final cast to its dtype.

    The step follows the spec (float32-rounded exp2, then widened); everything after it runs in
    float64, so the result differs from lsc's float32 computation by float32 rounding only.
    """
    assert t["transform"] == "dct"
    shape, block = t["shape"], t["block"]
    grid = tuple(-(-s // b) for s, b in zip(shape, block))
    step = np.exp2(-t["e"] / 4.0).astype(np.float32).astype(np.float64)
    c = (t["q"] * step).reshape(grid + block)     # (grid..., block...)
    nd = len(shape)
    for d, b in enumerate(block):                  # inverse DCT along each in-block dim
        c = np.moveaxis(np.tensordot(dct_matrix(b).T, c, axes=(1, nd + d)), 0, nd + d)
    interleave = [v for j in range(nd) for v in (j, nd + j)]
    x = c.transpose(interleave).reshape([n * b for n, b in zip(grid, block)])
    x = x[tuple(slice(0, s) for s in shape)]
    return np.asarray(x * t["std"] + t["mean"])


# ------------------------------------------------------------------ §2.3 factorized weights

FACTOR = re.compile(r"^(?:(?P<prefix>.*)\.)?parametrizations\.(?P<attr>[^.]+)\.original(?P<idx>\d+)$")


def fold_factors(values: dict, shapes: dict) -> dict:
    """§2.3: ``{name: float64 array}`` with every group of factors replaced by the weight it stands for;
    ``shapes``: the weight shapes of the model loaded into (two factors are reshaped to them)."""
    groups, out = {}, {}
    for name, v in values.items():
        m = FACTOR.match(name)
        if m is None:
            out[name] = v
            continue
        weight = f"{m['prefix']}.{m['attr']}" if m["prefix"] else m["attr"]
        groups.setdefault(weight, {})[int(m["idx"])] = v
    for weight, f in groups.items():
        if sorted(f) == [0, 1]:
            out[weight] = (f[0] @ f[1]).reshape(shapes[weight])
        else:
            a, b, core = f[0], f[1], f[2]
            w = np.tensordot(a, core, axes=(1, 0))                      # (O, r_i, k...): A first
            out[weight] = np.moveaxis(np.tensordot(b, w, axes=(1, 1)), 0, 1)  # (O, I, k...)
    return out
