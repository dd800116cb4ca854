"""The single definition of a decoded weight: integer coefficients -> tensor.

The eval-mode forward of a spectral model, the file decoder and the lazy loader
all call :func:`reconstruct`, which is why they agree bit for bit on a device.
"""
from __future__ import annotations

import torch

from .blocking import BlockLayout, from_blocks
from .quantizer import step_size
from .transforms import apply_position_major, block_inverse_transform, synthesis_matrices

__all__ = ["synthesize", "reconstruct", "compute_dtype_for"]


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Transforms run in float32 (float64 for float64 models): fp16/bf16 DCTs lose too much."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def synthesize(coeffs: torch.Tensor, layout: BlockLayout, mean: torch.Tensor, std: torch.Tensor,
               dtype: torch.dtype, transform: str = "dct") -> torch.Tensor:
    """Transform coefficients (grid..., block...) -> weight of ``layout.shape`` in ``dtype``."""
    x = from_blocks(block_inverse_transform(coeffs, layout.block_shape, transform), layout)
    return (x * std + mean).to(dtype)


# Rows of blocks rebuilt per pass on the CPU: ~2^18 values keep the two working buffers in the
# cache, so a big tensor costs one read of its integers and one write of its weight instead of
# four full passes through memory (MiniLM's 11.7M-value embedding: 105 -> 52 ms).
_CPU_CHUNK = 1 << 18


def _integers_into(out: torch.Tensor, src: torch.Tensor, step: torch.Tensor | None) -> torch.Tensor:
    """``out`` <- the integers ``src`` holds (``step`` None), or ``round(src / step)`` (float coefficients)."""
    if step is None:
        return out.copy_(src)
    return torch.div(src, step, out=out).round_()


def reconstruct(q: torch.Tensor, exponent: torch.Tensor, layout: BlockLayout, mean: torch.Tensor,
                std: torch.Tensor, dtype: torch.dtype, transform: str = "dct", *, rounding: bool = False) -> torch.Tensor:
    """Integer coefficients (``layout.coeff_shape`` elements as (num_blocks, P), any strides) and
    per-position exponents -> weight.

    ``rounding``: ``q`` holds the float coefficients instead, and each chunk is rounded to the
    integers ``round(q / step)`` on its way in: the integers the file stores (as floats, which
    hold them exactly), hence the same weight, without a full-size integer tensor first.

    For the DCT the blocks are rebuilt position-major: the (P, num_blocks) matrix of the
    scaled integers goes through one small (b, b) matrix product per block dimension, each
    with every block as a column (8 multiply-adds per value for 8x8 blocks where one
    Kronecker (P, P) product costs 64), and is written into the weight's layout with the mean
    added on the way. The file decoder hands its integers in exactly that position-major
    order (a transposed view here), so nothing is transposed in memory. Every caller (eval
    forward, file decoder, lazy loader) runs these same operations in the same order, hence
    the same bits; on the CPU big tensors go through in chunks of block rows that fit the cache.
    """
    nb, P = layout.num_blocks, layout.block_numel
    cdt = mean.dtype
    step = step_size(exponent).to(cdt).reshape(P)
    mats = synthesis_matrices(layout.block_shape, transform, cdt, q.device)
    if mats is None or not layout.shape:
        qf = _integers_into(torch.empty((nb, P), dtype=cdt, device=q.device), q.reshape(nb, P), step if rounding else None)
        return _row_major(synthesize(qf.mul_(step).reshape(layout.coeff_shape), layout, mean, std, dtype, transform))
    grid, bs = layout.grid, layout.block_shape
    k = len(bs)
    q_pos = q.reshape(nb, P).T                       # (P, num_blocks) view, block columns in grid order
    scale = (step * std).unsqueeze(1)
    step_col = step.unsqueeze(1) if rounding else None
    full = torch.empty([n * b for n, b in zip(grid, bs)], dtype=cdt, device=q.device)
    per_row = nb // grid[0] if grid[0] else 1      # blocks per leading grid row
    rows = grid[0] if q.device.type != "cpu" else max(1, _CPU_CHUNK // max(1, P * per_row))
    width = min(rows, max(grid[0], 1)) * per_row
    bufs = [torch.empty(P * width, dtype=cdt, device=q.device) for _ in range(2)]
    perm = [v for i in range(k) for v in (k + i, i)]  # (b..., g...) -> (g_1, b_1, ..., g_k, b_k)
    for r0 in range(0, grid[0], rows):
        r1 = min(grid[0], r0 + rows)
        n = (r1 - r0) * per_row
        x = _integers_into(bufs[0][: P * n].view(P, n), q_pos[:, r0 * per_row: r1 * per_row], step_col)
        x.mul_(scale)
        src = apply_position_major(bufs[0], bufs[1], mats, bs, n)
        g = (r1 - r0,) + grid[1:]
        rows_out = full[r0 * bs[0]: r1 * bs[0]].view([v for gb in zip(g, bs) for v in gb])
        torch.add(src[: P * n].view(*bs, *g).permute(perm), mean, out=rows_out)
    w = full if tuple(full.shape) == layout.shape else full[tuple(slice(0, s) for s in layout.shape)]
    return _row_major(w.to(dtype))


def _row_major(w: torch.Tensor) -> torch.Tensor:
    """``w`` with exactly the strides of a new tensor of its shape. ``is_contiguous`` ignores the strides
    of size-1 dims, but some CPU kernels do not (a 1x1 convolution's results moved by an ulp), and the
    weight must compute what the file's plain tensor computes."""
    want, acc = [], 1
    for n in reversed(w.shape):
        want.append(acc)
        acc *= n
    return w if w.stride() == tuple(reversed(want)) else w.clone(memory_format=torch.contiguous_format)
