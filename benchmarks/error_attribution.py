"""Which tensors of a compressed file the quality loss comes from: restore one group at a time.

Each group of tensors (the word-embedding table, one encoder layer, one matrix type, the
rows of the table by how often the training verses read them) is put back to its fp32
weights in the decoded model, and the held-out metric is measured again. A group's share
is the part of ``1 - metric`` its restore removes. Shares need not add up to 100%: after
quantization-aware training the tensors have learnt to cancel one another's error, and
restoring one of them alone can even make things worse (a negative share).

Usage: python benchmarks/error_attribution.py FILE.lsc [--heldout 256]
(a MiniLM file written by the benchmarks; ~2 min on 2 cores). ``shares`` is generic: any
state dicts and any score function.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "src", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

# A restore: (name, original tensor, decoded tensor) -> the tensor to use (the decoded one outside its group).
Restore = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


def shares(original: Mapping[str, torch.Tensor], decoded: Mapping[str, torch.Tensor],
           score: Callable[[dict], float], groups: Mapping[str, Restore]) -> tuple[float, dict]:
    """(score of the decoded weights, {group: (score with the group restored, share of 1 - score)}).

    ``score(state_dict) -> float`` is higher for better (e.g. mean cosine to the original's
    outputs); ``groups[g](name, original, decoded)`` returns the tensor to use for ``name``.
    Tensors missing from ``decoded`` (non-float buffers) are taken from ``original``.
    """
    base_sd = {k: decoded.get(k, v) for k, v in original.items()}
    base = score(base_sd)
    out = {}
    for g, restore in groups.items():
        s = score({k: restore(k, original[k], base_sd[k]) for k in original})
        out[g] = (s, (s - base) / (1 - base) if base < 1 else 0.0)
    return base, out


def whole(pred: Callable[[str], bool]) -> Restore:
    """Restore every tensor whose name satisfies ``pred``."""
    return lambda k, o, d: o if pred(k) else d


def rows(name: str, mask: torch.Tensor) -> Restore:
    """Restore the rows ``mask`` of the table ``name`` only."""
    def restore(k, o, d):
        if k != name:
            return d
        out = d.clone()
        out[mask] = o[mask]
        return out
    return restore


def minilm_groups(counts: torch.Tensor, num_layers: int) -> dict[str, Restore]:
    """The groups of the notes' tables: the table, other embeddings, each layer, each matrix type,
    the vectors, and the table's rows by training-verse count."""
    from benchmarks.minilm import WORD_EMBEDDINGS as table
    g = {"word-embedding table": whole(lambda k: k == table),
         "other embeddings": whole(lambda k: k.startswith("embeddings.") and k != table)}
    for i in range(num_layers):
        g[f"layer {i}"] = whole(lambda k, i=i: f"layer.{i}." in k)
    for kind, pat in (("query", "self.query.weight"), ("key", "self.key.weight"), ("value", "self.value.weight"),
                      ("attention output", "attention.output.dense.weight"), ("FFN input", "intermediate.dense.weight")):
        g[kind] = whole(lambda k, pat=pat: k.endswith(pat))
    g["FFN output"] = whole(lambda k: k.endswith("output.dense.weight") and "attention" not in k)
    g["biases and norms"] = whole(lambda k: k.endswith("bias") or "LayerNorm" in k)
    for label, lo, hi in (("table rows, count 0", 0, 1), ("table rows, count 1-9", 1, 10),
                          ("table rows, count 10-99", 10, 100), ("table rows, count 100-999", 100, 1000),
                          ("table rows, count >= 1000", 1000, float("inf"))):
        g[label] = rows(table, (counts >= lo) & (counts < hi))
    return g


def main(argv=None) -> None:
    import lsc
    from benchmarks.lsc_minilm import token_counts
    from benchmarks.minilm import cosine_metrics, embed, kjv_split, load_minilm
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file")
    ap.add_argument("--heldout", type=int, default=256)
    args = ap.parse_args(argv)
    model, tok = load_minilm()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    train, held = kjv_split()
    held = held[: args.heldout]
    ref = embed(model, tok, held)

    def score(sd):
        model.load_state_dict(sd)
        return cosine_metrics(ref, embed(model, tok, held))["mean_cos"]
    groups = minilm_groups(token_counts(tok, train), model.config.num_hidden_layers)
    base, got = shares(original, lsc.load(args.file), score, groups)
    print(f"{args.file}: held-out mean cos {base:.4f} ({len(held)} verses)")
    print(f"{'restored to fp32':<28} {'mean cos':>9} {'share':>7}")
    for g, (s, share) in got.items():
        print(f"{g:<28} {s:9.4f} {100 * share:6.1f}%")


if __name__ == "__main__":
    main()
