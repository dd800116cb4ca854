"""The single definition of a decoded weight: integer coefficients -> tensor.

The eval-mode forward of a spectral model, the file decoder and the lazy loader
all call :func:`reconstruct`, which is why they agree bit for bit on a device.
"""
from __future__ import annotations

import torch

from .blocking import BlockLayout, from_blocks
from .quantizer import dequantize, step_size
from .transforms import block_inverse_transform

__all__ = ["synthesize", "reconstruct", "compute_dtype_for"]


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Transforms run in float32 (float64 for float64 models): fp16/bf16 DCTs lose too much."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def synthesize(coeffs: torch.Tensor, layout: BlockLayout, mean: torch.Tensor, std: torch.Tensor,
               dtype: torch.dtype, transform: str = "dct") -> torch.Tensor:
    """Transform coefficients (grid..., block...) -> weight of ``layout.shape`` in ``dtype``."""
    x = from_blocks(block_inverse_transform(coeffs, layout.block_shape, transform), layout)
    return (x * std + mean).to(dtype)


def reconstruct(q: torch.Tensor, exponent: torch.Tensor, layout: BlockLayout, mean: torch.Tensor,
                std: torch.Tensor, dtype: torch.dtype, transform: str = "dct") -> torch.Tensor:
    """Integer coefficients (any shape with ``layout.coeff_shape`` elements) and per-position exponents -> weight."""
    step = step_size(exponent).to(mean.dtype).reshape(layout.block_shape)
    coeffs = dequantize(q.reshape(layout.coeff_shape), step)
    return synthesize(coeffs, layout, mean, std, dtype, transform)
