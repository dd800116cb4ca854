"""A size target: state the file size you want, and training steers the rate term to hit it.

    ctrl = lsc.RateController(model, target_bits_per_weight=1.0, total_steps=len(data))   # or target_bytes=40_000
    for x, y in data:
        loss = task_loss(model(x), y) + ctrl.loss()   # lambda * bits_per_weight, lambda adapted
        ...
    ctrl.finalize()                                    # snap the last few percent, then lsc.save

The rate term's weight ``lambda`` is a Lagrange multiplier updated by dual ascent
on ``log lambda`` each time :meth:`RateController.loss` is called: it grows while
the predicted file is above the target and shrinks while it is below, by
``lr * (size / target - 1)`` in log space (multiplicative steps stay stable across
the many orders of magnitude ``lambda`` may need). Training therefore settles
around the target, but a stochastic optimizer keeps it oscillating by a few
percent, so :meth:`RateController.finalize` closes the gap deterministically: it
shifts every tensor's learned bit allocation by one common offset (the q_net's
per-tensor offsets), bisecting on the shift until the predicted size is on target.
The prediction is the codec's exact size for the compressed tensors (see
:mod:`lsc.rate`) plus, for a target in bytes, the tensors the file stores raw,
measured by encoding them as the writer does (:func:`raw_bytes`), so the saved file
lands on target too; ``finalize(measure=...)`` can also bisect on a real measurement
(e.g. the size of ``lsc.save``'s output).
"""
from __future__ import annotations

import math
import zlib
from typing import Callable

import torch
from torch import nn

from .checks import as_number, is_integer
from .errors import LscError
from .loss import compressed_numel, quantization_loss, rate_estimate, spectral_header
from .state import get_state, spectral_root

__all__ = ["RateController", "raw_bytes", "predicted_file"]


def _raw_stream(key: str, t: torch.Tensor, cache: dict | None) -> tuple[dict, int]:
    """(header entry, stream bytes) of a tensor stored raw, from the writer's own raw encoder (zlib when it
    pays). With ``cache``, a tensor still at the version counter of its last measurement is not encoded again."""
    from .codec.api import _encode_raw

    try:
        sig = (id(t), t._version, tuple(t.shape), t.dtype, t.device)
    except RuntimeError:  # an inference tensor keeps no version counter
        sig = None
    hit = cache.get(key) if cache is not None and sig is not None else None
    if hit is not None and hit[0] == sig:
        return dict(hit[1]), hit[2]
    meta, data = _encode_raw(key, t.detach())
    meta.update(len=len(data), crc=zlib.crc32(data))
    if cache is not None and sig is not None:
        cache[key] = (sig, dict(meta), len(data))
    return meta, len(data)


def raw_entries(model: nn.Module, cache: dict | None = None) -> list[tuple[dict, int]]:
    """(header entry, stream bytes) of every tensor the file stores raw (parameters left out of ``spectral``,
    buffers), in file order, encoded as :func:`lsc.compress_weights` encodes them (a tied tensor once)."""
    from .codec.api import raw_entries as walk

    st = get_state(model)
    covered = {n for e in st.entries for n in (e.name, *e.tied_names)}
    return walk(spectral_root(model), covered, lambda key, t: _raw_stream(key, t, cache))


def raw_bytes(model: nn.Module, cache: dict | None = None) -> int:
    """Bytes the file spends on everything that is not spectrally compressed (raw params and buffers).

    Measured, not estimated: each tensor is encoded with the writer's raw encoder (zlib-coded when that
    is smaller: a causal-mask buffer of 64 KB takes a few hundred bytes), plus what their entries add
    to the compressed file header. So ``bits_per_weight(model) * n / 8 + raw_bytes(model)`` predicts the
    whole file (``n``: the compressed weights). Costs one zlib pass over the raw tensors (with
    ``cache``, a dict kept between calls, only over those changed since).
    """
    raw = raw_entries(model, cache)
    if not raw:
        return 0
    from .codec.api import _header_bytes

    head = spectral_header(get_state(model))
    return sum(n for _, n in raw) + len(_header_bytes(head["metas"] + [m for m, _ in raw])) - head["bytes"]


@torch.no_grad()
def predicted_file(model: nn.Module, estimate=None) -> dict:
    """The whole-file prediction part by part, in bytes, as ``lsc.file_info`` splits the real file:
    ``{"spectral": {name: stream}, "raw": {name: stream}, "header": prefix + compressed header,
    "total": their sum}``. Spectral streams are the exact rate estimate's (``estimate``, from
    :func:`lsc.rate_estimate`, when already computed) without the header shares it carries; raw
    streams are measured by encoding them; the header is that of the predicted file (its entries
    as the writer builds them, stand-ins where only the encoder knows a field)."""
    from .codec.api import _header_bytes

    st = get_state(model)
    est = rate_estimate(model) if estimate is None else estimate
    spectral = {e.name: float(b) / 8 for e, b in zip(st.entries, est.streams)}
    raw = raw_entries(model)
    head = spectral_header(st)
    header = float(len(_header_bytes(head["metas"] + [m for m, _ in raw]))) if raw else float(head["bytes"])
    raw_sizes = {m["name"]: float(n) for m, n in raw}
    return dict(spectral=spectral, raw=raw_sizes, header=header,
                total=sum(spectral.values()) + sum(raw_sizes.values()) + header)


def _check_knobs(*, total_steps, ramp, init_weight, lr, gain, horizon, tolerance, min_weight, max_weight) -> None:
    """Refuse controller settings that would make it diverge or do nothing, naming the setting."""
    def finite(name, value, low, low_ok, high=math.inf, high_ok=True):
        v = as_number(value)
        if not (math.isfinite(v) and (v >= low if low_ok else v > low) and (v <= high if high_ok else v < high)):
            bound = ("[" if low_ok else "(") + f"{low:g}, " + (f"{high:g}" + ("]" if high_ok else ")") if math.isfinite(high) else "inf)")
            raise LscError(f"RateController: {name} must be in {bound}, got {value!r}")
    if total_steps is not None and (not is_integer(total_steps) or total_steps < 1):
        raise LscError(f"RateController: total_steps must be a positive integer (or None), got {total_steps!r}")
    finite("ramp", ramp, 0, True, 1, True)
    if init_weight is not None:
        finite("init_weight", init_weight, 0, True)
    finite("lr", lr, 0, False)
    finite("gain", gain, 0, True)
    finite("horizon", horizon, 0, True)
    finite("tolerance", tolerance, 0, False)
    finite("min_weight", min_weight, 0, False)
    finite("max_weight", max_weight, float(min_weight), True)


class RateController:
    """Dual-ascent control of the rate weight so the compressed model hits a size target.

    Args:
        model: a spectral model (after :func:`lsc.spectral`).
        target_bits_per_weight: target of :func:`lsc.bits_per_weight` (bits per compressed weight).
        target_bytes: target size of the whole file in bytes (compressed tensors plus raw
            tensors, as measured by :func:`raw_bytes`; re-measured at each exact size refresh
            of :meth:`loss`, since trained raw parameters and running statistics change what
            zlib makes of them). Give exactly one of the two.
        init_weight: starting lambda (default: the ``rate_weight`` given to ``lsc.spectral``).
        total_steps: number of training steps planned (optimizer steps: with gradient accumulation,
            call :meth:`loss` with ``update=False`` on all micro-batches but one); the reference size then
            moves geometrically from the starting size to the target over the first ``ramp`` fraction of
            them (a moving target the optimizer can follow, instead of a jump that makes lambda wind up).
            Without it, the reference falls from the starting size by at most half every 50 steps.
        lr: dual-ascent (integral) step on log lambda per call, times the log size error.
        gain: proportional gain: the loss uses ``lambda * exp(gain * error)``.
        horizon: derivative term: the error is that of the size projected ``horizon`` steps ahead
            along its recent trend, so lambda stops growing once the size is falling fast enough.
        tolerance: the relative size error :meth:`finalize` must reach (0.05 = +-5%).
        min_weight / max_weight: clamp for lambda.
    """

    def __init__(self, model: nn.Module, target_bits_per_weight: float | None = None, target_bytes: float | None = None,
                 *, total_steps: int | None = None, ramp: float = 0.5, init_weight: float | None = None,
                 lr: float = 0.1, gain: float = 2.0, horizon: float = 20.0, tolerance: float = 0.05,
                 min_weight: float = 1e-6, max_weight: float = 1e6):
        if (target_bits_per_weight is None) == (target_bytes is None):
            raise LscError("give exactly one of target_bits_per_weight and target_bytes")
        _check_knobs(total_steps=total_steps, ramp=ramp, init_weight=init_weight, lr=lr, gain=gain, horizon=horizon,
                     tolerance=tolerance, min_weight=min_weight, max_weight=max_weight)
        self.model = model
        self.state = get_state(model)
        self.numel = compressed_numel(model)
        self._raw_cache: dict = {}  # raw tensors' measurements, kept while they do not change
        if target_bytes is not None:
            raw = self._raw_bytes(fresh=True)
            spectral_bits = 8.0 * (float(target_bytes) - raw)
            if spectral_bits <= 0:
                raise LscError(f"target of {target_bytes} bytes is below the {raw} bytes the file spends on the "
                               "tensors it stores without spectral compression (raw parameters and buffers)")
            self.target_bpw = spectral_bits / self.numel
        else:
            self.target_bpw = float(target_bits_per_weight)
        if not self.target_bpw > 0:
            raise LscError("the size target must be positive")
        self.target_bytes = None if target_bytes is None else float(target_bytes)
        w0 = self.state.rate_weight if init_weight is None else float(init_weight)
        self.log_weight = math.log(max(w0, min_weight))
        self.lr = float(lr)
        self.gain = float(gain)
        self.horizon = float(horizon)
        self.slope = 0.0
        self.ramp_steps = int(total_steps * ramp) if total_steps else 0
        self.start_bpw: float | None = None
        self.steps = 0
        self.error = 0.0
        self.tolerance = float(tolerance)
        self.min_weight, self.max_weight = float(min_weight), float(max_weight)
        self.last_bpw: float | None = None
        self.history: list[tuple[float, float]] = []  # (bits per weight, lambda) per step

    @property
    def weight(self) -> float:
        """The current rate weight: lambda (the integral term) times the proportional correction."""
        return math.exp(min(max(self.log_weight + self.gain * self.error, math.log(self.min_weight)),
                            math.log(self.max_weight)))

    def reference(self) -> float:
        """The bits per weight aimed at now: the target, approached geometrically during the ramp. Without
        ``total_steps``, a reference below the starting size falls by at most half every
        ``HALVING_STEPS`` steps: a target far below the start reached in one jump makes lambda wind up,
        overshoot and leave the model stuck far below it."""
        if self.start_bpw is None:
            return self.target_bpw
        if not self.ramp_steps:
            if self.target_bpw >= self.start_bpw:
                return self.target_bpw
            return max(self.target_bpw, self.start_bpw * 0.5 ** (self.steps / self.HALVING_STEPS))
        if self.steps >= self.ramp_steps:
            return self.target_bpw
        frac = self.steps / self.ramp_steps
        return self.target_bpw * (self.start_bpw / self.target_bpw) ** (1.0 - frac)

    HALVING_STEPS = 50

    def loss(self, update: bool = True) -> torch.Tensor:
        """``weight * bits_per_weight(model)``; updates the weight from this step's size unless ``update=False``.

        The size is :func:`lsc.quantization_loss`'s (the exact size refreshed every
        ``rate_refresh`` steps, tracked by the surrogate in between), not a fresh exact pass
        per step, which would cost MiniLM 0.3-0.9 s of CPU a step. With a target in bytes, the
        tensors stored raw are measured again at those refreshes only (those changed since:
        trained raw parameters, running statistics), and the bits per weight left to the
        compressed tensors follow.
        """
        refreshed = self.state.rate_cache
        bpw = quantization_loss(self.model, weight=1.0)  # like bits_per_weight: the file overhead included
        if self.target_bytes is not None and self.state.rate_cache is not refreshed:
            self._retarget()  # an exact refresh: measure the raw tensors again with it, not every step
        value = float(bpw.detach())
        if update:
            self.step(value)
        return self.weight * bpw

    def step(self, bpw: float) -> None:
        """One controller step given the current predicted bits per weight.

        The error is measured in log space against :meth:`reference`, on the size projected
        ``horizon`` steps ahead along its trend (derivative term); ``log lambda`` integrates
        it (dual ascent) and the weight used in the loss adds a proportional term. An
        optimizer like Adam does not move faster when the weight grows, so without the
        derivative and proportional terms lambda winds up while the size is still falling
        and then overshoots far below the target, where the rate gets stuck.
        """
        if self.start_bpw is None:
            self.start_bpw = bpw
        if self.last_bpw is not None:  # EMA of d log(size) / d step: the derivative term
            self.slope = 0.8 * self.slope + 0.2 * (math.log(max(bpw, 1e-12)) - math.log(max(self.last_bpw, 1e-12)))
        self.last_bpw = bpw
        projected = math.log(max(bpw, 1e-12) / self.reference()) + self.horizon * self.slope
        self.error = max(min(projected, 1.0), -2.0)
        self.log_weight += self.lr * self.error
        self.log_weight = min(max(self.log_weight, math.log(self.min_weight)), math.log(self.max_weight))
        self.steps += 1
        self.history.append((bpw, self.weight))

    # -- resuming
    _SETTINGS = ("target_bpw", "target_bytes", "ramp_steps", "lr", "gain", "horizon", "tolerance", "min_weight",
                 "max_weight")
    _PROGRESS = ("log_weight", "slope", "start_bpw", "steps", "error", "last_bpw", "history")

    def state_dict(self) -> dict:
        """The controller's settings and progress (lambda, its trend, the step count, the history),
        as plain numbers: save it with the model's and the optimizer's state dicts to resume a run
        (``torch.load(weights_only=True)`` reads it back)."""
        out = {name: getattr(self, name) for name in self._SETTINGS + self._PROGRESS}
        out["history"] = [tuple(h) for h in self.history]
        out["numel"] = self.numel
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`: settings and progress both, as PyTorch's LR schedulers do, so a
        resumed run steers exactly as the interrupted one would have."""
        missing = [k for k in self._SETTINGS + self._PROGRESS + ("numel",) if k not in state]
        if missing:
            raise LscError(f"not a RateController state dict: missing {missing}")
        if int(state["numel"]) != self.numel:
            raise LscError(f"the RateController state is for a model with {int(state['numel']):,} compressed weights; "
                           f"this model has {self.numel:,}")
        for name in self._SETTINGS + self._PROGRESS:
            setattr(self, name, state[name])
        self.history = [tuple(h) for h in state["history"]]

    # -- measuring
    def _raw_bytes(self, fresh: bool = False) -> int:
        """:func:`raw_bytes`, encoding again only the raw tensors changed since the last measurement
        (all of them with ``fresh``: an edit through ``.data`` leaves the version counter alone)."""
        if fresh:
            self._raw_cache.clear()
        return raw_bytes(self.model, self._raw_cache)

    def _retarget(self, raw: int | None = None) -> None:
        """Bits per weight left to the compressed tensors by the byte target, after the raw tensors' measured size."""
        raw = self._raw_bytes() if raw is None else raw
        self.target_bpw = max(8.0 * (self.target_bytes - raw), 1e-3 * self.numel) / self.numel

    @torch.no_grad()
    def predicted_bits_per_weight(self) -> float:
        return float(rate_estimate(self.model).total) / self.numel

    def predicted_bytes(self, raw: int | None = None) -> float:
        """Predicted size of the whole file: the compressed tensors' exact size, with their share of the
        header, plus the raw tensors measured now (``raw``: that measurement, when already made)."""
        raw = self._raw_bytes(fresh=True) if raw is None else raw
        return self.predicted_bits_per_weight() * self.numel / 8 + raw

    def relative_error(self, measure: Callable[[nn.Module], float] | None = None, *, raw: int | None = None) -> float:
        """(size - target) / target, on the predicted size or on ``measure(model)`` (bytes)."""
        if measure is None:
            if self.target_bytes is not None:
                return self.predicted_bytes(raw) / self.target_bytes - 1.0
            return self.predicted_bits_per_weight() / self.target_bpw - 1.0
        size = float(measure(self.model))
        if self.target_bytes is not None:
            return size / self.target_bytes - 1.0
        raw = self._raw_bytes(fresh=True) if raw is None else raw
        return size / (self.target_bpw * self.numel / 8 + raw) - 1.0

    # -- landing on target
    @torch.no_grad()
    def _shift(self, base: torch.Tensor, bits) -> None:
        """Set every tensor's bit allocation to ``bits`` (a number, or one value per tensor id) above the one
        q_net had at ``base`` (its per-tensor offsets then): set, not added, so that returning to a shift gives
        the same offsets bit for bit (sums of float32 increments drift across quarter-bit boundaries)."""
        q = self.state.q_net
        shift = torch.as_tensor(bits, dtype=torch.float64, device=base.device) / q.bits_scale
        q.tensor_offset.copy_((base.double() + shift).to(q.tensor_offset.dtype))
        self.state.rate_cache = None  # the tracked size jumped: the next quantization_loss measures it afresh

    @torch.no_grad()
    def _sensitivity_offsets(self, sensitivity) -> torch.Tensor:
        """Per tensor id, bits to add so that the small-error model's marginal distortion per bit is equal.

        With relative error ``e_t`` now and distortion ``s_t * e_t**2 * 4**(-d_t)`` after adding
        ``d_t`` bits (``n_t * d_t`` bits of file), the cheapest distortion for a size change has
        ``d_t = k + log2(s_t * e_t**2 / n_t) / 2``; the offsets are centred so that they cost no
        bits (sum of ``n_t * d_t`` zero), and ``k`` is found by :meth:`finalize`'s bisection.
        Tensors without a measured sensitivity get ``k`` alone.
        """
        q = self.state.q_net
        out = torch.zeros_like(q.tensor_offset, dtype=torch.float64)
        got = []
        for entry in self.state.entries:
            s = sensitivity.get(entry.name)
            if s is None or s.per_error2 <= 0:
                continue
            par, coeffs = entry.parts()
            c = coeffs.detach().to(par.mean.dtype)
            ints, exps = par.integer_state(c)
            step = par.step(exps)
            residual = float((ints.to(c.dtype) * step - c).norm()) * float(par.std)
            norm = math.sqrt(float(par.std) ** 2 * float(c.norm()) ** 2 + par.layout.numel * float(par.mean) ** 2)
            e = max(residual / max(norm, 1e-30), 1e-12)
            got.append((par.tensor_id, par.layout.numel, 0.5 * math.log2(s.per_error2 * e * e / par.layout.numel)))
        if got:
            centre = sum(n * o for _, n, o in got) / sum(n for _, n, _ in got)
            for tid, _, o in got:
                out[tid] = o - centre
        return out

    @torch.no_grad()
    def finalize(self, measure: Callable[[nn.Module], float] | None = None, *, sensitivity=None, max_iter: int = 40,
                 search_bits: float = 12.0) -> float:
        """Shift the bit allocations until the size is on target: bisection on a common shift of up to
        ``search_bits`` either way, stopped within a quarter of the tolerance or after ``max_iter`` steps.

        Without ``sensitivity`` every tensor is shifted by one common amount. With
        ``sensitivity`` (from :func:`lsc.measure_sensitivity` on the original model), each
        tensor is first moved to where its distortion per bit matches the others' (see
        :meth:`_sensitivity_offsets`), then all are shifted together: a cut lands where the
        output cares least. Leaves the model alone if it already is within half the
        tolerance. ``measure`` (``model -> bytes``) replaces the prediction, e.g.
        ``lambda m: lsc.save(m, io.BytesIO())`` (``save`` returns the number of bytes it wrote;
        each call encodes the whole model, up to ``max_iter`` + 1 times). The prediction measures
        the raw tensors once, here, and bisects on the compressed tensors' exact size. Returns
        the relative size error it ends at (:meth:`relative_error`: of the whole file for a
        target in bytes or with ``measure``, of ``bits_per_weight`` otherwise), the smallest
        one seen: outside the tolerance when no shift within ``search_bits`` reaches the target.
        Raises :class:`lsc.LscError` when every tensor is quantized at exponents loaded from a
        file (q_net no longer moves them).
        """
        # measured once: the shifts below move only the compressed tensors
        raw = self._raw_bytes(fresh=True) if self.target_bytes is not None or measure is not None else None
        if self.target_bytes is not None:
            self._retarget(raw)
        err = self.relative_error(measure, raw=raw)
        if abs(err) <= self.tolerance / 2:
            return err
        if all(e.parametrization.frozen_exponent is not None for e in self.state.entries):
            raise LscError("RateController.finalize: every tensor is quantized at exponents loaded from a file "
                           "(lsc.load into a spectral model), which q_net no longer moves; resume from the "
                           "training checkpoint (model.state_dict()) to change the size")
        offsets = self._sensitivity_offsets(sensitivity) if sensitivity else 0.0
        base = self.state.q_net.tensor_offset.detach().clone()
        lo, hi = -search_bits, search_bits  # size grows with the shift
        best = (abs(err), None, err)  # None: no change
        for _ in range(max_iter):
            mid = (lo + hi) / 2
            self._shift(base, offsets + mid)
            err = self.relative_error(measure, raw=raw)
            if abs(err) < best[0]:
                best = (abs(err), offsets + mid, err)
            if abs(err) <= self.tolerance / 4:
                break
            if err > 0:
                hi = mid
            else:
                lo = mid
        if best[1] is None:
            self.state.q_net.tensor_offset.copy_(base)
            self.state.rate_cache = None
        else:
            self._shift(base, best[1])
        return best[2]
