"""Issue 5 benchmark: lazy (per-layer) decompression vs dense fp32 loading, same run.

For the digits CNN and MiniLM-L6 (compressed with ``lsc.spectral(init_bits=6)`` and
no training: the bits are untrained, which is fine for memory and latency) it loads
the same .lsc file three ways -- dense (``lsc.load(path, model)``), lazy "packed"
and lazy "entropy" -- checks that the outputs are bitwise equal, and reports

* weight memory: resident bytes between forwards (parameters + buffers + compact
  stores) and the peak during a forward, which adds every tensor the decoders
  allocate while it is alive (counted exactly with a TorchDispatchMode + weakrefs,
  plus NumPy allocations of the entropy decoder via tracemalloc); on CUDA also
  torch.cuda.max_memory_allocated of the whole forward;
* forward latency for a realistic batch, A/B-interleaved, median of N runs.

    python benchmarks/bench_lazy.py [--reps 7] [--threads 1] [--device cpu|cuda]

Writes benchmarks/results/lazy.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lsc  # noqa: E402
from lsc.lazy import lazy_info, track_decode_memory  # noqa: E402

MB = 1e6


def _dense_bytes(model) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(name, make, path, run, device, reps, batch_desc):
    dense = lsc.load(path, make()).to(device).eval()
    models = {"dense fp32": dense}
    first = {}  # peak weight bytes of the first forward after loading (the chunking check runs at load)
    with torch.inference_mode():
        ref = run(dense)
    for mode in ("packed", "entropy"):
        k = f"lazy {mode}"
        m = models[k] = lsc.load(path, make().to(device), lazy=mode)
        tracker = track_decode_memory(m)
        with torch.inference_mode():
            out = run(m)  # also the warm-up
        track_decode_memory(m, enable=False)
        first[k] = lazy_info(m)["resident_bytes"] + tracker.peak + tracker.numpy_peak
        assert torch.equal(out, ref), f"{name} {k}: output differs from dense loading"
    # latency: interleaved A/B/C, median
    times = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(reps):
            for k, m in models.items():
                _sync(device)
                t = time.perf_counter()
                run(m)
                _sync(device)
                times[k].append(time.perf_counter() - t)
    file_bytes = os.path.getsize(path)
    rows = []
    dense_ms = statistics.median(times["dense fp32"]) * 1e3
    for k, m in models.items():
        ms = statistics.median(times[k]) * 1e3
        if k == "dense fp32":
            resident = peak = _dense_bytes(m)
            largest = max(p.numel() * p.element_size() for p in m.parameters())
            info = None
        else:
            info = lazy_info(m)
            resident = info["resident_bytes"]
            tracker = track_decode_memory(m)
            with torch.inference_mode():
                run(m)
            track_decode_memory(m, enable=False)
            peak = resident + tracker.peak + tracker.numpy_peak
            largest = info["largest_decoded_bytes"]
        cuda_peak = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                run(m)
            torch.cuda.synchronize()
            cuda_peak = torch.cuda.max_memory_allocated()
        rows.append(dict(config=k, resident=resident, peak=peak, first_peak=first.get(k, peak), ms=ms,
                         ratio=ms / dense_ms, cuda_peak=cuda_peak, target=file_bytes + 2 * largest))
    return dict(name=name, batch=batch_desc, file_bytes=file_bytes, rows=rows, reps=reps)


def digits_case(tmp, device):
    from lsc.zoo import DigitsCNN, load_digits_split, train_digits_cnn
    model = train_digits_cnn(epochs=5)
    lsc.spectral(model, init_bits=6)
    path = os.path.join(tmp, "digits.lsc")
    lsc.save(model.eval(), path)
    x = load_digits_split()[2].to(device)
    return "digits CNN", DigitsCNN, path, (lambda m: m(x)), f"test set, {len(x)} images 1x8x8"


def minilm_case(tmp, device):
    from minilm import kjv_split, load_minilm
    from transformers import BertModel
    model, tok = load_minilm()
    cfg = model.config
    lsc.spectral(model, init_bits=6)
    path = os.path.join(tmp, "minilm.lsc")
    lsc.save(model.eval(), path)
    del model
    sents = kjv_split()[1][:32]
    enc = {k: v.to(device) for k, v in tok(sents, padding="max_length", truncation=True, max_length=64,
                                          return_tensors="pt").items()}

    def run(m):
        hidden = m(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1)

    return "MiniLM-L6", (lambda: BertModel(cfg, add_pooling_layer=False)), path, run, "32 KJV verses x 64 tokens"


def to_markdown(results, args, device) -> str:
    lines = ["# Lazy (per-layer) decompression vs dense fp32 loading", "",
             f"`python benchmarks/bench_lazy.py --reps {args.reps} --threads {args.threads} --device {device.type}`; "
             f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)"
             + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else "") + ".",
             "Files: `lsc.spectral(model, init_bits=6)` + `lsc.save`, no training (untrained bits: fine for memory "
             "and latency). Every lazy output was checked bitwise equal to the dense model's.",
             "*resident*: weight bytes held between forwards (parameters, buffers, compact stores); "
             "*peak*: resident + the most bytes that decoded weights and decoding temporaries held at once during a "
             "forward (every tensor the decoders allocate, tracked until freed, plus NumPy allocations of the entropy "
             "decoder); *first peak*: the same during the first forward after loading; "
             "*target*: file bytes + 2 x the largest single tensor (issue 5). Latency: median of "
             f"{args.reps} A/B-interleaved runs.", ""]
    for r in results:
        lines += [f"## {r['name']} ({r['batch']}; file {r['file_bytes'] / MB:.2f} MB)", "",
                  "| config | resident MB | peak weight MB | first peak MB | target MB | forward ms | vs dense |"
                  + (" CUDA max allocated MB |" if device.type == "cuda" else ""),
                  "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if device.type == "cuda" else "")]
        for row in r["rows"]:
            tgt = "" if row["config"] == "dense fp32" else f"{row['target'] / MB:.1f}"
            line = (f"| {row['config']} | {row['resident'] / MB:.2f} | {row['peak'] / MB:.2f} | "
                    f"{row['first_peak'] / MB:.2f} | {tgt} | {row['ms']:.1f} | {row['ratio']:.2f}x |")
            if device.type == "cuda":
                line += f" {row['cuda_peak'] / MB:.1f} |"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1 by default: stable timings on a shared machine)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="digits,minilm")
    ap.add_argument("--out", default=str(HERE / "results" / "lazy.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for key, fn in (("digits", digits_case), ("minilm", minilm_case)):
            if key in args.models.split(","):
                name, make, path, run, desc = fn(tmp, device)
                results.append(bench(name, make, path, run, device, args.reps, desc))
    md = to_markdown(results, args, device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
