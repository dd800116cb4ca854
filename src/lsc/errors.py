"""Exceptions raised by lsc, so callers can catch our errors apart from PyTorch's (and where its warnings point)."""
import os
import sys


class LscError(ValueError):
    """Bad input to lsc: an unsupported tensor, a model in the wrong state, a bad option."""


class LscFormatError(LscError):
    """A .lsc file (or compressed state dict) is truncated, corrupt, or of an unknown version."""


def format_errors(what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; any failure on crafted data (constriction can raise, or panic) becomes
    LscFormatError naming ``what``, so a decoder lets nothing else escape."""
    try:
        return fn(*args, **kwargs)
    except LscFormatError:
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:
        raise LscFormatError(f"{what}: cannot decode ({type(exc).__name__}: {exc})") from None


def outside_stacklevel() -> int:
    """``warnings.warn``'s stacklevel of the first caller outside lsc and torch (their decorators vary the depth)."""
    import torch
    inner = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inner):
        frame, level = frame.f_back, level + 1
    return level
