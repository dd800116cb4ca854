"""Post-training (data-free) compression benchmark, and the README's demo plot.

    python benchmarks/bench_posttraining.py [--quick] [--no-nncodec] [--skip-demo]

1. Runs ``lsc demo`` (digits CNN: train, lsc.spectral, fine-tune with the rate
   loss, save, reload) and writes the bits plot of its file to
   docs/img/demo_bits.png.
2. MiniLM-L6 (22.6M parameters): the real command ``lsc compress
   minilm.safetensors --max-error ...`` (no data, no fine-tuning) at several
   bounds; each .lsc file is decoded with ``lsc.load`` and scored by the mean
   cosine of held-out sentence embeddings against fp32. NNCodec (no fine-tuning
   either) is run at a few QPs with the same scoring. The smallest file with mean
   cosine >= 0.99 per method is compared.

Results go to benchmarks/results/posttraining.md.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "src", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import lsc  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results" / "posttraining.md"
PLOT = ROOT / "docs" / "img" / "demo_bits.png"
MIN_COS = 0.99
NNCODEC_REPORTED = 13.1e6  # issue 6: NNCodec's smallest passing MiniLM file

# (label, extra CLI args): uniform bounds, then uniform bounds with a looser bound on the embedding tables
SETTINGS = [
    ("--max-error 0.05", ["--max-error", "0.05"]),
    ("--max-error 0.045", ["--max-error", "0.045"]),
    ("--max-error 0.05 --max-error 'embeddings.*=0.08'", ["--max-error", "0.05", "--max-error", "embeddings.*=0.08"]),
]
QUICK_SETTINGS = [SETTINGS[0], SETTINGS[2]]
NNCODEC_QPS = [-31, -30]


def run_demo_and_plot(log) -> dict:
    from lsc.demo import run_demo
    from lsc.plots import plot_bits, rows_from_file
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / "demo.lsc"
    buf = io.StringIO()
    with redirect_stdout(buf):
        res = run_demo(out=str(out), progress=False)
    res["stdout"] = buf.getvalue()
    log(res["stdout"])
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    plot_bits(rows_from_file(out), PLOT, title="lsc demo: digits CNN, bits per frequency and bytes per tensor")
    log(f"wrote {PLOT}")
    return res


def minilm_rows(settings, qps, log) -> tuple[list[dict], dict]:
    from benchmarks.minilm import cosine_metrics, embed, kjv_split, load_minilm
    from safetensors.torch import save_file

    model, tok = load_minilm()
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    n = sum(v.numel() for v in sd.values() if v.is_floating_point())
    _, held = kjv_split()
    held = held[:256]
    ref = embed(model, tok, held, max_length=64)
    CACHE.mkdir(parents=True, exist_ok=True)
    src = CACHE / "minilm.safetensors"
    save_file(sd, str(src))
    meta = dict(params=n, fp32_bytes=4 * n, tensors=len(sd), sentences=len(held))
    log(f"MiniLM-L6: {n:,} float parameters, {len(sd)} tensors, {len(held)} held-out verses")

    def score(dec):
        model.load_state_dict(dec, strict=False)
        r = cosine_metrics(ref, embed(model, tok, held, max_length=64))
        model.load_state_dict(sd)
        return r

    rows = []
    for label, args in settings:
        out = CACHE / "minilm_pt.lsc"
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "lsc", "compress", str(src), "-o", str(out), *args],
                           capture_output=True, text=True)
        enc_s = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(p.stderr)
        t0 = time.perf_counter()
        dec = lsc.load(out)
        dec_s = time.perf_counter() - t0
        size = out.stat().st_size
        r = dict(method="lsc compress (post-training)", setting=label, bytes=size, enc_s=enc_s, dec_s=dec_s,
                 stdout=p.stdout, **score(dec))
        r["passes"] = r["mean_cos"] >= MIN_COS
        rows.append(r)
        log(_fmt(r, n))
    if qps:
        try:
            from benchmarks.nncodec_baseline import nncodec
            for qp in qps:
                nbytes, dec, enc_s, dec_s = nncodec(sd, qp)
                r = dict(method="NNCodec", setting=f"qp={qp}", bytes=nbytes, enc_s=enc_s, dec_s=dec_s, **score(dec))
                r["passes"] = r["mean_cos"] >= MIN_COS
                rows.append(r)
                log(_fmt(r, n))
        except ImportError as e:
            log(f"NNCodec not run: {e}")
    return rows, meta


def _fmt(r, n) -> str:
    ok = "ok" if r["passes"] else "--"
    return (f"  {r['method']:<30} {r['setting']:<52} {r['bytes'] / 1e6:8.3f} MB {8 * r['bytes'] / n:5.2f} b/p "
            f"cos {r['mean_cos']:.5f} min {r['min_cos']:.4f} enc {r['enc_s']:6.1f}s dec {r['dec_s']:5.1f}s {ok}")


def write_report(demo, rows, meta, argv) -> None:
    lines = ["# Post-training compression (no data, no fine-tuning)", "",
             f"Generated by `python benchmarks/bench_posttraining.py {' '.join(argv)}`".rstrip() + " "
             f"on {os.cpu_count()} CPU cores, torch {torch.__version__}. Timings are wall-clock on a shared machine.", ""]
    if demo:
        lines += ["## `lsc demo` (digits CNN, fine-tuned with the rate loss)", "", "```", demo["stdout"].rstrip(), "```", "",
                  "Bits plot of the demo file: `docs/img/demo_bits.png`.", ""]
    if rows:
        n = meta["params"]
        lines += ["## MiniLM-L6: `lsc compress --max-error` vs NNCodec", "",
                  f"{n:,} float parameters ({meta['fp32_bytes'] / 1e6:.1f} MB fp32). Quality: mean cosine of "
                  f"{meta['sentences']} held-out KJV verse embeddings against fp32 (bar: >= {MIN_COS}). "
                  "lsc rows are the real CLI (`lsc compress minilm.safetensors -o m.lsc ARGS`), the file decoded "
                  "with `lsc.load`; `--max-error E` bounds every matrix's ||W-W^||/||W|| by E and every 1-D tensor's "
                  "by E/20; `GLOB=E` gives matching tensors their own bound.", "",
                  "| method | setting | file | bits/param | ratio vs fp32 | mean cos | min cos | encode | decode | >= 0.99 |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
        for r in rows:
            lines.append(f"| {r['method']} | `{r['setting']}` | {r['bytes'] / 1e6:.3f} MB | {8 * r['bytes'] / n:.2f} | "
                         f"{4 * n / r['bytes']:.1f}x | {r['mean_cos']:.5f} | {r['min_cos']:.4f} | {r['enc_s']:.1f} s | "
                         f"{r['dec_s']:.1f} s | {'yes' if r['passes'] else 'no'} |")
        best = {}
        for r in rows:
            if r["passes"] and (r["method"] not in best or r["bytes"] < best[r["method"]]["bytes"]):
                best[r["method"]] = r
        lines += ["", "Smallest file with mean cosine >= 0.99:", ""]
        for m, r in best.items():
            lines.append(f"- {m}: {r['bytes'] / 1e6:.3f} MB (`{r['setting']}`, cos {r['mean_cos']:.5f})")
        nn = best.get("NNCodec")
        ref = nn["bytes"] if nn else NNCODEC_REPORTED
        ours = best.get("lsc compress (post-training)")
        uniform = [r for r in rows if r["passes"] and r["method"].startswith("lsc") and "embeddings" not in r["setting"]]
        if ours:
            lines += ["", f"lsc / NNCodec size: {ours['bytes'] / ref:.3f} "
                          f"({'NNCodec measured here' if nn else 'NNCodec 13.1 MB as reported in issue 6'})."]
        if uniform:
            u = min(uniform, key=lambda r: r["bytes"])
            lines.append(f"With one uniform bound only: {u['bytes'] / 1e6:.3f} MB (`{u['setting']}`), "
                         f"{u['bytes'] / ref:.3f} of NNCodec.")
        cli = next((r for r in rows if r.get("stdout") and r is ours), None)
        if cli:
            lines += ["", "Output of the winning command:", "", "```", cli["stdout"].rstrip(), "```"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two lsc settings, one NNCodec QP")
    ap.add_argument("--no-nncodec", action="store_true")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    log = lambda s: print(s, flush=True)  # noqa: E731
    demo = None if args.skip_demo else run_demo_and_plot(log)
    rows, meta = [], {}
    if not args.skip_minilm:
        qps = [] if args.no_nncodec else ([-30] if args.quick else NNCODEC_QPS)
        rows, meta = minilm_rows(QUICK_SETTINGS if args.quick else SETTINGS, qps, log)
    write_report(demo, rows, meta, argv)
    log(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
