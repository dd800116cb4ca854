"""Timed file round trip shared by the benchmark scripts: encode to a temporary .lsc file, reload."""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import lsc


def timed_file_round_trip(write, make_fresh, keep=None):
    """``write(path)`` encodes the file; the file is loaded into ``make_fresh()`` with ``lsc.load``.

    Returns (file bytes, decoded model, encode seconds, decode seconds); the file is removed, after
    being copied to ``keep`` when given (so a later coder can re-encode its integers without retraining).
    """
    fd, path = tempfile.mkstemp(suffix=".lsc")
    os.close(fd)
    try:
        t0 = time.perf_counter()
        write(path)
        enc_s = time.perf_counter() - t0
        size = os.path.getsize(path)
        fresh = make_fresh()
        t0 = time.perf_counter()
        dec = lsc.load(path, fresh)
        dec_s = time.perf_counter() - t0
        if keep is not None:
            os.makedirs(os.path.dirname(os.path.abspath(keep)), exist_ok=True)
            shutil.copyfile(path, keep)
    finally:
        os.unlink(path)
    return size, dec, enc_s, dec_s
