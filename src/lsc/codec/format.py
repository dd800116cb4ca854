"""Byte layout of a .lsc file (see docs/FORMAT.md) and its validation.

    prefix (24 bytes, little-endian):
        magic           8 bytes   b"\\x89LSC\\r\\n\\x1a\\n"
        version         u32       FORMAT_VERSION
        header_len      u32       length of the zlib-compressed header
        header_raw_len  u32       length of the header JSON after decompression
        header_crc32    u32       CRC-32 of the compressed header bytes
    header          header_len bytes: zlib(UTF-8 JSON)
    data            the tensor streams, concatenated in header order

Nothing here unpickles or evaluates anything: the header is JSON, streams are
bytes. Every length is checked against the bytes actually present before any
allocation, and decompression is capped at the declared size.
"""
from __future__ import annotations

import json
import struct
import zlib

from ..errors import LscFormatError

__all__ = ["MAGIC", "FORMAT_VERSION", "PREFIX_SIZE", "MAX_HEADER_BYTES", "pack_prefix_header", "format_version",
           "parse_prefix_header", "split_streams", "check_stream", "zlib_decompress_exact"]

MAGIC = b"\x89LSC\r\n\x1a\n"
FORMAT_VERSION = 3  # 2: optional ANS segments; 3: optional row classes (docs/FORMAT.md, section 4)
_PREFIX = struct.Struct("<8sIIII")
PREFIX_SIZE = _PREFIX.size  # 24
MAX_HEADER_BYTES = 256 << 20   # decompressed JSON header cap


def pack_prefix_header(header: dict, version: int = FORMAT_VERSION) -> bytes:
    """Prefix + compressed header for a header dict (deterministic: sorted keys, compact JSON)."""
    raw = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    if len(raw) > MAX_HEADER_BYTES:
        raise LscFormatError(f"header too large ({len(raw)} bytes)")
    comp = zlib.compress(raw, 9)
    return _PREFIX.pack(MAGIC, version, len(comp), len(raw), zlib.crc32(comp)) + comp


def zlib_decompress_exact(data, expected: int, what: str) -> bytes:
    """Decompress exactly ``expected`` bytes, never more (a zip bomb cannot inflate past the cap)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(bytes(data), expected + 1)
        tail_ok = d.eof and not d.unconsumed_tail and not d.unused_data
    except zlib.error as exc:
        raise LscFormatError(f"{what}: corrupt zlib data ({exc})") from None
    if len(out) != expected or not tail_ok:
        raise LscFormatError(f"{what}: decompressed size does not match the declared {expected} bytes")
    return out


def format_version(buf) -> int:
    """The format version in the prefix of ``buf`` (bytes-like, at least :data:`PREFIX_SIZE` bytes)."""
    return _PREFIX.unpack_from(memoryview(buf), 0)[1]


def parse_prefix_header(buf) -> tuple[dict, int]:
    """Validate the prefix and header of ``buf`` (bytes-like) -> (header dict, offset of the data section)."""
    mv = memoryview(buf)
    if len(mv) < len(MAGIC) or bytes(mv[:len(MAGIC)]) != MAGIC:
        raise LscFormatError("not an lsc file (wrong magic bytes)")
    if len(mv) < PREFIX_SIZE:
        raise LscFormatError(f"truncated file: {len(mv)} bytes, the fixed prefix alone is {PREFIX_SIZE}")
    _, version, hlen, hraw, hcrc = _PREFIX.unpack_from(mv, 0)
    if version > FORMAT_VERSION:
        raise LscFormatError(f"file format version {version} is newer than this lsc supports ({FORMAT_VERSION}); upgrade lsc")
    if version < 1:
        raise LscFormatError(f"invalid format version {version}")
    if PREFIX_SIZE + hlen > len(mv):
        raise LscFormatError(f"truncated file: header needs {hlen} bytes, only {len(mv) - PREFIX_SIZE} present")
    if hraw > MAX_HEADER_BYTES:
        raise LscFormatError(f"header declares {hraw} bytes, over the {MAX_HEADER_BYTES}-byte cap")
    comp = mv[PREFIX_SIZE:PREFIX_SIZE + hlen]
    if zlib.crc32(comp) != hcrc:
        raise LscFormatError("header checksum mismatch: the file is corrupt")
    raw = zlib_decompress_exact(comp, hraw, "header")
    try:
        header = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LscFormatError(f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise LscFormatError("header is not a JSON object")
    return header, PREFIX_SIZE + hlen


def split_streams(buf, data_offset: int, lengths: list[int]) -> list[memoryview]:
    """Slice the data section into streams; its size must equal the sum of the declared lengths."""
    mv = memoryview(buf)
    total = sum(lengths)
    have = len(mv) - data_offset
    if have < total:
        raise LscFormatError(f"truncated file: streams need {total} bytes, only {have} present")
    if have > total:
        raise LscFormatError(f"{have - total} unexpected bytes after the last stream")
    out, off = [], data_offset
    for n in lengths:
        out.append(mv[off:off + n])
        off += n
    return out


def check_stream(data, length: int, crc: int, name: str) -> None:
    if len(data) != length:
        raise LscFormatError(f"{name}: stream is {len(data)} bytes, header says {length}")
    if zlib.crc32(data) != crc:
        raise LscFormatError(f"{name}: stream checksum mismatch: the data is corrupt")
