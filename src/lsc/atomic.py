"""Write files so that an interrupted write never leaves a half-written file behind.

Everything lsc writes for a user (.lsc files, dense checkpoints, plots) goes to a
temporary file in the destination's directory, is flushed to disk, and then
replaces the destination in one rename: the old file stays intact until then.
"""
from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["atomic_path", "atomic_write_bytes"]


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed.

    The temporary name keeps ``path``'s suffix, so writers that pick a format by suffix still work.
    """
    path = os.fspath(path)
    base = os.path.basename(path)
    stem, suffix = os.path.splitext(base)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):  # name what is missing, not the temporary file
        raise FileNotFoundError(f"cannot write {path}: the directory {folder} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is a directory; give a file name")
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
