"""lsc rate–accuracy points on the digits CNN (fine-tuned and post-training).

    python benchmarks/bench_rate_accuracy.py [--targets 6000,9000] [--steps 3000]

Each fine-tuned point starts from the same trained fp32 DigitsCNN as every
baseline (``run_baselines.digits_model``), reparameterizes it with
``lsc.spectral``, fine-tunes it with cross-entropy + knowledge distillation from
the fp32 model + ``lsc.RateController(target_bytes=...)``, snaps the size with
``finalize()``, writes the file with ``lsc.save`` and scores the model decoded
by ``lsc.load`` into a fresh ``DigitsCNN`` (so the number is the file's, not
the training model's). Steps and wall time are recorded per point.
"""
from __future__ import annotations

import argparse
import ast
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "src", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import lsc  # noqa: E402
from benchmarks.roundtrip import timed_file_round_trip  # noqa: E402
from lsc.zoo import DigitsCNN, evaluate, load_digits_split  # noqa: E402

# The settings used for the published points (see BENCHMARKS.md).
DIGITS_CONFIG = dict(block_size=8, init_bits=6.0, min_group_symbols=1024, lr=3e-3, qnet_lr=1e-2,
                     kd_weight=1.0, temperature=2.0, batch_size=128, ramp=0.6)
DIGITS_TARGETS = [5000, 6000, 8000, 12000]
DIGITS_STEPS = 3000


def file_bytes_and_model(model, cls=DigitsCNN):
    """(bytes of the .lsc file, model decoded from that file, encode s, decode s)."""
    return timed_file_round_trip(lambda path: lsc.save(model, path), cls)


def finetune_digits(base, target_bytes, steps=DIGITS_STEPS, *, seed=0, data=None, log=None, **overrides):
    """Fine-tune a copy of ``base`` to a file of ~``target_bytes``; returns (spectral model, info)."""
    cfg = {**DIGITS_CONFIG, **overrides}
    x_tr, y_tr, _, _ = data or load_digits_split()
    torch.manual_seed(seed)
    teacher = copy.deepcopy(base).eval()
    with torch.no_grad():
        t_logits = teacher(x_tr)
    model = copy.deepcopy(base)
    q_net = lsc.spectral(model, block_size=cfg["block_size"], init_bits=cfg["init_bits"],
                         min_group_symbols=cfg["min_group_symbols"])
    coeffs = [p for n, p in model.named_parameters()]
    opt = torch.optim.Adam([dict(params=coeffs, lr=cfg["lr"]),
                            dict(params=list(q_net.parameters()), lr=cfg["qnet_lr"])])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[cfg["lr"], cfg["qnet_lr"]], total_steps=steps,
                                                pct_start=0.1, anneal_strategy="cos", div_factor=10,
                                                final_div_factor=20)
    ctrl = lsc.RateController(model, target_bytes=target_bytes, total_steps=steps, ramp=cfg["ramp"])
    gen = torch.Generator().manual_seed(seed)
    T, kd = cfg["temperature"], cfg["kd_weight"]
    t0 = time.perf_counter()
    model.train()
    perm, pos = torch.randperm(len(x_tr), generator=gen), 0
    for step in range(steps):
        if pos + cfg["batch_size"] > len(perm):
            perm, pos = torch.randperm(len(x_tr), generator=gen), 0
        idx = perm[pos:pos + cfg["batch_size"]]
        pos += cfg["batch_size"]
        logits = model(x_tr[idx])
        loss = F.cross_entropy(logits, y_tr[idx])
        if kd:
            loss = loss + kd * T * T * F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(t_logits[idx] / T, -1),
                                                log_target=True, reduction="batchmean")
        loss = loss + ctrl.loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 250 == 0 or step == steps - 1):
            log(f"    step {step:5d}  loss {float(loss.detach()):.4f}  predicted {ctrl.predicted_bytes():8.0f} B  "
                f"lambda {ctrl.weight:.3g}")
    model.eval()
    ctrl.finalize()
    train_s = time.perf_counter() - t0
    return model, dict(steps=steps, train_s=train_s)


def digits_lsc_point(base, target_bytes, steps=DIGITS_STEPS, data=None, log=None, **overrides) -> dict:
    """One fine-tuned lsc point as a benchmark row (same keys as run_baselines rows)."""
    data = data or load_digits_split()
    model, info = finetune_digits(base, target_bytes, steps, data=data, log=log, **overrides)
    size, dec, enc_s, dec_s = file_bytes_and_model(model)
    ev = evaluate(dec, data[2], data[3])
    n = sum(p.numel() for p in base.parameters())
    return dict(model="digits", method="lsc (fine-tuned)", setting=f"target={target_bytes}", bytes=size,
                ratio=4 * n / size, bpp=8 * size / n, enc_s=enc_s, dec_s=dec_s, steps=info["steps"],
                train_s=info["train_s"], **ev)


def digits_posttraining_point(base, max_error: float, data=None) -> dict:
    """lsc's post-training point (no data, no fine-tuning: ``lsc.compress_posttraining``) on the digits CNN."""
    data = data or load_digits_split()
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    lsc.compress_posttraining(model, max_error=max_error, progress=False)
    search_s = time.perf_counter() - t0
    size, dec, enc_s, dec_s = file_bytes_and_model(model)
    enc_s += search_s  # encoding = choosing the bits + writing the file
    ev = evaluate(dec, data[2], data[3])
    n = sum(p.numel() for p in base.parameters())
    return dict(model="digits", method="lsc (post-training)", setting=f"max_error={max_error}", bytes=size,
                ratio=4 * n / size, bpp=8 * size / n, enc_s=enc_s, dec_s=dec_s, **ev)


def digits_calibrated_point(base, target: float, max_bound: float = 0.5, passes: int = 2, data=None,
                            feedback: bool = False) -> dict:
    """lsc post-training with calibrated bounds on the digits CNN: sensitivities measured as the KL divergence
    from the fp32 model's predictions on the training images, ``allocate_error_bounds(target, max_bound)``;
    each further pass re-measures every tensor at its allocated bound and allocates again. With ``feedback``,
    the layers are quantized with error feedback on their inputs from the training images (``collect_hessians``),
    and the bounds are re-allocated with the output-error ratios of a trial compression."""
    data = data or load_digits_split()
    xtr = data[0]
    model = copy.deepcopy(base)
    with torch.no_grad():
        ref = torch.log_softmax(base(xtr), -1)

    @torch.no_grad()
    def kl(m):
        return float((ref.exp() * (ref - torch.log_softmax(m(xtr), -1))).sum(-1).mean())
    t0 = time.perf_counter()
    probe = 0.05
    for _ in range(passes):
        sens = lsc.measure_sensitivity(model, kl, probe=probe, progress=False)
        probe = bounds = lsc.allocate_error_bounds(sens, target, max_bound=max_bound)
    hessians = None
    if feedback:
        hessians = lsc.collect_hessians(model, lambda m: m(xtr))
        trial = lsc.compress_posttraining(copy.deepcopy(model), max_error=bounds, hessians=hessians, progress=False)
        bounds = lsc.allocate_error_bounds(sens, target, max_bound=max_bound, feedback=trial.feedback_ratios)
    calib_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lsc.compress_posttraining(model, max_error=bounds, hessians=hessians, progress=False)
    search_s = time.perf_counter() - t0
    size, dec, enc_s, dec_s = file_bytes_and_model(model)
    ev = evaluate(dec, data[2], data[3])
    n = sum(p.numel() for p in base.parameters())
    return dict(model="digits", method="lsc (post-training, calibrated + error feedback)" if feedback
                else "lsc (post-training, calibrated)",
                setting=f"KL target={target}, {passes} pass{'es' if passes > 1 else ''}, cap {max_bound}", bytes=size, ratio=4 * n / size,
                bpp=8 * size / n, enc_s=enc_s + search_s, dec_s=dec_s, calib_s=calib_s, **ev)


def main(argv=None):
    from benchmarks.run_baselines import digits_model
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default=",".join(map(str, DIGITS_TARGETS)))
    ap.add_argument("--steps", type=int, default=DIGITS_STEPS)
    ap.add_argument("--set", action="append", default=[], help="override a DIGITS_CONFIG key: key=value")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    over = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        val = ast.literal_eval(v)  # literals only: a command-line value never runs code
        over[k] = type(DIGITS_CONFIG[k])(val) if k != "block_size" else val
    base = digits_model()
    data = load_digits_split()
    print("fp32", evaluate(base, data[2], data[3]), over, flush=True)
    for t in [int(x) for x in args.targets.split(",")]:
        r = digits_lsc_point(base, t, args.steps, data=data, log=lambda s: print(s, flush=True), **over)
        print(f"RESULT target={t} {over} bytes={r['bytes']} acc={r['accuracy']:.4f} nll={r['nll']:.4f} "
              f"steps={r['steps']} train_s={r['train_s']:.0f}", flush=True)


if __name__ == "__main__":
    main()
