"""Pictures of a compressed file: bits per frequency of each tensor, bytes per layer.

:func:`plot_bits` draws, for every spectral tensor, a heatmap of the bits its
exponent table gives each in-block frequency (the learned or searched bit
allocation: low frequencies top left), and a bar chart of the bytes each tensor
takes in the file. It works from plain rows so it can be fed from a file
(:func:`rows_from_file`) or from a spectral model in memory (:func:`rows_from_model`).
"""
from __future__ import annotations

import math
import operator
import os
from typing import Sequence, Union

import numpy as np

from .atomic import atomic_path
from .errors import LscError

__all__ = ["plot_bits", "heatmap_rows", "rows_from_model", "rows_from_file", "exponent_tables", "as_2d"]


def as_2d(bits: np.ndarray) -> np.ndarray:
    """A block of any rank as a 2-D image: the first dims down, the last dims across.

    (8, 8) stays; (8, 8, 3, 3) becomes (8*3, 8*3)-ish by folding dims
    alternately into rows and columns; a 1-D block is one row; a scalar 1x1.
    """
    b = np.asarray(bits, dtype=np.float64)
    if b.ndim == 0:
        return b.reshape(1, 1)
    if b.ndim == 1:
        return b.reshape(1, -1)
    if b.ndim == 2:
        return b
    rows_dims = list(range(0, b.ndim, 2))
    cols_dims = list(range(1, b.ndim, 2))
    b = b.transpose(rows_dims + cols_dims)
    nr = int(np.prod([bits.shape[d] for d in rows_dims]))
    return b.reshape(nr, -1)


def rows_from_model(model) -> list[dict]:
    """Rows (name, shape, bits: array of the block shape, bytes) from a spectral model (estimated bytes)."""
    import torch

    from .loss import rate_estimate
    from .quantizer import EXPONENT_RESOLUTION
    from .state import get_state

    st = get_state(model)
    with torch.no_grad():
        est = rate_estimate(model)
        rows = []
        for entry, b in zip(st.entries, est.streams):
            par = entry.parametrization
            e = par.exponent().detach().cpu().numpy().reshape(par.layout.block_shape)
            rows.append(dict(name=entry.name, shape=tuple(par.layout.shape), bits=e / EXPONENT_RESOLUTION,
                             bytes=float(b) / 8))
    return rows


def exponent_tables(path: Union[str, os.PathLike]) -> dict[str, np.ndarray]:
    """Per spectral tensor, its step exponents (row-major, shaped like the block) read from the file.

    Only the start of each tensor's side stream is parsed (the Elias-gamma coded
    exponent table); the symbols are not decoded, so this is fast on large files.
    """
    from .codec.api import _SCANS, _parts_from_bytes, _read
    from .codec.elias import BitReader, unzigzag

    header, streams, _ = _parts_from_bytes(_read(path))
    out = {}
    for m, data in zip(header["tensors"], streams):
        if m["kind"] != "spectral":
            continue
        block = tuple(m["block"])
        P = math.prod(block)
        if "exponents" in m:  # a header that lists the table directly
            e_scan, order = np.asarray(m["exponents"], dtype=np.int64), None
        else:
            r = BitReader(bytes(data[:m["side"]]), m["name"])
            e_scan = np.cumsum(unzigzag(r.gamma(P) - np.uint64(1))).astype(np.int64)
            order = np.asarray(_SCANS[m["scan"]](block))
        e = np.empty(P, dtype=np.int64)
        if order is None:
            e[:] = e_scan
        else:
            e[order] = e_scan
        out[m["name"]] = e.reshape(block)
    return out


def rows_from_file(path: Union[str, os.PathLike]) -> list[dict]:
    """Rows (name, shape, bits or None for raw tensors, bytes, kind) of a .lsc file, in file order."""
    from .codec import file_info
    from .quantizer import EXPONENT_RESOLUTION

    info = file_info(path)
    tables = exponent_tables(path)
    rows = []
    for r in info["rows"]:
        e = tables.get(r["name"])
        rows.append(dict(name=r["name"], shape=tuple(r["shape"]), kind=r["kind"], bytes=float(r["bytes"]),
                         bits=None if e is None else e / EXPONENT_RESOLUTION))
    return rows


def heatmap_rows(rows: Sequence[dict], max_heatmaps: int = 24) -> list[dict]:
    """The rows :func:`plot_bits` draws a heatmap for: the ``max_heatmaps`` largest spectral tensors, in file order
    (so that a caller can say how many were drawn)."""
    try:
        count = operator.index(max_heatmaps)  # an int or a numpy integer, not 2.5
    except TypeError:
        count = -1
    if isinstance(max_heatmaps, bool) or count < 0:
        raise LscError(f"max_heatmaps={max_heatmaps!r} must be an integer >= 0")
    spectral = [r for r in rows if r.get("bits") is not None and np.size(r["bits"]) > 0]
    largest = sorted(spectral, key=lambda r: -math.prod(r["shape"]) if r["shape"] else -1)[:count]
    names = {r["name"] for r in largest}
    return [r for r in spectral if r["name"] in names]  # keep file order


def plot_bits(rows: Sequence[dict], out: Union[str, os.PathLike], title: str = "", max_heatmaps: int = 24) -> str:
    """Write a PNG: one bits-per-frequency heatmap per spectral tensor, then bytes per tensor.

    Tensors beyond ``max_heatmaps`` (largest first; see :func:`heatmap_rows`) are left out
    of the heatmaps but still appear in the bytes chart. Returns the path written.
    """
    shown = heatmap_rows(rows, max_heatmaps)  # a bad count is refused before matplotlib loads
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ncols = min(4, max(len(shown), 1))
    nrows_maps = -(-len(shown) // ncols) if shown else 0
    n_bars = len(rows)
    bar_h = max(2.5, min(0.22 * n_bars, 30))
    fig_h = 2.6 * nrows_maps + bar_h + 1.2
    fig = plt.figure(figsize=(3.2 * ncols + 1.5, fig_h), constrained_layout=True)
    gs = fig.add_gridspec(nrows_maps + 1, ncols, height_ratios=[2.6] * nrows_maps + [bar_h])
    if shown:
        vmin = min(float(np.min(r["bits"])) for r in shown)
        vmax = max(float(np.max(r["bits"])) for r in shown)
        if vmax - vmin < 0.25:
            vmin, vmax = vmin - 0.5, vmax + 0.5
        im = None
        for i, r in enumerate(shown):
            ax = fig.add_subplot(gs[i // ncols, i % ncols])
            img = as_2d(r["bits"])
            im = ax.imshow(img, cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto")
            blk = "x".join(str(s) for s in np.shape(r["bits"])) or "1"
            ax.set_title(f"{_short(r['name'])}\n{'x'.join(map(str, r['shape']))}, block {blk}, "
                         f"{_mean_bits(r):.2f} b", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=fig.axes[:len(shown)], shrink=0.8, label="bits per frequency")
    ax = fig.add_subplot(gs[nrows_maps, :])
    names = [_short(r["name"], 48) for r in rows]
    sizes = [r["bytes"] for r in rows]
    colors = ["tab:blue" if r.get("bits") is not None else "tab:gray" for r in rows]
    ax.barh(range(len(rows)), sizes, color=colors)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(names, fontsize=6 if len(rows) > 30 else 8)
    ax.invert_yaxis()
    ax.set_xlabel("bytes in file (gray: stored raw)")
    total = sum(sizes)
    ax.set_title(f"bytes per tensor (symbols + side info), {total:,.0f} B in all tensors", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    out = str(out)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=110, format=os.path.splitext(out)[1].lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return out


def _mean_bits(r: dict) -> float:
    return float(np.mean(r["bits"]))


def _short(name: str, width: int = 30) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]
