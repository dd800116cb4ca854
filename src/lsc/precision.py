"""lsc's own arithmetic runs at full precision, also inside ``torch.autocast``.

Mixed-precision training casts matrix products to fp16/bf16. That is right for the
model's layers, but not for what lsc computes around them: coefficients quantized at
steps of 2^-10 and below, the inverse DCT that must give the decoded weight bit for bit,
q_net's bit allocation and the rate estimate. Those run with autocast switched off; the
weights they return are then cast by autocast where the model's layers use them, as any
parameter would be. Backward methods of lsc's autograd functions are wrapped too,
because a backward called inside an autocast region runs in it.
"""
from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["full_precision"]


def _autocast_device_types() -> tuple[str, ...]:
    """The device types this torch build can autocast (``torch.is_autocast_enabled`` accepts them)."""
    kinds = []
    for kind in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia"):
        try:
            torch.is_autocast_enabled(kind)
        except (RuntimeError, ValueError):
            continue
        kinds.append(kind)
    return tuple(kinds)


_DEVICE_TYPES = _autocast_device_types()
# one call instead of one per device type on the hot path (weight accesses, backward passes); private, so optional
_any_enabled = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: any(torch.is_autocast_enabled(kind) for kind in _DEVICE_TYPES))


def full_precision(fn):
    """Decorator: run ``fn`` with every active autocast region switched off (no cost when none is)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _any_enabled():
            return fn(*args, **kwargs)
        active = [kind for kind in _DEVICE_TYPES if torch.is_autocast_enabled(kind)]
        with contextlib.ExitStack() as stack:
            for kind in active:
                stack.enter_context(torch.autocast(kind, enabled=False))
            return fn(*args, **kwargs)
    return wrapper
