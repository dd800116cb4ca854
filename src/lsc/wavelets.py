"""Wavelet block transforms (JPEG 2000 style), selectable next to the DCT.

``transform="wavelet"`` is the CDF 9/7 biorthogonal wavelet (the JPEG 2000
irreversible filter), ``transform="wavelet53"`` the LeGall 5/3 (the JPEG 2000
reversible filter). Both are computed by lifting with whole-sample symmetric
extension, so they are defined for every length, odd ones included, and are
invertible by construction (each lifting step only adds a function of the other
polyphase half). The transform is multi-level (Mallat): the low band is split
again until it holds one sample, and coefficients are ordered coarse to fine
(``[LL, H_L, ..., H_2, H_1]``), i.e. low "frequency" first as in the DCT, which is
what the quantization network's position features assume.

Like the DCT in :mod:`lsc.transforms`, a block transform is applied as one small
matrix product per in-block dimension. The matrices are built once per length in
float64 by running the lifting scheme on the identity, and the synthesis matrix is
built by running the *inverse* lifting scheme, so the two are exact inverses up to
float rounding (no matrix inversion involved). Each analysis row is then scaled so
that the matching synthesis basis vector has unit norm: a quantization error of
size ``e`` on any coefficient costs the same weight-domain error as it would with
the orthonormal DCT, which keeps the learned bit allocation meaningful.
"""
from __future__ import annotations


import torch

from .budget_cache import BudgetCache
from .transforms import _apply_along, register_transform

__all__ = ["WAVELETS", "lifting_forward", "lifting_inverse", "wavelet_matrices",
           "wavelet_forward", "wavelet_inverse", "wavelet53_forward", "wavelet53_inverse"]

# Lifting steps (predict, update, predict, update, ...) and the final band scaling (low, high).
_K97 = 1.230174104914001
WAVELETS: dict[str, tuple[tuple[float, ...], tuple[float, float]]] = {
    # JPEG 2000 irreversible CDF 9/7 (ITU-T T.800, Annex F)
    "cdf97": ((-1.586134342059924, -0.052980118572961, 0.882911075530934, 0.443506852043971),
              (1.0 / _K97, _K97 / 2.0)),
    # JPEG 2000 reversible LeGall 5/3 (without the integer rounding)
    "legall53": ((-0.5, 0.25), (1.0, 0.5)),
}


def _split(x: torch.Tensor):
    return x[..., 0::2], x[..., 1::2]


def _merge(s: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    n = s.shape[-1] + d.shape[-1]
    out = s.new_empty(s.shape[:-1] + (n,))
    out[..., 0::2] = s
    out[..., 1::2] = d
    return out


def _predict_term(s: torch.Tensor, nd: int) -> torch.Tensor:
    """s[i] + s[i+1] for i < nd, mirroring s[ns] -> s[ns-1] (whole-sample symmetric extension)."""
    right = torch.cat([s[..., 1:], s[..., -1:]], -1) if s.shape[-1] == nd else s[..., 1:]
    return s[..., :nd] + right[..., :nd]


def _update_term(d: torch.Tensor, ns: int) -> torch.Tensor:
    """d[i-1] + d[i] for i < ns, mirroring d[-1] -> d[0] and d[nd] -> d[nd-1]."""
    left = torch.cat([d[..., :1], d], -1)[..., :ns]
    right = torch.cat([d, d[..., -1:]], -1)[..., :ns]
    return left + right


def _lift_one(x: torch.Tensor, steps, scale) -> torch.Tensor:
    n = x.shape[-1]
    if n < 2:
        return x
    s, d = _split(x)
    ns, nd = s.shape[-1], d.shape[-1]
    for j, c in enumerate(steps):
        if j % 2 == 0:
            d = d + c * _predict_term(s, nd)
        else:
            s = s + c * _update_term(d, ns)
    return torch.cat([s * scale[0], d * scale[1]], -1)


def _unlift_one(y: torch.Tensor, steps, scale) -> torch.Tensor:
    n = y.shape[-1]
    if n < 2:
        return y
    ns = (n + 1) // 2
    nd = n - ns
    s, d = y[..., :ns] / scale[0], y[..., ns:] / scale[1]
    for j in reversed(range(len(steps))):
        c = steps[j]
        if j % 2 == 0:
            d = d - c * _predict_term(s, nd)
        else:
            s = s - c * _update_term(d, ns)
    return _merge(s, d)


def _level_lengths(n: int, levels: int | None) -> list[int]:
    """Lengths of the signal split at each level: n, ceil(n/2), ... down to 2 (or ``levels`` of them)."""
    out = []
    while n >= 2 and (levels is None or len(out) < levels):
        out.append(n)
        n = (n + 1) // 2
    return out


def lifting_forward(x: torch.Tensor, wavelet: str = "cdf97", levels: int | None = None) -> torch.Tensor:
    """Multi-level 1-D lifting DWT along the last dim; output ``[LL, H_L, ..., H_1]`` (unnormalized)."""
    steps, scale = WAVELETS[wavelet]
    y = x
    for m in _level_lengths(x.shape[-1], levels):
        y = torch.cat([_lift_one(y[..., :m], steps, scale), y[..., m:]], -1)
    return y


def lifting_inverse(y: torch.Tensor, wavelet: str = "cdf97", levels: int | None = None) -> torch.Tensor:
    """Exact inverse of :func:`lifting_forward`."""
    steps, scale = WAVELETS[wavelet]
    x = y
    for m in reversed(_level_lengths(y.shape[-1], levels)):
        x = torch.cat([_unlift_one(x[..., :m], steps, scale), x[..., m:]], -1)
    return x


def _matrices_cpu64(n: int, wavelet: str, levels: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _MATRICES.get_or_build((n, wavelet, levels), lambda: _matrices_build(n, wavelet, levels), lambda _: 2 * 8 * n * n)


_MATRICES = BudgetCache(128 << 20)


def _matrices_build(n: int, wavelet: str, levels: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    eye = torch.eye(n, dtype=torch.float64)
    analysis = lifting_forward(eye, wavelet, levels).T           # coefficients = A @ x
    synthesis = lifting_inverse(eye, wavelet, levels).T          # x = S @ coefficients
    norms = synthesis.norm(dim=0)                                # unit-norm synthesis basis vectors
    return (analysis * norms[:, None]).contiguous(), (synthesis / norms[None, :]).contiguous()


def wavelet_matrices(n: int, wavelet: str = "cdf97", dtype=torch.float32, device=None, levels: int | None = None):
    """(analysis A, synthesis S) for length ``n``: coefficients = A @ x, x = S @ coefficients, S @ A = I."""
    if n < 1:
        raise ValueError(f"wavelet length must be >= 1, got {n}")
    a, s = _matrices_cpu64(int(n), wavelet, levels)
    return a.to(dtype=dtype, device=device), s.to(dtype=dtype, device=device)


def _make(wavelet: str):
    def forward(blocks: torch.Tensor, block_shape: tuple[int, ...]) -> torch.Tensor:
        k = len(block_shape)
        mats = [None if b == 1 else wavelet_matrices(b, wavelet, blocks.dtype, blocks.device)[0] for b in block_shape]
        return _apply_along(blocks, mats, blocks.dim() - k)

    def inverse(coeffs: torch.Tensor, block_shape: tuple[int, ...]) -> torch.Tensor:
        k = len(block_shape)
        mats = [None if b == 1 else wavelet_matrices(b, wavelet, coeffs.dtype, coeffs.device)[1] for b in block_shape]
        return _apply_along(coeffs, mats, coeffs.dim() - k)

    forward.__name__, inverse.__name__ = f"{wavelet}_forward", f"{wavelet}_inverse"
    return forward, inverse


wavelet_forward, wavelet_inverse = _make("cdf97")
wavelet53_forward, wavelet53_inverse = _make("legall53")

register_transform("wavelet", wavelet_forward, wavelet_inverse)
register_transform("cdf97", wavelet_forward, wavelet_inverse)
register_transform("wavelet53", wavelet53_forward, wavelet53_inverse)
register_transform("legall53", wavelet53_forward, wavelet53_inverse)
