"""Step sizes and rounding: the one definition of the integer coefficients.

Bits are kept on a grid of 1/EXPONENT_RESOLUTION so that the per-frequency step
2^-bits is an integer "exponent" that the file stores exactly. The eval-mode
forward, the encoder, the decoder and the lazy loader all go through
:func:`integer_coefficients` and :func:`dequantize`, so they agree to the bit.
"""
from __future__ import annotations

import torch

__all__ = [
    "EXPONENT_RESOLUTION", "MIN_BITS", "MAX_BITS", "bits_to_exponent", "step_size",
    "fake_quantize", "integer_coefficients", "dequantize",
]

EXPONENT_RESOLUTION = 4  # quarter-bit steps: fine enough for rate control, cheap to store
MIN_BITS = -12.0         # step 4096 in the standardized domain: every coefficient rounds to 0
MAX_BITS = 24.0          # keeps |integer coefficient| well inside int32


def bits_to_exponent(bits: torch.Tensor) -> torch.Tensor:
    """Snap bits to the exponent grid (float tensor holding integers); straight-through gradient."""
    b = bits.clamp(MIN_BITS, MAX_BITS) * EXPONENT_RESOLUTION
    return b + (torch.round(b) - b).detach()


def step_size(exponent: torch.Tensor) -> torch.Tensor:
    """Quantization step 2^(-exponent / EXPONENT_RESOLUTION), float32 (float64 for float64 models)."""
    e = exponent if exponent.is_floating_point() else exponent.to(torch.float32)
    return torch.exp2(-e / EXPONENT_RESOLUTION)


def fake_quantize(coeffs: torch.Tensor, step: torch.Tensor, leak: float = 0.0) -> torch.Tensor:
    """Training-time quantization: ``round(x) + leak * (x - round(x))`` for ``x = coeffs / step``, times ``step``.

    The seed's ``leaky_floor`` passed only ``leak`` (0.01) of the gradient, which starves
    the coefficients. Here the gradient reaches ``coeffs`` unchanged (straight-through), and
    because the rounding residual ``r`` stays attached to ``step`` (``coeffs + r * step``),
    the task loss also tells the bit allocation when a step is too coarse (the gradient of
    learned step size quantization). ``r`` is computed without autograd, so the backward
    needs no full-size division or negation (that made the rate path the dominant training
    cost on MiniLM).
    """
    with torch.no_grad():
        x = coeffs / step
        r = torch.round(x).sub_(x)
        if leak:
            r.mul_(1.0 - leak)
    return coeffs + r * step


def integer_coefficients(coeffs: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The stored symbols: round(coeffs / step) as int64."""
    return torch.round(coeffs / step).to(torch.int64)


def dequantize(q: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Integer coefficients back to (quantized) transform coefficients in step's dtype."""
    return q.to(step.dtype) * step
