"""The rate term users add to their task loss, and the per-tensor report."""
from __future__ import annotations

import math

import torch
from torch import nn

from .rate import RateEstimate, estimate_rate
from .state import get_state

__all__ = ["rate_estimate", "bits_per_weight", "quantization_loss", "report", "compressed_numel"]


def rate_estimate(model: nn.Module) -> RateEstimate:
    """Estimated coded size of every spectral tensor (differentiable total)."""
    st = get_state(model)
    coeffs, steps, groups, ngroups, exps, orders = [], [], [], [], [], []
    for entry in st.entries:
        par = entry.parametrization
        e = par.exponent()
        step = par.step(e)
        coeffs.append(entry.coefficients.to(step.dtype).reshape(par.layout.num_blocks, par.layout.block_numel))
        steps.append(step.reshape(-1))
        groups.append(par.groups)
        ngroups.append(par.num_groups)
        exps.append(e)
        orders.append(par.scan_order)
    return estimate_rate(coeffs, steps, groups, ngroups, exps, orders)


def compressed_numel(model: nn.Module) -> int:
    return sum(math.prod(e.parametrization.layout.shape) for e in get_state(model).entries)


def bits_per_weight(model: nn.Module) -> torch.Tensor:
    """Predicted size of the compressed tensors in the file, in bits per original weight."""
    return rate_estimate(model).total / compressed_numel(model)


def quantization_loss(model: nn.Module, weight: float | None = None) -> torch.Tensor:
    """``weight * bits_per_weight(model)``; ``weight`` defaults to ``rate_weight`` given to ``spectral``.

    Raise the weight for a smaller file, lower it to favour accuracy.
    """
    w = get_state(model).rate_weight if weight is None else float(weight)
    return w * bits_per_weight(model)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


def report(model: nn.Module, print_table: bool = True) -> list[dict]:
    """Per-tensor table: shape, block layout, estimated bits/weight and bytes; raw tensors too."""
    st = get_state(model)
    with torch.no_grad():
        est = rate_estimate(model)
    rows = []
    spectral_names = set()
    for entry, bits in zip(st.entries, est.per_tensor):
        par = entry.parametrization
        n = math.prod(par.layout.shape)
        spectral_names.add(entry.name)
        spectral_names.update(entry.tied_names)
        rows.append(dict(name=entry.name, kind="spectral", shape=par.layout.shape, block=par.layout.block_shape,
                         dtype=str(par.orig_dtype).replace("torch.", ""), bits_per_weight=float(bits) / max(n, 1),
                         bytes=float(bits) / 8, tied=list(entry.tied_names)))
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if ".parametrizations." in name or name in spectral_names:
            continue
        kind = "raw param" if isinstance(t, nn.Parameter) else "raw buffer"
        rows.append(dict(name=name, kind=kind, shape=tuple(t.shape), block=None, dtype=str(t.dtype).replace("torch.", ""),
                         bits_per_weight=8.0 * t.element_size(), bytes=float(t.numel() * t.element_size()), tied=[]))
    if print_table:
        w = max([len(r["name"]) for r in rows] + [4])
        print(f"{'name':<{w}}  {'kind':<10}  {'shape':<18}  {'block':<14}  {'bits/w':>7}  {'bytes':>10}")
        for r in rows:
            blk = "x".join(map(str, r["block"])) if r["block"] else "-"
            shp = "x".join(map(str, r["shape"])) or "scalar"
            print(f"{r['name']:<{w}}  {r['kind']:<10}  {shp:<18}  {blk:<14}  {r['bits_per_weight']:7.3f}  {_fmt_bytes(r['bytes']):>10}")
        total = sum(r["bytes"] for r in rows)
        numel = sum(math.prod(r["shape"]) for r in rows)
        print(f"total: {_fmt_bytes(total)} for {numel} values ({8 * total / max(numel, 1):.3f} bits/value, est.)")
    return rows
