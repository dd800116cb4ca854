"""Write files so that an interrupted write never leaves a half-written file behind.

Everything lsc writes for a user (.lsc files, dense checkpoints, plots) goes to a
temporary file in the destination's directory, is flushed to disk, and then
replaces the destination in one rename: the old file stays intact until then.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import stat

__all__ = ["atomic_path", "atomic_write_bytes"]


def check_writable(path) -> str:
    """``path`` as a string, after checking that a file can be written there (its directory exists and takes
    new files, and it is no directory): callers that work long before they write check first, so a typo or
    a read-only folder costs no work. Errors name ``path``, never a temporary file."""
    path = os.fspath(path)
    target = _target(path)
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):  # name what is missing, not the temporary file
        raise FileNotFoundError(f"cannot write {path}: the directory {folder} does not exist")
    if os.path.isdir(target):
        raise IsADirectoryError(f"cannot write {path}: it is a directory; give a file name")
    if _is_special(target):
        if not os.access(target, os.W_OK):
            raise PermissionError(f"cannot write {path}: permission denied")
        return path
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_create_temporary(target, path))  # the one sure test: root passes os.access on read-only mounts
    return path


def _target(path: str) -> str:
    """The file a write to ``path`` lands in, resolved as the kernel resolves it: through a symbolic link (replacing
    the link itself would cut it) and through linked folders before any ``..`` (``link/../x`` is beside the
    link's target, not beside the link). A FIFO or device is its own path (``/dev/stdout`` links to a pipe
    that has no name to resolve to)."""
    if _is_special(path):
        return path
    if os.path.islink(path):
        return os.path.realpath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path) or "."), os.path.basename(path))


def _is_special(path: str) -> bool:
    """An existing file that is not a regular one (a FIFO, a device such as /dev/null), found through any links:
    written in place, since renaming a temporary file over it would replace the node with a regular file."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed.

    The temporary name keeps ``path``'s suffix, so writers that pick a format by suffix still work.
    A symbolic link is followed (its target is replaced, the link stays); a FIFO or device is written
    directly (nothing to replace atomically there).
    """
    path = check_writable(path)
    target = _target(path)
    if _is_special(target):
        yield target
        return
    tmp = _create_temporary(target, path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):  # replacing a file keeps its permissions
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _create_temporary(path: str, shown: str | None = None) -> str:
    """Create an empty temporary file beside ``path`` and return its name (errors name ``shown``).

    Created with mode 0o666 less the umask, as ``open()`` would create ``path`` itself (``mkstemp``'s
    0o600 would make a model saved in a shared folder unreadable to others); the name is kept well
    under the 255-byte file name limit whatever the length of ``path``'s own name.
    """
    stem, suffix = os.path.splitext(os.path.basename(path))
    folder = os.path.dirname(os.path.abspath(path))
    suffix = suffix if len(suffix) <= 32 else ""
    for _ in range(100):
        tmp = os.path.join(folder, f".{stem[:64]}.{secrets.token_hex(6)}.tmp{suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as e:  # a read-only folder or file system: say which output could not be written
            raise type(e)(e.errno, f"cannot write {shown or path}: {e.strerror}") from None
    raise FileExistsError(f"cannot create a temporary file beside {shown or path}")


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
