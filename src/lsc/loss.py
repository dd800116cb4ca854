"""The rate term users add to their task loss, and the per-tensor report."""
from __future__ import annotations

import json
import math
import warnings
import zlib

import torch
from torch import nn

from .rate import RateEstimate, estimate_rate, exact_bits, surrogate_bits_total
from .quantizer import bits_to_exponent, step_size
from .precision import full_precision
from .rowclasses import row_units
from .state import check_attached, get_state, spectral_root
from .errors import LscError, outside_stacklevel

__all__ = ["rate_estimate", "bits_per_weight", "quantization_loss", "report", "compressed_numel"]


def _rate_inputs(model: nn.Module):
    """Per tensor: coefficients (the parameters themselves), steps (P,), exponents (P,) — all differentiable."""
    st = get_state(model)
    pars, coeffs = zip(*(entry.parts() for entry in st.entries))
    # one q_net pass for every tensor, shared with this step's forward (a per-tensor call costs
    # more in overhead than in arithmetic)
    all_exps, all_steps = _with_frozen_exponents(pars, *_shared_outputs(st.q_net, pars))
    steps = [s.to(p.mean.dtype) for s, p in zip(all_steps, pars)]
    coeffs = [c.to(s.dtype) for c, s in zip(coeffs, steps)]
    numel = sum(p.layout.numel for p in pars)
    return st, numel, coeffs, steps, all_exps, [p.groups for p in pars], [p.num_groups for p in pars], [p.scan_order for p in pars]


def _header_key(st, min_group: int):
    """What the spectral tensors' header entries depend on, read without touching the device (None: uncacheable)."""
    key = [min_group]
    try:
        for e in st.entries:
            par = e.parametrization
            key.append((e.name, tuple(e.tied_names), id(par), tuple(par.layout.shape), tuple(par.layout.block_shape),
                        par.transform, par.orig_dtype, id(par.mean), par.mean._version, id(par.std), par.std._version))
    except RuntimeError:  # inference tensors keep no version counter
        return None
    return tuple(key)


def spectral_header(st) -> dict:
    """The header entries the writer gives the spectral tensors, and what they cost in the file.

    Returns ``{"metas": [entry per tensor], "bytes": prefix + compressed header of a file holding only
    them, "overhead": the same for no tensor (prefix, JSON skeleton, writer), "shares": each tensor's
    part of the difference, in proportion to its JSON}``. The entries are the writer's
    (:func:`lsc.codec.api._encode_spectral`) with the fields only the encoder knows filled with
    stand-ins of the usual width: a stream length of 4 bits per weight, a CRC drawn from the name
    (CRCs do not compress), no row classes and no ANS segments (a few bytes each where the writer
    uses them). Cached until a tensor's name, shape or statistics change: the training steps between
    exact size refreshes never compute it.
    """
    from .codec.api import _header_bytes, spectral_meta

    min_group = int(st.config.get("min_group_symbols", 1024))
    key = _header_key(st, min_group)
    cached = st.__dict__.get("_lsc_header")
    if key is not None and cached is not None and cached["key"] == key:
        return cached
    metas = []
    for e in st.entries:
        layout = e.parametrization.layout
        metas.append(dict(spectral_meta(e, min_group, "morton"), side=max(1, layout.block_numel // 4),
                          len=max(1, layout.numel // 2), crc=zlib.crc32(e.name.encode())))
    overhead = len(_header_bytes([]))
    total = len(_header_bytes(metas)) if metas else overhead
    sizes = [len(json.dumps(m, sort_keys=True, separators=(",", ":"))) for m in metas]
    shares = [(total - overhead) * n / max(sum(sizes), 1) for n in sizes]
    out = dict(key=key, metas=metas, bytes=total, overhead=overhead, shares=shares)
    st.__dict__["_lsc_header"] = out
    return out


def _row_units(st) -> list[int]:
    """Block rows of each tensor that may use row classes (only the exact size pass needs them)."""
    return [row_units(e.parametrization.layout) for e in st.entries]


def _as_blocks(coeffs, steps) -> list[torch.Tensor]:
    """Coefficients as (num_blocks, P) views."""
    return [c.reshape(-1, s.shape[0]) for c, s in zip(coeffs, steps)]


def _with_frozen_exponents(pars, exps, steps) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A tensor loaded from a file is quantized at the file's exponents (``frozen_exponent``), not q_net's:
    its rate is estimated at those too, with no gradient to q_net."""
    if all(p.frozen_exponent is None for p in pars):
        return exps, steps
    exps, steps = list(exps), list(steps)
    for i, p in enumerate(pars):
        if p.frozen_exponent is not None:
            exps[i] = p.frozen_exponent.reshape(-1)
            steps[i] = step_size(exps[i])
    return exps, steps


def _shared_outputs(q_net, pars) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(exponents, float32 steps) of ``pars`` from q_net's cached batched call, computed directly otherwise."""
    shared = q_net.shared_outputs()
    members = q_net.__dict__.get("_members")
    if shared is not None and [members["index"].get(p.tensor_id) for p in pars] == list(range(len(pars))):
        return shared
    exps = [bits_to_exponent(q_net(p.features, p.tensor_id)) for p in pars]
    return exps, [step_size(e) for e in exps]


@full_precision
def rate_estimate(model: nn.Module) -> RateEstimate:
    """Estimated coded size of every spectral tensor: exact value, differentiable through a surrogate."""
    check_attached(model)
    st, _, coeffs, steps, exps, groups, ngroups, orders = _rate_inputs(model)
    return _estimate(st, coeffs, steps, exps, groups, ngroups, orders)


def _estimate(st, coeffs, steps, exps, groups, ngroups, orders) -> RateEstimate:
    """The exact estimate (header included, tensors checked) of :func:`_rate_inputs`' outputs."""
    head = spectral_header(st)
    return estimate_rate(_as_blocks(coeffs, steps), steps, groups, ngroups, exps, orders, _row_units(st),
                         head["shares"], head["overhead"], [e.name for e in st.entries])


def compressed_numel(model: nn.Module) -> int:
    return sum(e.parametrization.layout.numel for e in get_state(model).entries)


def bits_per_weight(model: nn.Module) -> torch.Tensor:
    """Predicted size of the compressed tensors in the file, in bits per original weight (exact, fresh).

    Counts their streams and their part of the file header (the whole header of a file holding only
    them); tensors stored raw are left out (:func:`lsc.target.raw_bytes` has those). A NaN/Inf or
    unstorably large coefficient raises :class:`lsc.LscError` naming the tensor.
    """
    return rate_estimate(model).total / compressed_numel(model)


@torch.compiler.disable  # eager inside a compiled training step, like the spectral weights themselves
@full_precision
def quantization_loss(model: nn.Module, weight: float | None = None) -> torch.Tensor:
    """``weight * bits_per_weight(model)``, cheap enough to add to every training step.

    ``weight`` defaults to the ``rate_weight`` given to ``spectral``: raise it for a
    smaller file, lower it to favour accuracy. While gradients are on, the exact
    coded size (a histogram pass with one or two host syncs) is refreshed every
    ``rate_refresh`` calls and tracked in between by the drift of the smooth
    surrogate, whose gradient drives training either way. That gradient holds the
    surrogate's per-position logistic scale (fitted to the mean |c| over blocks)
    constant, so it is not the exact derivative of the returned value between
    refreshes (finite differences along it measured 0.77-0.88x of it on a small MLP).
    The exact refresh raises :class:`lsc.LscError` naming a tensor whose coefficients
    became NaN/Inf or too large to store.
    """
    st, numel, coeffs, steps, exps, groups, ngroups, orders = _rate_inputs(model)
    w = st.rate_weight if weight is None else float(weight)
    if not (math.isfinite(w) and w >= 0):
        raise LscError(f"quantization_loss: weight must be a finite number >= 0 (a negative one would reward "
                         f"larger files), got {weight!r}")
    if not torch.is_grad_enabled():
        return w * _estimate(st, coeffs, steps, exps, groups, ngroups, orders).total / numel
    sur = surrogate_bits_total(coeffs, steps)
    cache = st.rate_cache
    if cache is None or cache["device"] != sur.device or st.rate_calls % st.rate_refresh == 0:
        check_attached(model)
        head = spectral_header(st)
        data, side = exact_bits([c.detach() for c in _as_blocks(coeffs, steps)], [s.detach() for s in steps], groups,
                                ngroups, [e.detach() for e in exps], orders, _row_units(st), head["shares"],
                                [e.name for e in st.entries])
        exact = (torch.stack([d + s for d, s in zip(data, side)]).sum() + 8 * head["overhead"]).to(sur.dtype)
        _warn_if_q_net_is_not_trained(st, cache, sur)
        cache = st.rate_cache = dict(exact=exact, sur=sur.detach(), device=sur.device)
    st.rate_calls += 1
    total = cache["exact"] + (sur - cache["sur"])
    return w * total / numel


def _warn_if_q_net_is_not_trained(st, cache, sur: torch.Tensor) -> None:
    """Warn (once) when q_net gets gradients but never moves while the coefficients do: the usual cause
    is an optimizer built from ``model.parameters()`` alone, and then the bit allocation never learns.

    Runs at the exact rate refreshes only (they synchronize with the device anyway). Parameters an
    optimizer steps have no gradient left here or have changed; a frozen q_net has no gradient at all.
    """
    params = list(st.q_net.parameters())
    if st.q_net_warned or not params or not all(p.grad is not None for p in params):  # FSDP: params moved out
        return
    now = torch.cat([p.detach().flatten() for p in params])
    seen, st.q_net_seen = st.q_net_seen, now.clone()
    if (seen is not None and cache is not None and torch.equal(seen, now)
            and not torch.equal(cache["sur"], sur.detach())):
        st.q_net_warned = True
        warnings.warn("lsc: the quantization network (q_net) receives gradients but its parameters have not changed "
                      f"over the last {st.rate_refresh} steps while the model's have, so the bit allocation is not "
                      "learning; pass its parameters to the optimizer: torch.optim.Adam(list(model.parameters()) + "
                      "list(q_net.parameters()), ...) (or, to keep the allocation fixed on purpose, "
                      "q_net.requires_grad_(False))", stacklevel=outside_stacklevel())


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


def report(model: nn.Module, print_table: bool = True) -> list[dict]:
    """Per-tensor table of the real .lsc file: bytes (ANS stream + side info), bits/weight, and the estimate.

    Runs the actual encoder (``lsc.compress_weights``), so ``sum(r["bytes"] for r in rows)``
    equals the size of the file ``lsc.save`` writes; the last row is the file header.
    Every row also carries ``est_bytes``, the prediction of its ``bytes`` (like for like: a
    spectral row's is the training rate estimate of its stream, without the header share
    ``bits_per_weight`` adds; a raw row's is the raw encoder's measurement; the header row's is
    the predicted header), and ``sum(r["est_bytes"] for r in rows)`` is the prediction of the
    whole file that :class:`lsc.RateController` steers (``predicted_bytes``).
    """
    from .codec import compress_weights, file_info
    from .target import predicted_file

    with torch.no_grad():
        est = rate_estimate(model)
    pred = predicted_file(model, est)
    est_bytes = {**pred["spectral"], **pred["raw"]}
    params = {n for n, _ in spectral_root(model).named_parameters()}
    info = file_info(compress_weights(model))
    rows = []
    for r in info["rows"]:
        kind = "spectral" if r["kind"] == "spectral" else ("raw param" if r["name"] in params else "raw buffer")
        rows.append(dict(r, kind=kind, est_bytes=est_bytes.get(r["name"])))
    tot = info["totals"]
    rows.append(dict(name="(file header)", kind="header", shape=(), block=None, dtype="-", numel=0, bits_per_weight=0.0,
                     bytes=tot["header_bytes"], stream_bytes=0, side_bytes=tot["header_bytes"], tied=[],
                     est_bytes=pred["header"]))
    if print_table:
        w = max([len(r["name"]) for r in rows] + [4])
        print(f"{'name':<{w}}  {'kind':<10}  {'shape':<18}  {'block':<14}  {'bits/w':>7}  {'bytes':>10}  {'side':>9}  {'est.':>10}")
        for r in rows:
            blk = "x".join(map(str, r["block"])) if r["block"] else "-"
            shp = "x".join(map(str, r["shape"])) or "scalar"
            e = _fmt_bytes(r["est_bytes"]) if r["est_bytes"] is not None else "-"
            print(f"{r['name']:<{w}}  {r['kind']:<10}  {shp:<18}  {blk:<14}  {r['bits_per_weight']:7.3f}  "
                  f"{_fmt_bytes(r['bytes']):>10}  {_fmt_bytes(r['side_bytes']):>9}  {e:>10}")
        print(f"total: {tot['file_bytes']:,} bytes (= the .lsc file) for {tot['numel']:,} values "
              f"({tot['bits_per_weight']:.3f} bits/value); predicted {pred['total']:,.0f} bytes "
              f"({pred['total'] / max(tot['file_bytes'], 1) - 1:+.2%}: the training estimate and the raw tensors)")
    return rows
