"""Differentiable estimate of the coded size of the quantized coefficients.

The seed's "mean bits" was not a storage cost. Here the loss *value* is the size
the codec will produce: for each coding group (see :mod:`lsc.grouping`) the
cheaper of (empirical entropy of its integer symbols + its probability table) and
a uniform code over its range, plus the side information the file carries
(exponent tables, per-tensor header). That value is a step function of the
coefficients, so its *gradient* comes from a smooth surrogate: the code length of
each coefficient under a discretized logistic density fitted to its group,
-log2 P(c) with P(c) = F(c + step/2) - F(c - step/2). It pulls coefficients toward
zero and widens steps where that is cheap, in the sparse high-bit regime as well
as the coarse one, where a histogram-based gradient would vanish or be noise.
Everything is batched over all tensors with one host synchronization (to size
the histogram; a second one finds the occupied bins when most are empty; tensors
that may use row classes add the proposal's, and one before it). The first one also
checks that every integer can be stored: an infinite or too large coefficient raises
:class:`lsc.LscError` naming its tensor, as ``lsc.save`` does (a NaN one makes that
tensor's size NaN, as its decoded weight is).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .errors import LscError
from .precision import full_precision
from .quantizer import fresh, scratch
from .rowclasses import propose_row_classes

__all__ = ["elias_gamma_bits", "zigzag", "RateEstimate", "estimate_rate", "exact_bits", "surrogate_bits", "surrogate_bits_total",
           "HEADER_BYTES_PER_TENSOR", "FILE_OVERHEAD_BYTES", "STREAM_OVERHEAD_BITS", "EMPTY_STREAM_BITS"]

# Fallbacks for callers of :func:`exact_bits` that know nothing of the model: :mod:`lsc.loss` predicts the
# header of the real file instead (each tensor's JSON entry, compressed as the writer compresses it).
HEADER_BYTES_PER_TENSOR = 40   # compressed JSON entry per tensor (name, shape, stats, offsets, crc)
FILE_OVERHEAD_BYTES = 64       # magic, version, lengths, header checksum, JSON skeleton
STREAM_OVERHEAD_BITS = 36      # per stream: the ANS coder's flush (about a 32-bit word) and the side info's byte padding
EMPTY_STREAM_BITS = 4          # a stream with nothing to entropy-code (every group one symbol): the padding alone
MAX_INTEGER = 2.0 ** 52        # a coefficient's integer must stay below this to be stored (as the writer checks)


def zigzag(v: torch.Tensor) -> torch.Tensor:
    """Signed -> unsigned: 0,-1,1,-2,2 -> 0,1,2,3,4."""
    return torch.where(v >= 0, 2 * v, -2 * v - 1)


def elias_gamma_bits(v: torch.Tensor) -> torch.Tensor:
    """Length in bits of the Elias-gamma code of v >= 1: 2 * floor(log2 v) + 1."""
    return 2 * torch.floor(torch.log2(v.to(torch.float64))) + 1


def _xlog2x(c: torch.Tensor) -> torch.Tensor:
    """c * log2(c), 0 at 0, with a finite gradient there (an empty bin is a costly place to move to)."""
    return c * torch.log2(c.clamp_min(1e-3))


class RateEstimate:
    """Estimated coded bits, total and per tensor; ``total`` is differentiable.

    ``side_bits`` include each tensor's share of the file header (``header_bits``, also given
    on their own so that a tensor's stream can be compared with the file's per-tensor bytes,
    which leave the header out); ``total`` adds ``overhead_bytes``, the header's fixed part.
    """

    def __init__(self, data_bits: list[torch.Tensor], side_bits: list[torch.Tensor],
                 header_bits: list[float] | None = None, overhead_bytes: float = FILE_OVERHEAD_BYTES):
        self.data_bits = data_bits
        self.side_bits = side_bits
        self.header_bits = [8.0 * HEADER_BYTES_PER_TENSOR] * len(data_bits) if header_bits is None else list(header_bits)
        self.overhead_bytes = float(overhead_bytes)

    @property
    def per_tensor(self) -> list[torch.Tensor]:
        return [d + s for d, s in zip(self.data_bits, self.side_bits)]

    @property
    def streams(self) -> list[torch.Tensor]:
        """Bits of each tensor's stream alone (``per_tensor`` less its header share): what ``lsc.file_info``'s rows count."""
        return [p - h for p, h in zip(self.per_tensor, self.header_bits)]

    @property
    def total(self) -> torch.Tensor:
        return torch.stack(self.per_tensor).sum() + 8 * self.overhead_bytes


def logistic_code_length(coeffs: torch.Tensor, step: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Bits of each coefficient under a logistic density of ``scale`` discretized to bins of ``step``.

    ``step`` and ``scale`` broadcast against ``coeffs`` (per-position constants on a
    (num_blocks, P) view), so no full-size copies of them are made.
    """
    inv = 1.0 / scale
    u = (step / 2 - coeffs.abs()) * inv   # upper bin edge, in units of the scale
    v = u - step * inv                    # lower bin edge
    p = torch.sigmoid(u) - torch.sigmoid(v)
    return -torch.log2(p.clamp_min(1e-30))


_LN2 = 0.6931471805599453
_SCALE_PER_MEAN_ABS = 0.6079271018540267  # sqrt(3) / pi


def _logistic_scale(coeffs: torch.Tensor) -> torch.Tensor:
    """Per-position logistic scale matching the mean |c| over blocks (sqrt(3)/pi * mean|c|)."""
    c = coeffs.detach()
    a = torch.abs(c, out=scratch(0, c.numel(), c.dtype, c.device).view(c.shape))
    return (a.mean(0) * _SCALE_PER_MEAN_ABS).clamp_min(1e-8)


# The bin probability of :func:`logistic_code_length`, with t = c / scale and h = step / (2 scale),
# factors as p = (1 - e^(-2h)) * sigmoid(h - t) * sigmoid(h + t) (no cancellation, unlike the
# difference of two sigmoids), and with a = sigmoid(h - t), b = sigmoid(h + t):
#     d(-ln p)/dt = b - a,        d(-ln p)/dh = a + b - 2 - 2 / expm1(2h).
# So the forward needs two sigmoids and one log per coefficient, and the backward only
# f = b - a (kept from the forward: it becomes the coefficients' gradient) and the
# per-position sums of a + b. As before, p is floored at 1e-30 in the value (as p + 1e-30; not in the gradient).
#
# Everything per position is computed once for all tensors (concatenated), and small tensors
# (biases, norms: most tensors of a model, few of its coefficients) are also concatenated for
# the per-coefficient passes, so the number of kernel launches does not grow with their count.

_FLAT_MAX = 1 << 15
_SPARSE_BINS_PER_SYMBOL = 16  # beyond this many histogram bins per symbol, the exact rate counts occupied bins only  # coefficient tensors up to this size share one flat set of passes


class _Batch(NamedTuple):
    """How a list of coefficient tensors is processed (cached per list of shapes)."""

    shapes: list         # (num_blocks, P) of each tensor
    sizes: list          # P of each tensor
    blocks: torch.Tensor  # (sum P,) number of blocks of the tensor each position belongs to
    small: list          # tensors concatenated into one flat vector
    big: list            # tensors processed one by one
    index: torch.Tensor  # (sum of small numel,) position (in the concatenation of all P) of each flat coefficient
    numels: list         # numel of each small tensor


_BATCHES: dict = {}


def _batch(coeffs, steps) -> _Batch:
    key = (tuple(tuple(c.shape) for c in coeffs), tuple(s.shape[0] for s in steps), coeffs[0].dtype, coeffs[0].device)
    b = _BATCHES.get(key)
    if b is None:
        dev, sizes = coeffs[0].device, [s.shape[0] for s in steps]
        shapes = [(c.numel() // p, p) for c, p in zip(coeffs, sizes)]
        starts = [0]
        for p in sizes[:-1]:
            starts.append(starts[-1] + p)
        small = [i for i, c in enumerate(coeffs) if c.numel() <= _FLAT_MAX]
        index = torch.cat([torch.arange(sizes[i], device=dev).repeat(shapes[i][0]) + starts[i] for i in small]) \
            if small else torch.zeros(0, dtype=torch.int64, device=dev)
        blocks = torch.cat([torch.full((p,), float(n), dtype=coeffs[0].dtype, device=dev) for n, p in shapes])
        b = _BATCHES[key] = _Batch(shapes, sizes, blocks, small, [i for i in range(len(coeffs)) if i not in set(small)],
                                   index, [coeffs[i].numel() for i in small])
    return b


def _logistic_scales(coeffs, batch: _Batch, flat: torch.Tensor | None) -> torch.Tensor:
    """:func:`_logistic_scale` of many tensors, concatenated (sum P,); ``flat`` holds the small ones."""
    c0 = coeffs[0]
    means = torch.zeros(sum(batch.sizes), dtype=c0.dtype, device=c0.device)
    if flat is not None:
        flat = flat.detach()
        means.index_add_(0, batch.index, torch.abs(flat, out=scratch(0, flat.numel(), flat.dtype, flat.device)))
    parts = means.split(batch.sizes)
    for i in batch.big:
        _abs_sum(coeffs[i].detach().reshape(batch.shapes[i]), parts[i])
    return means.div_(batch.blocks).mul_(_SCALE_PER_MEAN_ABS).clamp_min_(1e-8)


def _position_terms(step: torch.Tensor, scale: torch.Tensor):
    """Per-position constants, stacked (1/scale, -1/scale, h, floor of a*b) as one (4, P) tensor, and 1 - e^(-2h)."""
    terms = torch.empty((4, step.shape[0]), dtype=step.dtype, device=step.device)
    inv = torch.reciprocal(scale, out=terms[0])
    torch.neg(inv, out=terms[1])
    h = torch.mul(step, inv, out=terms[2]).mul_(0.5)
    k = torch.expm1(h * -2.0).neg_()
    torch.reciprocal(k, out=terms[3]).mul_(1e-30)
    return terms, k


# Big tensors are processed in chunks of whole blocks of about this many coefficients: the
# temporaries of the per-coefficient passes then stay in the CPU cache, and the tensor itself
# is read twice (scale, terms) and its future gradient written once (MiniLM embedding: ~1.3x faster).
_CHUNK = 1 << 18


def _chunks(rows: int, p: int, device) -> list[tuple[int, int]]:
    """Row ranges of a (rows, p) tensor processed together: one range off the CPU or when small."""
    step = rows if device.type != "cpu" else max(1, _CHUNK // max(p, 1))
    return [(a, min(rows, a + step)) for a in range(0, rows, step)] or [(0, 0)]


def _abs_sum(c: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` <- sum over rows of |c| for (rows, P) ``c``, chunk by chunk."""
    ranges = _chunks(c.shape[0], c.shape[1], c.device)
    if len(ranges) == 1:
        return torch.sum(torch.abs(c, out=scratch(0, c.numel(), c.dtype, c.device).view(c.shape)), 0, out=out)
    out.zero_()
    buf = scratch(0, (ranges[0][1] - ranges[0][0]) * c.shape[1], c.dtype, c.device)
    for a, b in ranges:
        out.add_(torch.abs(c[a:b], out=buf[: (b - a) * c.shape[1]].view(b - a, c.shape[1])).sum(0))
    return out


def _terms(c, terms, f: torch.Tensor | None, sums: torch.Tensor | None, index: torch.Tensor | None = None):
    """sum(log2(a * b)) over ``c`` (num_blocks, P) with ``terms`` (4, P) from :func:`_position_terms`, or
    over flat ``c`` with ``index`` mapping each coefficient to its column of ``terms``; ``f`` (if given)
    <- b - a; ``sums`` += per-position sum of a + b."""
    if index is None and c.dim() == 2:
        ranges = _chunks(c.shape[0], c.shape[1], c.device)
        if len(ranges) > 1:
            return torch.stack([_terms_once(c[a:b], terms, None if f is None else f[a:b], sums) for a, b in ranges]).sum()
    return _terms_once(c, terms, f, sums, index)


def _terms_once(c, terms, f: torch.Tensor | None, sums: torch.Tensor | None, index: torch.Tensor | None = None):
    """:func:`_terms` in one go (buffers of the size of ``c``)."""
    inv, neg_inv, h, floor = terms if index is None else terms.index_select(1, index)
    a = torch.addcmul(h, c, neg_inv, out=scratch(0, c.numel(), c.dtype, c.device).view(c.shape)).sigmoid_()
    b = torch.addcmul(h, c, inv, out=scratch(1, c.numel(), c.dtype, c.device).view(c.shape)).sigmoid_()
    if f is not None:
        torch.sub(b, a, out=f)
    if sums is not None:
        if index is None:
            sums.add_(a.sum(0)).add_(b.sum(0))
        else:
            sums.index_add_(0, index, torch.add(a, b, out=scratch(2, c.numel(), c.dtype, c.device)))
    # log2(a*b + floor) in place (the floor costs no extra pass), summed in the coefficients' dtype. Products
    # of 8 values in float64 with one logarithm per 8 measured 2.5-3x slower on this machine's CPUs
    # (AVX-512, AVX2, default kernels; 21k-262k values): the float64 copy costs more than the 7 logs it saves.
    return torch.log2(torch.addcmul(floor, a, b, out=a), out=a).sum()


def _bits_forward(coeffs, steps, scale, want_f, want_s):
    """Total surrogate bits of coefficient tensors (any shape, ``num_blocks * P`` elements, contiguous
    blocks of P) with steps (P,) and concatenated scales (sum P,) (None: computed here).

    Returns ``(bits, fs, flat_f, sums, scale)``: ``fs[i] = b - a`` shaped like ``coeffs[i]`` (the
    future gradient: a tensor of its own for large tensors, so autograd can add the model's
    gradient into it in place; views of ``flat_f`` for the small ones).
    """
    batch = _batch(coeffs, steps)
    flat = torch.cat([coeffs[i].reshape(-1) for i in batch.small]) if batch.small else None
    if scale is None:
        scale = _logistic_scales(coeffs, batch, flat)
    terms, k = _position_terms(torch.cat(steps), scale)
    sums = torch.zeros_like(scale) if any(want_s) else None
    fs, flat_f, logs = [None] * len(coeffs), None, []
    if flat is not None:
        flat_f = torch.empty_like(flat) if any(want_f[i] for i in batch.small) else None
        logs.append(_terms(flat, terms, flat_f, sums, batch.index))
        if flat_f is not None:
            for i, f in zip(batch.small, flat_f.split(batch.numels)):
                fs[i] = f.view(coeffs[i].shape)
    if batch.big:
        parts = terms.split(batch.sizes, 1)
        sum_parts = sums.split(batch.sizes) if sums is not None else None
        for i in batch.big:
            c, shape = coeffs[i], batch.shapes[i]
            fs[i] = fresh(tuple(c.shape), c.dtype, c.device) if want_f[i] else None
            logs.append(_terms(c.reshape(shape), parts[i], None if fs[i] is None else fs[i].view(shape),
                               sum_parts[i] if want_s[i] else None))
    total = torch.stack(logs).sum() + torch.dot(batch.blocks, torch.log2(k))
    return -total, fs, flat_f, sums, scale


def _bits_backward(grad, coeffs, steps, scale, saved, need_c, need_s):
    """Gradients of :func:`_bits_forward` for every coefficient tensor and step; ``saved = (fs, flat_f, sums)``
    from the forward is consumed (None: recomputed, for a repeated backward)."""
    if saved is None:
        saved = _bits_forward([c.detach() for c in coeffs], [s.detach() for s in steps], scale, need_c, need_s)[1:4]
    fs, flat_f, sums = saved
    batch = _batch(coeffs, steps)
    inv = scale.reciprocal()
    col = inv * (grad / _LN2)
    if flat_f is not None:
        flat_f.mul_(col.index_select(0, batch.index))  # scales the small tensors' views in fs
    cols = col.split(batch.sizes)
    for i in batch.big:
        if fs[i] is not None:
            fs[i].view(batch.shapes[i]).mul_(cols[i])
    grads_c = [f if n else None for f, n in zip(fs, need_c)]
    grads_s = [None] * len(coeffs)
    if any(need_s):
        blocks = batch.blocks
        g = (sums - 2 * blocks - 2 * blocks / torch.expm1(torch.cat(steps) * inv)) * (inv * (0.5 * grad / _LN2))
        grads_s = [x if need_s[i] else None for i, x in enumerate(g.split(batch.sizes))]
    return grads_c, grads_s


class _LogisticBits(torch.autograd.Function):
    """Sum of :func:`logistic_code_length` with a hand-written backward (see the comment above).

    On MiniLM's 22.7M coefficients this term was the largest training overhead after the
    model itself: the forward now makes about ten full-size passes, all but one into reused
    buffers, and keeps one full-size tensor (the future gradient); the backward only scales it.
    """

    @staticmethod
    def forward(ctx, coeffs, step, scale):
        bits, *saved, _ = _bits_forward([coeffs], [step], scale, ctx.needs_input_grad[:1], ctx.needs_input_grad[1:2])
        ctx.saved = saved
        ctx.save_for_backward(coeffs, step, scale)
        return bits

    @staticmethod
    @once_differentiable  # no graph through these in-place kernels: create_graph=True gives first-order grads
    @full_precision
    def backward(ctx, grad):
        coeffs, step, scale = ctx.saved_tensors
        saved, ctx.saved = ctx.saved, None  # handed out as the gradient: a repeated backward recomputes it
        (gc,), (gs,) = _bits_backward(grad, [coeffs], [step], scale, saved, ctx.needs_input_grad[:1], ctx.needs_input_grad[1:2])
        return gc, gs, None


class _LogisticBitsTotal(torch.autograd.Function):
    """:class:`_LogisticBits` summed over many tensors as one autograd node: ``apply(T, *coeffs, *steps)``.

    Coefficients may have any shape (the parameters themselves: their gradient then needs
    no reshaping, and autograd accumulates the model's gradient into it in place).
    """

    @staticmethod
    def forward(ctx, count, *tensors):
        need_c, need_s = ctx.needs_input_grad[1:1 + count], ctx.needs_input_grad[1 + count:]
        bits, *saved, ctx.scale = _bits_forward(tensors[:count], tensors[count:], None, need_c, need_s)
        ctx.count, ctx.saved = count, saved
        ctx.save_for_backward(*tensors)
        return bits

    @staticmethod
    @once_differentiable  # no graph through these in-place kernels: create_graph=True gives first-order grads
    @full_precision
    def backward(ctx, grad):
        tensors, count = ctx.saved_tensors, ctx.count
        saved, ctx.saved = ctx.saved, None
        gc, gs = _bits_backward(grad, tensors[:count], tensors[count:], ctx.scale, saved,
                                ctx.needs_input_grad[1:1 + count], ctx.needs_input_grad[1 + count:])
        return (None, *gc, *gs)


def surrogate_bits(coeffs: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Smooth stand-in for the coded size of (num_blocks, P) coefficients with steps (P,): gradient source only.

    The backward holds each position's logistic scale (:func:`_logistic_scale`, from the mean |c| over
    blocks) constant, as a fitted density's parameters are: the gradient is that of the code length
    under the current fit, not the exact derivative of the returned value, which also moves with the
    fit (finite differences along the gradient measured 0.77-0.88x of it on a small MLP).
    """
    return _LogisticBits.apply(coeffs, step, _logistic_scale(coeffs))


def surrogate_bits_total(coeffs: list[torch.Tensor], steps: list[torch.Tensor]) -> torch.Tensor:
    """Sum of :func:`surrogate_bits` over tensors (one autograd node for all of them); its gradient, too,
    treats the per-position logistic scales as constants (see :func:`surrogate_bits`)."""
    return _LogisticBitsTotal.apply(len(coeffs), *coeffs, *steps)


def _storable_flags(ranges: list[tuple[torch.Tensor, torch.Tensor]], steps: list[torch.Tensor]) -> torch.Tensor:
    """Per tensor, on the device (nothing waits for it here): 0 if every integer can be stored, 1 if some
    coefficient is infinite, 2 if some integer reaches :data:`MAX_INTEGER`, 3 if a step is infinite or not
    positive, 4 if a coefficient or a step is NaN. ``ranges``: per-position (min, max) of each tensor's
    integers (NaN propagates through them)."""
    lows = torch.stack([lo.amin().to(torch.float64) for lo, _ in ranges])
    highs = torch.stack([hi.amax().to(torch.float64) for _, hi in ranges])
    largest = torch.maximum(-lows, highs)
    step_nan = torch.stack([torch.isnan(s).any() for s in steps])
    step_bad = torch.stack([(~(s > 0) | torch.isinf(s)).any() for s in steps]) & ~step_nan
    flags = torch.where(largest < MAX_INTEGER, 0, torch.where(torch.isnan(largest), 4, torch.where(torch.isinf(largest), 1, 2)))
    return torch.where(step_bad, 3, torch.where(step_nan, 4, flags))


def _check_storable(flags: list[int], names: list[str] | None) -> list[int]:
    """LscError naming the first tensor whose integers cannot be stored (flags from :func:`_storable_flags`),
    in ``lsc.save``'s words; returns the tensors holding NaN, whose size is NaN (as their decoded weights are)."""
    for t, flag in enumerate(flags):
        if flag in (0, 4):
            continue
        name = names[t] if names is not None else f"tensor {t}"
        if flag == 3:
            raise LscError(f"{name}: the quantization network produced NaN/Inf step sizes (training diverged?)")
        if flag == 1:
            raise LscError(f"{name}: spectral coefficients contain NaN or Inf (training diverged?)")
        raise LscError(f"{name}: a spectral coefficient is too large to store as an integer at this step size")
    return [t for t, flag in enumerate(flags) if flag == 4]


def _without_nan(hard: list[torch.Tensor], ranges: list, nan: list[int]) -> tuple[list, list]:
    """``hard`` and ``ranges`` with the NaN tensors' integers zeroed, so that the histogram can still be sized."""
    hard, ranges = list(hard), list(ranges)
    for t in nan:
        hard[t] = torch.nan_to_num(hard[t], nan=0.0)
        ranges[t] = (hard[t].amin(0), hard[t].amax(0))
    return hard, ranges


def _group_costs(hard: list[torch.Tensor], groups: list[torch.Tensor], num_groups: list[int],
                 ranges: list | None = None, flags: torch.Tensor | None = None,
                 names: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Coded bits of every group of every tensor, concatenated: the cheaper of its table and a uniform code,
    plus its range and mode bit (``hard``: integer-valued (num_blocks, P) tensors); each group's alphabet
    size (a group of one symbol puts nothing in the ANS stream); and the tensors found to hold NaN
    (counted as zeros here; their size is NaN).

    ``ranges[t]``: tensor t's per-position (min, max), when already computed (None: computed here).
    ``flags`` (:func:`_storable_flags`) are read with the histogram's sizes, in the same host
    synchronization, and checked before the sizes are used (a NaN or huge integer makes them garbage):
    unstorable integers raise :class:`lsc.LscError`.
    """
    dev = hard[0].device
    lo, hi = [], []
    for t, (q, g, ng) in enumerate(zip(hard, groups, num_groups)):
        r = ranges[t] if ranges is not None and t < len(ranges) else None
        pmin, pmax = r if r is not None else (q.amin(0), q.amax(0))
        lo.append(torch.full((ng,), float("inf"), device=dev, dtype=q.dtype).scatter_reduce(0, g, pmin, "amin"))
        hi.append(torch.full((ng,), float("-inf"), device=dev, dtype=q.dtype).scatter_reduce(0, g, pmax, "amax"))
    lo_all = torch.cat(lo).to(torch.int64)  # smallest symbol of each group
    width = torch.cat(hi).to(torch.int64) - lo_all + 1  # alphabet size K of each group
    ends = torch.cumsum(width, 0)
    starts = ends - width
    if flags is None:
        bounds = [0] + ends.tolist()  # the host synchronization (sizes the histogram)
    else:
        synced = torch.cat([ends, flags.to(ends.device)]).tolist()  # the same one synchronization
        nan = _check_storable(synced[ends.numel():], names)
        if nan:  # the sizes are garbage: size the NaN tensors as zeros (rare: a second pass)
            costs, width, _ = _group_costs(*_split_nan(hard, groups, num_groups, ranges, nan), None, names)
            return costs, width, nan
        bounds = [0] + synced[:ends.numel()]
    total_bins = bounds[-1]

    numel = sum(q.numel() for q in hard)
    # fine steps (the bins grow as 2^bits): count only the occupied bins, so that memory and time follow
    # the symbols, not the alphabets (24 bits on a 131k-weight layer would be a 112 GB histogram)
    sparse = total_bins > _SPARSE_BINS_PER_SYMBOL * numel
    counts = None if sparse else torch.empty(total_bins, device=dev, dtype=torch.int64)  # every bin is one tensor's
    occupied_bins, occupied_counts = [], []
    group_sizes = torch.zeros(width.numel(), device=dev, dtype=torch.float64)
    goff = 0
    for q, g, ng in zip(hard, groups, num_groups):
        gid = g + goff
        # bin of symbol s at position p: s + base[p], in integers (float32 is exact only below 2^24 bins);
        # a tensor's groups own the contiguous bins [first, last)
        first, last = bounds[goff], bounds[goff + ng]
        local = (q.to(torch.int64) + (starts[gid] - lo_all[gid] - first)).flatten()
        if sparse:  # ascending within the tensor, and the tensors' ranges ascend: the concatenation is sorted
            b, c = torch.unique(local, sorted=True, return_counts=True)
            occupied_bins.append(b + first)
            occupied_counts.append(c)
        else:
            counts[first:last] = torch.bincount(local, minlength=last - first)
        group_sizes.index_add_(0, gid, torch.full_like(gid, q.shape[0], dtype=torch.float64))
        goff += ng
    # Per-bin terms only where they can be nonzero: with fine steps the alphabets are mostly empty
    # bins (at 10 bits: 600k bins for the digits CNN's 150k symbols, 40M for MiniLM's 23M), whose
    # terms are known (0 entropy, a 1-bit count each); finding the occupied ones costs a second
    # sync, only when there are more bins than symbols (otherwise the per-bin work is the smaller).
    bins = None
    if sparse:
        bins, counts = torch.cat(occupied_bins), torch.cat(occupied_counts)
    elif total_bins > numel:
        bins = counts.nonzero().squeeze(1)  # ascending
        counts = counts[bins]
    if bins is not None:
        group_first = torch.searchsorted(bins, starts)  # each group's first occupied bin, as an index into ``bins``
        occupied = torch.diff(group_first, append=group_first.new_full((1,), bins.numel()))
        bin_group = torch.repeat_interleave(torch.arange(width.numel(), device=dev), occupied, output_size=bins.numel())
        empty = width - occupied
    else:
        bin_group = torch.repeat_interleave(torch.arange(width.numel(), device=dev), width, output_size=total_bins)
        empty = 0  # every bin is in ``counts``
    counts = counts.to(torch.float64)

    n_log_n = _xlog2x(group_sizes)
    entropy = n_log_n - torch.zeros_like(n_log_n).index_add_(0, bin_group, _xlog2x(counts))
    # Probability tables: zigzag(lo) and K = hi - lo + 1, then each count in [lo, hi], all Elias-gamma coded.
    table = torch.zeros_like(n_log_n).index_add_(0, bin_group, elias_gamma_bits(counts + 1)) + empty
    range_bits = elias_gamma_bits(zigzag(lo_all) + 1) + elias_gamma_bits(width)
    uniform = group_sizes * torch.log2(width.to(torch.float64))
    # Each group is coded with whichever is cheaper: its own probability table, or a
    # uniform code over [lo, hi] (small groups cannot pay for a table). One flag bit says which.
    return torch.minimum(entropy + table, uniform) + range_bits + 1, width, []


def _split_nan(hard, groups, num_groups, ranges, nan):
    """:func:`_group_costs`' first arguments with the NaN tensors zeroed (see :func:`_without_nan`)."""
    hard, ranges = _without_nan(hard, list(ranges or [None] * len(hard)), nan)
    return hard, groups, num_groups, ranges


def _class_splits(hard: list[torch.Tensor], units: list[int]) -> list[tuple[int, list[torch.Tensor], torch.Tensor]]:
    """The row classes the writer would try (:func:`lsc.rowclasses.propose_row_classes`), for every tensor
    that has them: ``[(tensor index, its blocks split by class, label bits)]``, with one host sync for all."""
    proposals = [(t, *propose_row_classes(q, u)) for t, (q, u) in enumerate(zip(hard, units)) if u]
    if not proposals:
        return []
    rows = torch.stack([r for _, _, r in proposals]).tolist()  # the sync: rows per class of every tensor
    out = []
    for (t, labels, _), per_class in zip(proposals, rows):
        used = sum(1 for r in per_class if r)
        if used < 2:
            continue
        blocks_per_row = hard[t].shape[0] // labels.numel()
        perm = torch.sort(labels.repeat_interleave(blocks_per_row), stable=True).indices
        parts = list(hard[t].index_select(0, perm).split([r * blocks_per_row for r in per_class[:used]]))
        out.append((t, parts, elias_gamma_bits(labels + 1).sum()))
    return out


@torch.no_grad()
def exact_bits(coeffs: list[torch.Tensor], steps: list[torch.Tensor], groups: list[torch.Tensor],
               num_groups: list[int], exponents: list[torch.Tensor], scan_orders: list[torch.Tensor],
               units: list[int] | None = None, header_bytes: list[float] | None = None,
               names: list[str] | None = None):
    """Exact coded size per tensor as (data_bits, side_bits) lists of float64 scalars.

    ``coeffs[t]`` has shape (num_blocks, P) and ``steps[t]`` shape (P,); ``groups[t]``
    maps each of the P positions to its group (0..num_groups[t]-1), ``exponents[t]`` is
    the integer step exponent per position and ``scan_orders[t]`` the Morton order in
    which the exponent table is delta-coded. ``units[t]``: the tensor's block rows when it
    may use row classes (:func:`lsc.rowclasses.row_units`), else 0; with it, each tensor
    costs the cheaper of one class and the proposed classes, as the writer chooses.
    ``header_bytes[t]``: the tensor's share of the file header, counted in its side bits
    (default :data:`HEADER_BYTES_PER_TENSOR`). An infinite coefficient or step, or an integer
    too large to store, raises :class:`lsc.LscError` naming the tensor (``names[t]``), as
    ``lsc.save`` would, checked in the synchronization the histogram needs anyway; a tensor
    with a NaN coefficient or step gets a NaN size (as its decoded weight is NaN).
    """
    if not coeffs:
        raise ValueError("no tensors to estimate")
    dev = coeffs[0].device
    hard = [torch.round(c / s) for c, s in zip(coeffs, steps)]
    ranges = [(q.amin(0), q.amax(0)) for q in hard]
    flags = _storable_flags(ranges, steps)
    nan: list[int] = []
    if units is not None and any(units):
        # the row-class proposal reads the integers first (and a NaN would break it): check before it.
        # (It synchronizes anyway: CUDA's bincount sizes its output on the host, and its counts are read.)
        nan = _check_storable(flags.tolist(), names)
        hard, ranges = _without_nan(hard, ranges, nan)
        flags = None
    splits = _class_splits(hard, units) if units is not None else []
    # the class-split tensors go through the same batched pass as pseudo-tensors, after the real ones
    extra = [(q, groups[t], num_groups[t]) for t, parts, _ in splits for q in parts]
    all_hard = hard + [x[0] for x in extra]
    all_groups = list(groups) + [x[1] for x in extra]
    all_ng = list(num_groups) + [x[2] for x in extra]
    cheapest, width, found = _group_costs(all_hard, all_groups, all_ng, ranges, flags, names)
    nan = nan or found
    gstart = [0]
    for ng in all_ng:
        gstart.append(gstart[-1] + ng)
    data_bits, side_bits = [], []
    for t, (e, order, ng) in enumerate(zip(exponents, scan_orders, num_groups)):
        scan = e.to(torch.int64)[order]
        deltas = torch.diff(scan, prepend=torch.zeros(1, device=dev, dtype=torch.int64))
        exp_bits = elias_gamma_bits(zigzag(deltas) + 1).sum()
        data_bits.append(cheapest[gstart[t]: gstart[t + 1]].sum())
        header = HEADER_BYTES_PER_TENSOR if header_bytes is None else header_bytes[t]
        # the ANS coder's flush is paid by streams with something to code: a group of more than one symbol
        flush = torch.where((width[gstart[t]: gstart[t + 1]] > 1).any(), float(STREAM_OVERHEAD_BITS),
                            float(EMPTY_STREAM_BITS))
        side_bits.append(exp_bits + 8 * header + flush)
    at = len(hard)
    for t, parts, label_bits in splits:
        split = cheapest[gstart[at]: gstart[at + len(parts)]].sum() + label_bits
        data_bits[t] = torch.minimum(data_bits[t], split)
        at += len(parts)
    for t in nan:  # NaN coefficients have no size: the value says so, as the decoded weights do
        data_bits[t] = torch.full_like(data_bits[t], float("nan"))
    return data_bits, side_bits


def estimate_rate(coeffs: list[torch.Tensor], steps: list[torch.Tensor], groups: list[torch.Tensor],
                  num_groups: list[int], exponents: list[torch.Tensor], scan_orders: list[torch.Tensor],
                  units: list[int] | None = None, header_bytes: list[float] | None = None,
                  overhead_bytes: float = FILE_OVERHEAD_BYTES, names: list[str] | None = None) -> RateEstimate:
    """Exact coded size as the value, the surrogate's gradient (see :func:`exact_bits` for the arguments;
    ``overhead_bytes``: the header's fixed part, in ``total``)."""
    data, side = exact_bits([c.detach() for c in coeffs], [s.detach() for s in steps], groups, num_groups,
                            [e.detach() for e in exponents], scan_orders, units, header_bytes, names)
    out = []
    for d, c, s in zip(data, coeffs, steps):
        sur = surrogate_bits(c, s)
        out.append(d.to(sur.dtype) + (sur - sur.detach()))
    header_bits = None if header_bytes is None else [8.0 * h for h in header_bytes]
    return RateEstimate(out, [x.to(coeffs[0].dtype) for x in side], header_bits, overhead_bytes)
