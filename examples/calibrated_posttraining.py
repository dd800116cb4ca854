"""Post-training compression with calibrated per-tensor bounds, on the bundled digits data.

    python examples/calibrated_posttraining.py [--target 3e-4] [--out digits.lsc]

One error bound for every tensor (``max_error=0.2``) against bounds calibrated on
the training images: the KL divergence from the original model's predictions is the
distortion, ``lsc.measure_sensitivity`` probes each weight matrix once, and
``lsc.allocate_error_bounds`` spends the bits where that divergence needs them. A
second pass probes each tensor at its bound. A third file adds error feedback: each
layer is quantized so that its output on the training images stays close
(``lsc.collect_hessians``, ``hessians=``), which lets the bounds go coarser (cap 0.85).
Prints size and test accuracy of every file, decoded from the bytes written. About 30 s
on one CPU core, most of it training the CNN.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch

import lsc
from lsc.zoo import DigitsCNN, evaluate, load_digits_split, train_digits_cnn


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=3e-4, help="allowed KL divergence from the original predictions")
    ap.add_argument("--out", default=None, help="where to write the calibrated file (default: a temporary file)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--feedback-target", type=float, default=3e-3, help="KL target of the error-feedback file")
    args = ap.parse_args(argv)

    xtr, ytr, xte, yte = load_digits_split()
    model = train_digits_cnn(epochs=args.epochs).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(xtr), -1)

    @torch.no_grad()
    def kl(m):  # how far m's predictions on the training images are from the original's
        return float((ref.exp() * (ref - torch.log_softmax(m(xtr), -1))).sum(-1).mean())

    first_pass = lsc.measure_sensitivity(model, kl, progress=False)  # seeded: the same probes serve both files
    bounds = lsc.allocate_error_bounds(first_pass, args.target)
    sens = lsc.measure_sensitivity(model, kl, probe=bounds, progress=False)  # second pass, at the bounds
    bounds = lsc.allocate_error_bounds(sens, args.target)

    # error feedback: the layers' inputs, a trial compression that measures how much output error it removes,
    # and bounds re-allocated for it (feedback tolerates much coarser bounds: cap 0.85 instead of 0.5)
    hessians = lsc.collect_hessians(model, lambda m: m(xtr))
    fb_bounds = lsc.allocate_error_bounds(first_pass, args.feedback_target, max_bound=0.85)
    fb_sens = lsc.measure_sensitivity(model, kl, probe=fb_bounds, progress=False)
    fb_bounds = lsc.allocate_error_bounds(fb_sens, args.feedback_target, max_bound=0.85)
    trial = lsc.compress_posttraining(copy.deepcopy(model), max_error=fb_bounds, hessians=hessians, progress=False)
    fb_bounds = lsc.allocate_error_bounds(fb_sens, args.feedback_target, max_bound=0.85, feedback=trial.feedback_ratios)

    fp32 = evaluate(model, xte, yte)["accuracy"]
    print(f"fp32: {4 * sum(p.numel() for p in model.parameters()):,} B, test accuracy {fp32:.2%}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, max_error, hess in (("one bound (0.2)", 0.2, None), (f"calibrated (KL {args.target:g})", bounds, None),
                                       (f"+ error feedback (KL {args.feedback_target:g})", fb_bounds, hessians)):
            path = args.out if args.out and max_error is bounds else os.path.join(tmp, "m.lsc")
            lsc.compress_posttraining(copy.deepcopy(model), max_error=max_error, hessians=hess, path=path, progress=False)
            acc = evaluate(lsc.load(path, DigitsCNN()), xte, yte)["accuracy"]
            results[label] = (os.path.getsize(path), acc)
            print(f"{label:<28} {os.path.getsize(path):>8,} B  test accuracy {acc:.2%}")
    print("bounds:", ", ".join(f"{k} {v:.3f}" for k, v in bounds.items() if k != "default"))
    return results


if __name__ == "__main__":
    main()
