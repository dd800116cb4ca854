"""The single definition of a decoded weight: integer coefficients -> tensor.

The eval-mode forward of a spectral model, the file decoder and the lazy loader
all call :func:`reconstruct`, which is why they agree bit for bit on a device.
"""
from __future__ import annotations

import torch

from .blocking import BlockLayout, from_blocks
from .quantizer import step_size
from .transforms import block_inverse_transform, inverse_matrix

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
    """Integer coefficients (``layout.coeff_shape`` elements as (num_blocks, P), any strides) and
    per-position exponents -> weight."""
    nb, P = layout.num_blocks, layout.block_numel
    cdt = mean.dtype
    step = step_size(exponent).to(cdt).reshape(P)
    m = inverse_matrix(layout.block_shape, transform, cdt, q.device)
    # The integers, whatever their strides (the file decoder hands a transposed view), become a
    # contiguous float matrix: every caller then feeds the transform the same layout and gets the
    # same bits. copy_ (a blocked transposing conversion) then an in-place contiguous scaling is
    # ~2.5x faster on MiniLM than one scaling pass reading the transposed view.
    qf = torch.empty((nb, P), dtype=cdt, device=q.device)
    qf.copy_(q.reshape(nb, P))
    if m is None:
        qf.mul_(step)
        return synthesize(qf.reshape(layout.coeff_shape), layout, mean, std, dtype, transform)
    # mean + std * ((q * step) @ M) as one scaling pass and one matrix product whose initial
    # value is the mean, instead of five full passes over the tensor
    qf.mul_(step * std)
    blocks = torch.addmm(mean, qf, m)
    del qf  # keep decoding temporaries at two tensors (lazy loading budgets its peak memory)
    w = from_blocks(blocks.reshape(layout.coeff_shape), layout).to(dtype)
    return w if w.is_contiguous() else w.contiguous()
