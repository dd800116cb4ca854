"""Exceptions raised by lsc, so callers can catch our errors apart from PyTorch's."""


class LscError(ValueError):
    """Bad input to lsc: an unsupported tensor, a model in the wrong state, a bad option."""


class LscFormatError(LscError):
    """A .lsc file (or compressed state dict) is truncated, corrupt, or of an unknown version."""
