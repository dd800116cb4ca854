"""Run every baseline compressor on the digits CNN and on MiniLM-L6.

    python benchmarks/run_baselines.py [--model digits|minilm|all] [--quick] [--no-nncodec]

Prints every sweep point and, per method, the smallest file that keeps
quality (digits: test accuracy within 0.5 points of fp32; MiniLM: mean
held-out cosine >= 0.99 against the fp32 model).  `digits_rows()` and
`minilm_rows()` return the rows as dicts so later benchmark scripts can add
lsc rows and plot them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "src", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from benchmarks import baselines as B  # noqa: E402
from benchmarks.calibration import collect_layer_inputs  # noqa: E402
from benchmarks.nncodec_baseline import nncodec  # noqa: E402
from lsc.zoo import DigitsCNN, evaluate, load_digits_split, train_digits_cnn  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
DIGITS_ACC_DROP = 0.005   # allowed absolute accuracy drop vs fp32
MINILM_MIN_COS = 0.99     # required mean held-out cosine vs fp32

# Sweep grids: (family, setting label, callable(state_dict, calib) -> result)
FIXED = ("fp32+zstd", "fp16+zstd", "int8+zstd", "int4+zstd")


def _grid(svd_eps, prune_fracs, qps, fixed=FIXED):
    g = [(name, "", lambda sd, c, f=f: f(sd)) for name, f in
         zip(FIXED, (B.fp32_zstd, B.fp16_zstd, B.int8_zstd, B.int4_zstd)) if name in fixed]
    g += [("prune+int8+zstd", f"p={f}", lambda sd, c, f=f: B.prune_int8(sd, f))
          for f in prune_fracs]
    g += [("svd+int8+zstd", f"eps={e}", lambda sd, c, e=e: B.svd_int8(sd, e, c))
          for e in svd_eps]
    g += [("nncodec", f"qp={q}", lambda sd, c, q=q: nncodec(sd, q)) for q in qps]
    return g


DIGITS_GRID = dict(svd_eps=[0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4],
                   prune_fracs=[0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9],
                   qps=list(range(-38, -3, 2)))
MINILM_GRID = dict(svd_eps=[0.05, 0.1],
                   prune_fracs=[0.1, 0.15, 0.2],
                   qps=[-32, -31, -30, -29])
MINILM_QUICK = dict(fixed=("int8+zstd", "int4+zstd"), svd_eps=[0.05],
                    prune_fracs=[0.1], qps=[-31])


def _run_grid(model_name, sd, grid, score, calib, include_nncodec, log):
    n = B.n_params(sd)
    rows = []
    for family, setting, fn in _grid(**grid):
        if family == "nncodec" and not include_nncodec:
            continue
        try:
            nbytes, dec, enc_s, dec_s = fn(sd, calib)
        except ImportError as e:  # nncodec not installed
            log(f"  skip {family}: {e}")
            include_nncodec = False
            continue
        row = dict(model=model_name, method=family, setting=setting, bytes=nbytes,
                   ratio=4 * n / nbytes, bpp=8 * nbytes / n, enc_s=enc_s, dec_s=dec_s,
                   **score(dec))
        rows.append(row)
        log("  " + format_row(row))
    return rows


# ------------------------------------------------------------------ digits

def digits_model(seed: int = 0, cache: bool = True) -> DigitsCNN:
    """Trained digits CNN, cached in benchmarks/.cache (gitignored)."""
    path = CACHE / f"digits_cnn_seed{seed}.pt"
    model = DigitsCNN()
    if cache and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = train_digits_cnn(seed=seed)
    if cache:
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model


def digits_rows(include_nncodec: bool = True, grid: dict | None = None,
                log=print) -> list[dict]:
    """All baseline rows for the digits CNN; metric keys accuracy, nll, passes."""
    x_tr, _, x_te, y_te = load_digits_split()
    model = digits_model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    base = evaluate(model, x_te, y_te)
    calib = collect_layer_inputs(model, lambda m: m(x_tr[:512]))
    probe = DigitsCNN()

    def score(dec):
        probe.load_state_dict(dec)
        r = evaluate(probe, x_te, y_te)
        r["passes"] = r["accuracy"] >= base["accuracy"] - DIGITS_ACC_DROP - 1e-9
        return r
    log(f"digits CNN: {B.n_params(sd):,} params, fp32 test accuracy {base['accuracy']:.4f}")
    return _run_grid("digits", sd, grid or DIGITS_GRID, score, calib, include_nncodec, log)


# ------------------------------------------------------------------ MiniLM

def minilm_rows(include_nncodec: bool = True, grid: dict | None = None,
                n_heldout: int = 256, max_length: int = 64, log=print) -> list[dict]:
    """All baseline rows for MiniLM-L6; metric keys mean_cos, min_cos, passes."""
    from benchmarks.minilm import cosine_metrics, embed, kjv_split, load_minilm

    model, tok = load_minilm()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    train, held = kjv_split()
    held = held[:n_heldout]
    ref = embed(model, tok, held, max_length=max_length)
    # One sentence per forward pass, so no padding rows enter the calibration.
    calib = collect_layer_inputs(
        model, lambda m: [embed(m, tok, [s], max_length=max_length) for s in train[:48]])

    def score(dec):
        model.load_state_dict(dec)
        r = cosine_metrics(ref, embed(model, tok, held, max_length=max_length))
        model.load_state_dict(sd)
        r["passes"] = r["mean_cos"] >= MINILM_MIN_COS
        return r
    log(f"MiniLM-L6: {B.n_params(sd):,} params, {len(held)} held-out verses, "
        f"max_length {max_length}")
    return _run_grid("minilm", sd, grid or MINILM_GRID, score, calib, include_nncodec, log)


# ------------------------------------------------------------------ report

def format_row(r: dict) -> str:
    if "accuracy" in r:
        metric = f"acc {r['accuracy']:.4f}  nll {r['nll']:.4f}"
    else:
        metric = f"cos {r['mean_cos']:.4f}  min {r['min_cos']:.4f}"
    ok = "ok" if r["passes"] else "--"
    return (f"{r['method']:<16} {r['setting']:<9} {r['bytes']:>12,} {r['ratio']:>7.1f}x "
            f"{r['bpp']:>6.2f} b/p  {metric}  enc {r['enc_s']:>6.2f}s  "
            f"dec {r['dec_s']:>5.2f}s  {ok}")


def smallest_passing(rows: list[dict]) -> list[dict]:
    """Per method, the smallest row meeting the quality bar (if any)."""
    best = {}
    for r in rows:
        if r["passes"] and (r["method"] not in best or r["bytes"] < best[r["method"]]["bytes"]):
            best[r["method"]] = r
    return sorted(best.values(), key=lambda r: r["bytes"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["digits", "minilm", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="small MiniLM sweep")
    ap.add_argument("--no-nncodec", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    jobs = []
    if args.model in ("digits", "all"):
        jobs.append(("digits CNN (test accuracy within 0.5 points of fp32)",
                     lambda: digits_rows(not args.no_nncodec)))
    if args.model in ("minilm", "all"):
        jobs.append(("MiniLM-L6 (mean held-out cosine >= 0.99)",
                     lambda: minilm_rows(not args.no_nncodec,
                                         MINILM_QUICK if args.quick else None)))
    for title, job in jobs:
        t0 = time.perf_counter()
        rows = job()
        print(f"\nSmallest passing file per method, {title}:")
        for r in smallest_passing(rows):
            print("  " + format_row(r))
        print(f"({time.perf_counter() - t0:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
