"""Low-rank + spectral: factor weights, then let ``lsc.spectral`` compress the factors.

    lsc.factorize(model, max_error=0.05)   # W = U @ V (matrices), Tucker-2 (conv kernels)
    q_net = lsc.spectral(model)            # compresses U, V (and the Tucker core) spectrally

Each factored weight gets a ``torch.nn.utils.parametrize`` parametrization whose
``right_inverse`` returns the factors, so they become the trainable tensors
``module.parametrizations.weight.original0/1(/2)``; the module keeps its class and
``module.weight`` is still the full weight, recomputed from the factors.
``lsc.spectral`` then finds the factors as ordinary float parameters and
reparameterizes them (a parametrization on a parametrization), so the file stores
the quantized factors under their own names.

Ranks are chosen per tensor by an error threshold: the smallest rank whose
relative Frobenius error ``||W - W_r|| / ||W||`` is at most ``max_error`` (exact
from the singular values for matrices; checked, and raised by binary search if
needed, for Tucker-2). A weight is left alone when the factors would not be
smaller than the weight by at least ``min_saving``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .checks import is_integer
from .convert import selected_parameters
from .errors import LscError
from .wrappers import unwrap_for_conversion

__all__ = ["LowRankMatrix", "Tucker2", "factorize", "factor_report", "fold_factored_state_dict", "fold_factors",
           "FACTOR_KEY"]

FACTOR_KEY = re.compile(r"^(?:(?P<prefix>.*)\.)?parametrizations\.(?P<attr>[^.]+)\.original(?P<idx>\d+)$")


def factor_of(key: str) -> tuple[str, int] | None:
    """(name of the full weight, factor index) of a factor's state-dict key (``X.parametrizations.W.original1``
    -> ``("X.W", 1)``), or None for any other key."""
    m = FACTOR_KEY.match(key)
    if m is None:
        return None
    return (f"{m['prefix']}.{m['attr']}" if m["prefix"] else m["attr"]), int(m["idx"])


def _rank_for_error(s: torch.Tensor, max_error: float) -> int:
    """Smallest r with sqrt(sum_{i>=r} s_i^2) <= max_error * ||s||."""
    e = s.double().pow(2)
    total = float(e.sum())
    if total == 0.0:
        return 1
    tail = torch.flip(torch.cumsum(torch.flip(e, [0]), 0), [0])  # tail[r] = sum_{i>=r} s_i^2
    tail = torch.cat([tail, tail.new_zeros(1)])
    ok = (tail <= (max_error ** 2) * total).nonzero()
    return max(1, int(ok[0]))


class LowRankMatrix(nn.Module):
    """weight = (U @ V).reshape(shape): U is (out x r), V is (r x rest), balanced by sqrt(singular values)."""

    def __init__(self, shape: tuple[int, ...], rank: int):
        super().__init__()
        self.shape = tuple(shape)
        self.rank = int(rank)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (u @ v).reshape(self.shape)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor):
        w = weight.detach().reshape(weight.shape[0], -1)
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        r = self.rank
        root = s[:r].sqrt()
        return (u[:, :r] * root).to(weight.dtype), (root[:, None] * vh[:r]).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, rank={self.rank}"


def _mode_product(core: torch.Tensor, mat: torch.Tensor, mode: int) -> torch.Tensor:
    """core x_mode mat: contracts dim ``mode`` of core with the columns of mat."""
    return torch.movedim(torch.tensordot(mat, core, dims=([1], [mode])), 0, mode)


class Tucker2(nn.Module):
    """weight = core x_0 A x_1 B for a conv kernel (O, I, k...): A is (O x r_out), B is (I x r_in)."""

    def __init__(self, shape: tuple[int, ...], ranks: tuple[int, int]):
        super().__init__()
        self.shape = tuple(shape)
        self.ranks = (int(ranks[0]), int(ranks[1]))

    def forward(self, a: torch.Tensor, b: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        return _mode_product(_mode_product(core, a, 0), b, 1)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor):
        a, b, core = tucker2(weight.detach().double(), self.ranks)
        return a.to(weight.dtype), b.to(weight.dtype), core.to(weight.dtype)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, ranks={self.ranks}"


def _mode_basis(w: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    unfold = torch.movedim(w, mode, 0).reshape(w.shape[mode], -1)
    u, s, _ = torch.linalg.svd(unfold, full_matrices=False)
    return u, s


def tucker2(w: torch.Tensor, ranks: tuple[int, int]):
    """HOSVD Tucker-2 on the two channel modes: (A, B, core)."""
    ua, _ = _mode_basis(w, 0)
    ub, _ = _mode_basis(w, 1)
    a, b = ua[:, :ranks[0]], ub[:, :ranks[1]]
    core = _mode_product(_mode_product(w, a.T, 0), b.T, 1)
    return a, b, core


def _tucker_error(w: torch.Tensor, ranks) -> float:
    a, b, core = tucker2(w, ranks)
    approx = _mode_product(_mode_product(core, a, 0), b, 1)
    return float((approx - w).norm() / w.norm().clamp_min(1e-300))


def _tucker_ranks(w: torch.Tensor, max_error: float) -> tuple[int, int]:
    """Mode ranks splitting the error budget evenly (HOSVD bound), then grown until the true error fits."""
    _, sa = _mode_basis(w, 0)
    _, sb = _mode_basis(w, 1)
    ra = _rank_for_error(sa, max_error / math.sqrt(2))
    rb = _rank_for_error(sb, max_error / math.sqrt(2))
    # The HOSVD bound sqrt(ea^2 + eb^2) is an upper bound, so the ranks already satisfy the threshold;
    # shrink them jointly (binary search on a common fraction) while the true error still fits.
    lo, hi = 0.0, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        cand = (max(1, math.ceil(ra * mid)), max(1, math.ceil(rb * mid)))
        if _tucker_error(w, cand) <= max_error:
            hi = mid
        else:
            lo = mid
    return max(1, math.ceil(ra * hi)), max(1, math.ceil(rb * hi))


@dataclass
class FactorInfo:
    name: str
    kind: str                # "svd" or "tucker2"
    shape: tuple[int, ...]
    ranks: tuple[int, ...]
    numel: int               # weights before
    factor_numel: int        # numbers in the factors
    error: float             # relative Frobenius error of the factorization


def factorize(model: nn.Module, max_error: float = 0.05, *, rank=None, include=None, exclude=None,
              min_saving: float = 0.1, min_numel: int = 1024, tucker: bool = True) -> list[FactorInfo]:
    """Replace selected weights (in place, by parametrization) with low-rank factors.

    Call it *before* :func:`lsc.spectral`. Only parameters of rank >= 2 with at least
    ``min_numel`` elements are considered (default ``include``: every such weight).

    Args:
        max_error: relative Frobenius error allowed per weight; picks the smallest rank that fits.
        rank: fixed rank instead (int), or a fraction of the full rank (float in (0, 1]).
        min_saving: skip weights whose factors would not be at least this fraction smaller.
        tucker: conv kernels (rank >= 3) get Tucker-2 on their channel modes; otherwise
            they are flattened to (out, in * k...) and factored by truncated SVD.
    Returns one :class:`FactorInfo` per factored weight.
    """
    model = unwrap_for_conversion(model, "lsc.factorize")
    if getattr(model, "_lsc", None) is not None:
        raise LscError("lsc.factorize must be called before lsc.spectral")
    if rank is None and not (isinstance(max_error, (int, float)) and 0 <= max_error < math.inf):
        raise LscError(f"max_error must be a finite number >= 0 (relative Frobenius error per weight), got {max_error!r}")
    if rank is not None and not ((is_integer(rank) and rank >= 1) or (isinstance(rank, float) and 0 < rank <= 1)):
        raise LscError(f"rank must be a positive integer or a fraction in (0, 1], got {rank!r}")
    if not (isinstance(min_saving, (int, float)) and 0 <= min_saving < 1):
        raise LscError(f"min_saving must be in [0, 1) (the fraction the factors must save), got {min_saving!r}")
    if not (is_integer(min_numel) and min_numel >= 0):
        raise LscError(f"min_numel must be an integer >= 0, got {min_numel!r}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small SVDs: multithreaded LAPACK is slower, pathologically so on busy machines
    try:
        return _factorize(model, max_error, rank, include, exclude, min_saving, min_numel, tucker)
    finally:
        torch.set_num_threads(threads)


def _factorize(model, max_error, rank, include, exclude, min_saving, min_numel, tucker) -> list[FactorInfo]:
    """Every weight's factors are chosen first, then all are registered: an error leaves the model as it was."""
    chosen = []
    for name, module, attr, p, ties in selected_parameters(model, include, exclude):
        if p.dim() < 2 or p.numel() < min_numel or ties:
            continue
        if parametrize.is_parametrized(module, attr):
            continue
        if not bool(torch.isfinite(p).all()):
            raise LscError(f"{name}: contains NaN or Inf; lsc cannot factorize non-finite weights")
        w = p.detach().double()
        shape = tuple(p.shape)
        if p.dim() >= 3 and tucker:
            if rank is None:
                ranks = _tucker_ranks(w, max_error)
            else:
                ranks = tuple(_fixed_rank(rank, n) for n in shape[:2])
            k = math.prod(shape[2:])
            fnum = shape[0] * ranks[0] + shape[1] * ranks[1] + ranks[0] * ranks[1] * k
            par, kind = Tucker2(shape, ranks), "tucker2"
            err = _tucker_error(w, ranks)
        else:
            mat = w.reshape(shape[0], -1)
            s = torch.linalg.svdvals(mat)
            r = _rank_for_error(s, max_error) if rank is None else _fixed_rank(rank, min(mat.shape))
            ranks = (r,)
            fnum = r * (mat.shape[0] + mat.shape[1])
            par, kind = LowRankMatrix(shape, r), "svd"
            err = float(s[r:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt().clamp_min(1e-300))
        if fnum > (1.0 - min_saving) * p.numel():
            continue
        chosen.append((module, attr, par.to(p.device), FactorInfo(name, kind, shape, tuple(ranks), p.numel(), fnum, err)))
    for module, attr, par, _ in chosen:
        parametrize.register_parametrization(module, attr, par, unsafe=True)
    return [info for *_, info in chosen]


def _fixed_rank(rank, full: int) -> int:
    if isinstance(rank, float):
        if not 0 < rank <= 1:
            raise LscError(f"rank fraction must be in (0, 1], got {rank}")
        return max(1, min(full, math.ceil(rank * full)))
    return max(1, min(full, int(rank)))


def factor_report(model: nn.Module) -> list[dict]:
    """Factored weights of a model: name, kind, shape, ranks, sizes."""
    rows = []
    for mod_name, module in model.named_modules():
        plist = getattr(module, "parametrizations", None)
        if plist is None:
            continue
        for attr, chain in plist.items():
            for par in chain:
                if isinstance(par, (LowRankMatrix, Tucker2)):
                    ranks = (par.rank,) if isinstance(par, LowRankMatrix) else par.ranks
                    rows.append(dict(name=f"{mod_name}.{attr}" if mod_name else attr,
                                     kind=type(par).__name__, shape=par.shape, ranks=ranks))
    return rows


def fold_factored_state_dict(state_dict: dict, model: nn.Module | None = None) -> dict:
    """Turn ``X.parametrizations.W.original{0,1[,2]}`` factor entries back into full ``X.W`` weights.

    For loading a decoded factored model into an unfactored model of the same
    architecture. Matrices (2 factors) are multiplied and reshaped to the weight's
    shape in ``model`` (if given; else kept 2-D); three factors are Tucker-2 (A, B, core).
    """
    groups: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for k, v in state_dict.items():
        f = factor_of(k)
        if f is None:
            out[k] = v
            continue
        groups.setdefault(f[0], {})[f[1]] = v
    shapes = {}
    if model is not None:
        for n, t in model.state_dict().items():
            shapes[n] = tuple(t.shape)
    for key, fs in groups.items():
        w = fold_factors(fs, key)
        out[key] = w.reshape(shapes[key]) if key in shapes else w
    return out


def fold_factors(fs: dict, key: str) -> torch.Tensor:
    """The full weight (before any reshape) from ``{index: factor}``: two factors ``U @ V`` (as
    :class:`LowRankMatrix`), three Tucker-2 ``(A, B, core)`` (as :class:`Tucker2`). Dense and lazy loading
    both fold with it, so their weights agree bit for bit."""
    if sorted(fs) == [0, 1]:
        return fs[0] @ fs[1]
    if sorted(fs) == [0, 1, 2]:
        return _mode_product(_mode_product(fs[2], fs[0], 0), fs[1], 1)
    raise LscError(f"{key}: cannot fold {len(fs)} factors (original{'/'.join(map(str, sorted(fs)))})")


def folded_shape(shapes: dict, key: str) -> tuple[int, ...]:
    """The shape :func:`fold_factors` gives for factors of these shapes (``{index: shape}``), checking that they fit."""
    s = {i: tuple(v) for i, v in shapes.items()}
    if sorted(s) == [0, 1] and len(s[0]) == 2 and len(s[1]) == 2 and s[0][1] == s[1][0]:
        return (s[0][0], s[1][1])
    if sorted(s) == [0, 1, 2] and len(s[0]) == 2 and len(s[1]) == 2 and len(s[2]) >= 2 \
            and (s[2][0], s[2][1]) == (s[0][1], s[1][1]):
        return (s[0][0], s[1][0], *s[2][2:])
    raise LscError(f"{key}: cannot fold factors of shapes {[s[i] for i in sorted(s)]}")
