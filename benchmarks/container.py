"""Byte-exact container for baseline codecs: named numpy arrays + JSON meta,
compressed with zstd level 19.

Baselines must report real file sizes and real decode times, so every codec
writes through this format instead of estimating bits.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import zstandard

ZSTD_LEVEL = 19


def pack(arrays: dict[str, np.ndarray], meta) -> bytes:
    """Serialise arrays (raw little-endian) and meta, then zstd-19 the lot."""
    index, chunks, off = [], [], 0
    for name, arr in arrays.items():
        buf = np.ascontiguousarray(arr).tobytes()
        index.append([name, arr.dtype.str, list(arr.shape), off, len(buf)])
        chunks.append(buf)
        off += len(buf)
    header = json.dumps({"index": index, "meta": meta},
                        separators=(",", ":")).encode()
    raw = struct.pack("<I", len(header)) + header + b"".join(chunks)
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)


def unpack(blob: bytes):
    """Inverse of pack: returns (arrays, meta); arrays are read-only views."""
    raw = zstandard.ZstdDecompressor().decompress(blob)
    (hlen,) = struct.unpack_from("<I", raw)
    header = json.loads(raw[4:4 + hlen])
    base = 4 + hlen
    arrays = {}
    for name, dtype, shape, off, n in header["index"]:
        arrays[name] = np.frombuffer(raw, dtype=np.dtype(dtype), count=n // np.dtype(dtype).itemsize,
                                     offset=base + off).reshape(shape)
    return arrays, header["meta"]
