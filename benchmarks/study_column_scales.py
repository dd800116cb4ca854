"""Would per-input-column step sizes shrink MiniLM's calibrated post-training files? (Measured: no.)

Activation-aware quantization gives the input channels a layer reads most strongly finer
steps. lsc has one step per in-block frequency per tensor; a per-column scale would need a
new field in the format and the parametrization. Before building that, this study simulates
it exactly: each Linear weight is scaled in place, ``W' = W diag(s)`` with ``s_j = H_jj^(a/2)``
from its calibration Hessian ``H = X^T X`` (geometric mean 1, so the tensor keeps its size),
the Hessian is rescaled to ``diag(1/s) H diag(1/s)`` (the same output error for the same
weight error), the model goes through the calibrated post-training pipeline of
``run_all.py`` (sensitivities, error feedback, token counts), and the decoded weights are
divided by ``s`` again before the held-out verses are scored. ``a = 0`` is lsc as it is;
``a = 1`` is the high-rate optimum for plain rounding (equal output error per column).
The scales themselves (one per input feature) are not counted in the bytes.

Usage: python benchmarks/study_column_scales.py [--targets 0.008 0.01 0.0125 0.016] [--powers 0 0.5 1]
(~2 min of calibration, then ~25 s per point on 2 cores; prints one line per point.)
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "src", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def column_scales(hessians: Mapping[str, torch.Tensor], power: float) -> dict[str, torch.Tensor]:
    """``{name: s}`` with ``s_j = H_jj^(power/2)`` scaled to geometric mean 1, for every matrix Hessian."""
    out = {}
    for name, h in hessians.items():
        if h.dim() != 2 or power == 0:
            continue
        d = h.diagonal().double()
        s = d.clamp_min(1e-12 * float(d.mean())) ** (power / 2)
        out[name] = s / s.log().mean().exp()
    return out


@torch.no_grad()
def scale_model(params: Mapping[str, torch.Tensor], hessians: Mapping[str, torch.Tensor],
                scales: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scale each weight's input columns by ``s`` in place; return the Hessians of the scaled weights
    (``diag(1/s) H diag(1/s)``: a weight error ``E'`` of the scaled weight then costs what ``E' / s`` costs)."""
    out = dict(hessians)
    for name, s in scales.items():
        params[name].mul_(s.to(params[name].dtype))
        out[name] = (hessians[name].double() / (s[:, None] * s[None, :])).to(hessians[name].dtype)
    return out


def unscale(state_dict: Mapping[str, torch.Tensor], scales: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoded weights of the original model: each scaled weight's columns divided by ``s``."""
    return {k: (v / scales[k].to(v.dtype) if k in scales else v) for k, v in state_dict.items()}


def main(argv=None):
    import lsc
    from benchmarks.lsc_minilm import calibration_hessians, calibration_sensitivity, token_counts
    from benchmarks.minilm import WORD_EMBEDDINGS, cosine_metrics, embed, kjv_split, load_minilm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.008, 0.01, 0.0125, 0.016])
    ap.add_argument("--powers", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--heldout", type=int, default=256)
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model, tok = load_minilm()
    train, held = kjv_split()
    held = held[:a.heldout]
    ref = embed(model, tok, held, max_length=64)
    sens = calibration_sensitivity(model, tok, train)
    hessians = calibration_hessians(model, tok, train)
    hessians[WORD_EMBEDDINGS] = token_counts(tok, train)
    with tempfile.TemporaryDirectory() as tmp:
        for target in a.targets:
            for power in a.powers:
                student = copy.deepcopy(model)
                scales = column_scales(hessians, power)
                h = scale_model(dict(student.named_parameters()), hessians, scales)
                trial = lsc.compress_posttraining(copy.deepcopy(student), max_error=lsc.allocate_error_bounds(sens, target),
                                                  hessians=h, progress=False)
                bounds = lsc.allocate_error_bounds(sens, target, feedback=trial.feedback_ratios)
                path = Path(tmp) / "point.lsc"
                lsc.compress_posttraining(student, max_error=bounds, hessians=h, path=path, progress=False)
                plain, _ = load_minilm()
                plain.load_state_dict(unscale(lsc.load(path), scales), strict=False)
                m = cosine_metrics(ref, embed(plain, tok, held, max_length=64))
                print(f"target {target:<7g} a {power:<4g} {path.stat().st_size:>11,} B  held-out mean cos "
                      f"{m['mean_cos']:.5f}  min {m['min_cos']:.4f}  ({sum(s.numel() for s in scales.values())} scales "
                      "not counted)", flush=True)


if __name__ == "__main__":
    main()
