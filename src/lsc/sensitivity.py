"""Calibrated error bounds for post-training compression: spend bits where the output needs them.

``compress_posttraining(max_error=E)`` gives every tensor the same relative error E.
Tensors differ a lot in how much that error moves the model's output: on MiniLM the
attention value projection of the last layer is ~500x more sensitive per weight than the
word-embedding table. With a few forward passes on calibration data this module measures
each tensor's sensitivity and turns a budget on the *output* distortion into per-tensor
bounds:

* :func:`measure_sensitivity`: add noise of relative norm ``probe`` to one tensor at a
  time and record ``s_t = (distortion - distortion_of_the_original) / probe**2``. For small
  errors the distortion of a quantized model is about ``sum_t s_t * e_t**2`` (errors of
  different tensors are independent and add, as in HAWQ-style sensitivity analysis).
* :func:`allocate_error_bounds`: minimize the coded size ``sum_t n_t * log2(1 / e_t)``
  (high-rate theory: each halving of the error costs one bit per weight) subject to
  ``sum_t s_t * e_t**2 = target``. The Lagrangian gives ``e_t**2 = c * n_t / s_t``, with
  ``c`` set by the target and bounds capped at ``max_bound`` (water-filling).

The result is a ``{name: bound}`` dict that ``compress_posttraining(max_error=...)`` takes
as is. Only tensors of rank >= 2 are probed: biases and norm scales are ~0.1% of a model's
weights and keep ``compress_posttraining``'s rule for vectors (``default / 20``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import nn

from .convert import selected_parameters
from .errors import LscError
from .posttraining import _progress
from .wrappers import unwrap

__all__ = ["TensorSensitivity", "measure_sensitivity", "allocate_error_bounds", "predicted_distortion"]


class TensorSensitivity(NamedTuple):
    """Output distortion per squared relative error of one tensor, and its number of weights."""

    per_error2: float
    numel: int


def _distortion(fn: Callable[[nn.Module], float], model: nn.Module, what: str) -> float:
    value = fn(model)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise LscError(f"distortion(model) must return a number, got {type(value).__name__} ({what})") from None
    if not math.isfinite(value):
        raise LscError(f"distortion(model) returned {value} ({what})")
    return value


@torch.no_grad()
def measure_sensitivity(model: nn.Module, distortion: Callable[[nn.Module], float], *, probe=0.05,
                        include=None, exclude=None, seed: int = 0,
                        progress: bool | None = None) -> dict[str, TensorSensitivity]:
    """Sensitivity of ``distortion(model)`` to a relative error in each tensor of rank >= 2.

    ``distortion(model) -> float`` measures how far the model's output is from the
    original's on calibration data (e.g. 1 - mean cosine to the original embeddings, or
    the KL divergence to the original logits); it is called once on the model as it is
    and once per probed tensor (under ``torch.no_grad``). Each tensor is restored bit for bit after its probe, also
    when ``distortion`` raises. ``include`` / ``exclude`` select tensors as in
    :func:`lsc.spectral`. Noise comes from a private generator (``seed``): the global
    random state is not touched.

    ``probe`` is the relative norm of the noise: one number, or a ``{name: bound}`` dict such
    as the result of :func:`allocate_error_bounds`. Probing each tensor at the error it
    will get measures its sensitivity where it matters: the distortion grows faster than
    ``e**2`` at large errors, so a second pass, ``measure_sensitivity(model, distortion,
    probe=bounds)`` then ``allocate_error_bounds`` again, corrects over-generous bounds.
    """
    if not callable(distortion):
        raise LscError(f"distortion must be a function distortion(model) -> float (how far the model's output is from "
                       f"the original's on calibration data), got {type(distortion).__name__}")
    if getattr(model, "_lsc", None) is not None:
        raise LscError("model is already a spectral model: measure the sensitivity of the original model, "
                       "then compress it with compress_posttraining(model, max_error=bounds)")
    # named as the bare model names them (compress_posttraining's keys), also through a torch.compile wrapper
    chosen = [(name, p) for name, _, _, p, _ in selected_parameters(unwrap(model), include, exclude) if p.dim() >= 2]
    if not chosen:
        raise LscError("no floating-point tensors of rank >= 2 selected: nothing to measure (check include/exclude)")
    probes = {}
    for name, _ in chosen:
        e = probe.get(name, probe.get("default", 0.05)) if isinstance(probe, Mapping) else probe
        if isinstance(e, bool) or not (isinstance(e, (int, float)) and 0 < e <= 1):
            raise LscError(f"probe={e!r} for {name} must be in (0, 1]: the relative norm of the noise added to it")
        probes[name] = float(e)
    base = _distortion(distortion, model, "the model as it is")
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for name, p in _progress(chosen, len(chosen), "measuring sensitivity", progress):
        original = p.detach().clone()
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(device=p.device)
        norm = float(noise.norm())
        scale = probes[name] * float(original.float().norm()) / max(norm, 1e-30)
        try:
            p.add_((noise * scale).to(p.dtype))
            d = _distortion(distortion, model, f"with {name} perturbed")
        finally:
            p.copy_(original)
        out[name] = TensorSensitivity(max(d - base, 0.0) / probes[name] ** 2, p.numel())
    return out


def predicted_distortion(sensitivity: Mapping[str, TensorSensitivity], bounds: Mapping[str, float], *,
                         feedback: Mapping[str, float] | None = None) -> float:
    """``sum_t r_t * s_t * e_t**2``: the distortion the sensitivity model predicts for these bounds
    (``r_t``: ``feedback`` ratios as in :func:`allocate_error_bounds`, 1 without)."""
    return sum(s.per_error2 * float(bounds[name]) ** 2
               for name, s in _with_feedback(sensitivity, feedback).items() if name in bounds)


def _with_feedback(sensitivity: Mapping[str, TensorSensitivity], feedback: Mapping[str, float] | None):
    """``sensitivity`` with each tensor's ``s_t`` times its feedback ratio ``r_t`` (checked), if any."""
    if not feedback:
        return sensitivity
    for name, r in feedback.items():
        if not (isinstance(r, (int, float)) and 0 <= r < math.inf):
            raise LscError(f"feedback[{name!r}]={r!r} must be a finite number >= 0 (an output error ratio)")
    return {name: TensorSensitivity(s.per_error2 * float(feedback.get(name, 1.0)), s.numel)
            for name, s in sensitivity.items()}


def allocate_error_bounds(sensitivity: Mapping[str, TensorSensitivity], target: float, *, max_bound: float = 0.5,
                          default: float = 0.05, feedback: Mapping[str, float] | None = None) -> dict[str, float]:
    """Per-tensor relative error bounds of the smallest file whose predicted distortion is ``target``.

    ``e_t = sqrt(c * n_t / s_t)``, at most ``max_bound`` (beyond about 0.5 a tensor is
    mostly zeros and the small-error model no longer holds). Returns ``{name: e_t}`` plus
    ``"default": default`` for the tensors that were not measured (vectors).

    ``feedback``: ``{name: r_t}``, the output error that error feedback leaves per unit of
    plain rounding's (``PostTrainingResult.feedback_ratios`` of a trial compression with
    ``hessians``); each such tensor's sensitivity is taken as ``r_t * s_t``, so the bounds
    (which choose the step by plain rounding's error) are for compressing with feedback.
    """
    sensitivity = _with_feedback(sensitivity, feedback)
    if not (target > 0 and math.isfinite(target)):
        raise LscError(f"target={target} must be a positive number: the allowed output distortion")
    if not (0 < max_bound <= 1):
        raise LscError(f"max_bound={max_bound} must be in (0, 1]")
    if not (0 <= default < math.inf):
        raise LscError(f"default={default} must be a finite number >= 0 (the bound of tensors not measured)")
    if not sensitivity:
        raise LscError("sensitivity is empty: measure it first with lsc.measure_sensitivity")
    floor = 1e-12 * max(max(s.per_error2 / max(s.numel, 1) for s in sensitivity.values()), 1e-30)
    weight = {name: max(s.per_error2 / max(s.numel, 1), floor) for name, s in sensitivity.items()}  # s_t / n_t
    # a tensor the distortion does not see costs nothing at the cap: it must not take a share of the budget
    capped: set[str] = {n for n, s in sensitivity.items() if s.per_error2 <= 0}
    bounds: dict[str, float] = {}
    while True:  # water-filling: tensors at the cap spend their share; the rest split what is left
        free = [n for n in sensitivity if n not in capped]
        spent = sum(sensitivity[n].per_error2 * max_bound ** 2 for n in capped)
        budget = target - spent
        total = sum(sensitivity[n].numel for n in free)
        c = budget / total if free and budget > 0 else math.inf
        new = {n for n in free if c / weight[n] >= max_bound ** 2}
        if not new:
            break
        capped |= new
    for name in sensitivity:
        bounds[name] = max_bound if name in capped else math.sqrt(c / weight[name])
    bounds["default"] = float(default)
    return bounds
