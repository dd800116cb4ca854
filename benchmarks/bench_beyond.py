"""Issue 8 benchmarks: DCT vs wavelet, plain vs low-rank, buffers on/off, size-target accuracy.

    python benchmarks/bench_beyond.py            # digits + MiniLM, writes benchmarks/results/beyond.md
    python benchmarks/bench_beyond.py --part digits

Digits CNN (151k params): every configuration is fine-tuned for the same short
budget with :class:`lsc.RateController` aiming at the same file sizes, so rows
compare accuracy at equal size, and "bytes at equal quality" interpolates (in log
size) the size each configuration needs to reach the DCT's accuracy.
MiniLM-L6 (22.7M params, CPU only, so post-training): for each configuration the
global bit depth is bisected until held-out embeddings reach the same mean cosine
to the original model (0.99), and the resulting .lsc file sizes are compared.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lsc  # noqa: E402
from lsc.buffers import float_buffers  # noqa: E402
from lsc.zoo import DigitsCNN, evaluate, load_digits_split, train_classifier, train_digits_cnn  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "beyond.md")


def file_size(model) -> int:
    with tempfile.TemporaryDirectory() as d:
        return lsc.save(model, os.path.join(d, "m.lsc"))


# ----------------------------------------------------------------------------- digits

def train(model, data, epochs, q_net=None, ctrl=None, lr=1e-3):
    """Adam on cross-entropy, batch 64; with ``ctrl`` (a RateController) its rate loss is added."""
    return train_classifier(model, data, epochs, extra_params=q_net.parameters() if q_net is not None else (),
                            extra_loss=ctrl.loss if ctrl is not None else None, lr=lr)


def digits_config(base, data, name, target_bytes, epochs):
    model = copy.deepcopy(base)
    transform = {"lowrank": "dct"}.get(name, name)
    factored = ""
    if name == "lowrank":
        infos = lsc.factorize(model, max_error=0.35)
        factored = ", ".join(f"{i.name} r={'x'.join(map(str, i.ranks))}" for i in infos)
    q_net = lsc.spectral(model, init_bits=8, transform=transform)
    steps = epochs * math.ceil(len(data[0]) / 64)
    ctrl = lsc.RateController(model, target_bytes=target_bytes, total_steps=steps)
    t0 = time.time()
    train(model, data, epochs, q_net, ctrl)
    before = ctrl.relative_error()
    ctrl.finalize()
    size = file_size(model)
    ev = evaluate(model, data[2], data[3])
    return dict(config=name, target=target_bytes, bytes=size, err_before_finalize=before,
                target_err=size / target_bytes - 1, acc=ev["accuracy"], nll=ev["nll"],
                seconds=time.time() - t0, factored=factored)


class DigitsBN(nn.Module):
    """DigitsCNN with BatchNorm after each convolution (for the buffer rows)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def buffers_rows(data, epochs):
    torch.manual_seed(0)
    base = train(DigitsBN(), data, epochs=15)
    ref = evaluate(base, data[2], data[3])
    model = copy.deepcopy(base)
    q_net = lsc.spectral(model, init_bits=8)
    steps = epochs * math.ceil(len(data[0]) / 64)
    ctrl = lsc.RateController(model, target_bits_per_weight=1.0, total_steps=steps)
    train(model, data, epochs, q_net, ctrl)
    ctrl.finalize()
    model.eval()
    with torch.no_grad():
        logits = model(data[2])
    off = evaluate(model, data[2], data[3])
    size_off = file_size(model)
    info = lsc.file_info(lsc.compress_weights(model))
    bufs = float_buffers(model)
    raw_buffer_bytes = sum(r["bytes"] for r in info["rows"] if r["name"] in bufs)
    tol = lsc.choose_buffer_tolerance(model, data[2], max_rel_error=1e-3)
    q = lsc.quantize_buffers_(model, tol)
    with torch.no_grad():
        rel = float((model(data[2]) - logits).norm() / logits.norm())
    on = evaluate(model, data[2], data[3])
    header = 40 * len(bufs)  # the codec's per-tensor header entries the blob replaces by one
    size_on = size_off - raw_buffer_bytes - header + q["compressed_bytes"] + 40
    return dict(ref=ref, off=off, on=on, size_off=size_off, size_on=size_on, raw_buffer_bytes=raw_buffer_bytes,
                blob=q["compressed_bytes"], float32_bytes=q["raw_bytes"], tol=tol, rel=rel, n=len(bufs))


# ----------------------------------------------------------------------------- MiniLM

def minilm_rows(configs, n_sent=128, target_cos=0.99):
    from minilm import cosine_metrics, embed, kjv_split, load_minilm
    base, tok = load_minilm()
    _, held = kjv_split()
    sents = held[:n_sent]
    ref = embed(base, tok, sents)
    rows = []
    for name in configs:
        t0 = time.time()
        model = copy.deepcopy(base)
        factored = ""
        if name.startswith("lowrank"):
            infos = lsc.factorize(model, max_error=float(name.split("@")[1]))
            factored = f"{len(infos)} weights factored"
        transform = "dct" if name.startswith("lowrank") else name
        q_net = lsc.spectral(model, init_bits=8, transform=transform)
        model.eval()

        def quality(bits):
            q_net.init_bits = bits
            with torch.no_grad(), parametrize.cached():
                return cosine_metrics(ref, embed(model, tok, sents))["mean_cos"]

        lo, hi = 2.0, 14.0  # bisect the global bit depth for equal quality
        for _ in range(7):
            mid = (lo + hi) / 2
            if quality(mid) >= target_cos:
                hi = mid
            else:
                lo = mid
        cos = quality(hi)
        size = file_size(model)
        rows.append(dict(config=name, bits=hi, cos=cos, bytes=size, factored=factored, seconds=time.time() - t0))
        print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------- report

def _interp_bytes_at(rows, acc):
    """Bytes needed to reach accuracy ``acc``, interpolated in log size between the measured points."""
    pts = sorted((r["bytes"], r["acc"]) for r in rows)
    for (b0, a0), (b1, a1) in zip(pts, pts[1:]):
        if min(a0, a1) <= acc <= max(a0, a1) and a0 != a1:
            t = (acc - a0) / (a1 - a0)
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    if pts and all(a >= acc for _, a in pts):
        return float(pts[0][0])  # already there at the smallest size: an upper bound
    return float("nan")


def write_report(digits, buffers, minilm, base_acc, path=RESULTS):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    out = ["# Beyond the original: wavelets, low-rank, buffers, size target", "",
           "Generated by `python benchmarks/bench_beyond.py` (CPU, 1 thread).", ""]
    if digits:
        out += ["## Digits CNN (151k weights), fine-tuned with a size target", "",
                f"Uncompressed float32 model: {4 * sum(p.numel() for p in DigitsCNN().parameters())} bytes, "
                f"test accuracy {base_acc:.4f}. Each row: "
                "`lsc.RateController(target_bytes=...)`, same fine-tune budget, then `finalize()` and `lsc.save`.", "",
                "| config | target bytes | file bytes | file vs target | before finalize | test acc | test NLL |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for r in digits:
            out.append(f"| {r['config']} | {r['target']} | {r['bytes']} | {100 * r['target_err']:+.2f}% | "
                       f"{100 * r['err_before_finalize']:+.1f}% | {r['acc']:.4f} | {r['nll']:.4f} |")
        by = {}
        for r in digits:
            by.setdefault(r["config"], []).append(r)
        ref_acc = min(r["acc"] for r in by["dct"])
        out += ["", f"Equal quality (test accuracy {ref_acc:.4f}, the DCT's worst point), bytes needed, "
                "log-interpolated between the measured sizes:", "",
                "| config | bytes at equal accuracy | vs DCT |", "|---|---:|---:|"]
        dct_b = _interp_bytes_at(by["dct"], ref_acc)
        for name, rows in by.items():
            b = _interp_bytes_at(rows, ref_acc)
            if math.isnan(b):
                out.append(f"| {name} | not reached at the sizes measured (> {max(r['bytes'] for r in rows)}) | worse |")
            else:
                out.append(f"| {name} | {b:.0f} | {100 * (b / dct_b - 1):+.1f}% |")
        lr = [r for r in digits if r["factored"]]
        if lr:
            out += ["", f"Low-rank factors (max_error=0.35): {lr[0]['factored']}."]
        worst = max(abs(r["target_err"]) for r in digits)
        out += ["", f"Size target: worst |file / target - 1| over {len(digits)} runs: {100 * worst:.2f}% (requirement: 5%).", ""]
    if buffers:
        b = buffers
        out += ["## BatchNorm buffers (digits CNN + BatchNorm, 1.0 bit/weight target)", "",
                f"Tolerance chosen by `lsc.choose_buffer_tolerance(max_rel_error=1e-3)`: {b['tol']:.2e} "
                f"(relative logit change {b['rel']:.1e}).", "",
                "| buffers | file bytes | buffer bytes | test acc | test NLL |", "|---|---:|---:|---:|---:|",
                f"| raw (codec default) | {b['size_off']} | {b['raw_buffer_bytes']} (+{40 * b['n']} header) | "
                f"{b['off']['accuracy']:.4f} | {b['off']['nll']:.4f} |",
                f"| quantized (`lsc.encode_buffers`) | {b['size_on']} | {b['blob']} | {b['on']['accuracy']:.4f} | "
                f"{b['on']['nll']:.4f} |", "",
                f"{b['n']} float buffers, {b['float32_bytes']} bytes as float32; saved "
                f"{b['size_off'] - b['size_on']} bytes ({100 * (1 - b['size_on'] / b['size_off']):.1f}% of the file). "
                "Quantized file size = measured file minus the raw buffer streams plus the blob "
                "(the codec does not embed the blob yet).", ""]
    if minilm:
        dct = next(r for r in minilm if r["config"] == "dct")
        out += ["## MiniLM-L6 (22.7M weights), post-training, equal quality", "",
                "Global bit depth bisected (7 steps) until the mean cosine of 128 held-out sentence embeddings "
                "to the float model is >= 0.99.", "",
                "| config | bits | mean cos | file bytes | vs DCT | note |", "|---|---:|---:|---:|---:|---|"]
        for r in minilm:
            out.append(f"| {r['config']} | {r['bits']:.2f} | {r['cos']:.4f} | {r['bytes']} | "
                       f"{100 * (r['bytes'] / dct['bytes'] - 1):+.1f}% | {r['factored']} |")
        out.append("")
    with open(path, "w") as f:
        f.write("\n".join(out))
    print("\n".join(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all", choices=["all", "digits", "minilm"])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    digits, buffers, minilm, base_acc = [], None, [], float("nan")
    if args.part in ("all", "digits"):
        data = load_digits_split()
        base = train_digits_cnn(epochs=20)
        base_acc = evaluate(base, data[2], data[3])["accuracy"]
        for target in (12000, 24000):
            for name in ("dct", "wavelet", "wavelet53", "lowrank"):
                digits.append(digits_config(base, data, name, target, args.epochs))
                print(digits[-1], flush=True)
        buffers = buffers_rows(data, args.epochs)
        print(buffers, flush=True)
    if args.part in ("all", "minilm"):
        minilm = minilm_rows(["dct", "wavelet", "wavelet53", "lowrank@0.3", "lowrank@0.1"])
    write_report(digits, buffers, minilm, base_acc)


if __name__ == "__main__":
    main()
