"""Argument checks shared by lsc's entry points: what counts as an integer or a number.

Options arrive as Python, NumPy or 0-D tensor scalars; these helpers accept all of
them and nothing else (not bools, not strings), so each entry point can name the
option it refuses.
"""
from __future__ import annotations

import math
import operator

__all__ = ["is_integer", "as_number"]


def is_integer(value) -> bool:
    """An integer of any kind (Python, NumPy, 0-D integer tensor), and not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def as_number(value) -> float:
    """``float(value)`` for a real number of any kind; NaN for anything else (bools and strings included)."""
    if isinstance(value, (bool, str, bytes)):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
