"""lsc on MiniLM-L6 by distillation fine-tuning (CPU budget).

    python benchmarks/lsc_minilm.py --target-mb 4.5 --steps 400 [--out benchmarks/.cache/minilm_lsc.json]
    python benchmarks/lsc_minilm.py --device cuda --steps 4000 --set batch_size=64 --save minilm.lsc

Teacher: the original all-MiniLM-L6-v2. Student: a copy reparameterized with
``lsc.spectral``, trained on KJV *training* verses (``minilm.kjv_split``; the
held-out verses are never seen) with

    loss = (1 - cos(student, teacher pooled embeddings)) * 100
         + token-level MSE of the normalized last hidden states * 10
         + lsc.RateController(target_bytes=...).loss()

then ``finalize()``, ``lsc.save``, ``lsc.load`` into a fresh BertModel, and the
mean / minimum cosine of held-out embeddings against the teacher.

``finetune_at_fixed_steps`` is the other way to fine-tune, used by ``run_all.py`` after
calibrated post-training: the same distillation loss without the rate term, with the step
sizes that post-training chose kept fixed (quantization-aware training at a fixed size).

Vocabulary: rows of the word-embedding table for tokens that never occur in the
training verses get no gradient from the task; they are set to zero before
compression (``--keep-vocab`` disables it), so they cost ~0 bits. This is a
domain-specialized model: a sentence with such a token (none of the held-out
verses' tokens is affected unless reported) would embed it as zero.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import fnmatch
import json
import os
import shutil
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
from benchmarks.minilm import WORD_EMBEDDINGS, cosine_metrics, embed, kjv_split, load_minilm  # noqa: E402
from benchmarks.roundtrip import timed_file_round_trip  # noqa: E402

MINILM_CONFIG = dict(block_size=8, init_bits=5.0, lr=1e-3, qnet_lr=1e-2, batch_size=16, max_length=64,
                     ramp=0.5, cos_weight=100.0, tok_weight=10.0, init_weight=0.1,
                     init_max_error=0.05, scale_vocab_bound=True)


def token_counts(tok, train, max_length=64) -> torch.Tensor:
    """How often each vocabulary row is looked up in the training verses (float64): the embedding table's
    diagonal ``X^T X`` for ``compress_posttraining(hessians=...)``. Tokenizing only: ~10 s for all of them."""
    counts = torch.zeros(len(tok), dtype=torch.float64)
    for i in range(0, len(train), 2048):
        ids = tok(train[i:i + 2048], truncation=True, max_length=max_length)["input_ids"]
        counts += torch.bincount(torch.tensor([t for row in ids for t in row]), minlength=len(tok)).double()
    return counts


def train_vocab(tok, train, max_length=64) -> torch.Tensor:
    """Boolean mask over the vocabulary: token occurs in the training verses (plus special tokens)."""
    seen = token_counts(tok, train, max_length) > 0
    seen[tok.all_special_ids] = True
    return seen


CALIBRATION_VERSES = 128  # training verses (never held-out ones) on which sensitivities are measured


def calibration_sensitivity(model, tok, train, max_length=64, n_calib=CALIBRATION_VERSES) -> dict:
    """``lsc.measure_sensitivity`` of 1 - mean cosine to ``model``'s own embeddings of ``n_calib`` training verses."""
    calib = train[:: max(1, len(train) // n_calib)][:n_calib]
    ref = embed(model, tok, calib, max_length=max_length)
    return lsc.measure_sensitivity(
        model, lambda m: 1 - cosine_metrics(ref, embed(m, tok, calib, max_length=max_length))["mean_cos"], progress=False)


HESSIAN_VERSES = 512  # training verses whose Linear-layer inputs drive error feedback (128 generalized less well)


def calibration_hessians(model, tok, train, max_length=64, n_calib=HESSIAN_VERSES) -> dict:
    """``lsc.collect_hessians`` on ``n_calib`` training verses (spread like the sensitivity's), one at a time
    (no padding tokens); ~30 s for 512 verses on 2 cores."""
    calib = train[:: max(1, len(train) // n_calib)][:n_calib]
    device = next(model.parameters()).device
    return lsc.collect_hessians(model, lambda m: [m(**tok([s], truncation=True, max_length=max_length,
                                                          return_tensors="pt").to(device)) for s in calib])


def _pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def spliced_text(train: list[str], i: int, gen: torch.Generator, min_words: int = 4, max_words: int = 48) -> str:
    """A random run of words across training verses ``i`` and ``i + 1`` (neighbours in canonical order).

    The teacher labels any text, so distillation need not replay the same 30k verses: these
    windows start and end mid-sentence and join two verses, giving new sequences with the
    corpus's own words and local structure (used by ``distill_steps(augment=...)``).
    """
    words = (train[i] + " " + train[(i + 1) % len(train)]).split()
    hi = min(len(words), max_words)
    lo = min(min_words, hi)
    length = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    start = int(torch.randint(0, len(words) - length + 1, (1,), generator=gen))
    return " ".join(words[start:start + length])


def rare_token_pool(tok, train, counts=(0, 10), max_length=64) -> torch.Tensor:
    """Ids of ordinary vocabulary tokens looked up ``lo <= n < hi`` times in the training verses (``counts``).

    Their rows of the word-embedding table are the ones the count-weighted code stores coarsely
    and that distillation on the verses themselves never trains; held-out verses containing one
    carry most of the held-out error (4.80 MB file: verses whose rarest token has count 0 score
    0.960, count 1-9 0.983, count >= 10 0.991)."""
    n = token_counts(tok, train, max_length)
    ordinary = torch.ones(len(tok), dtype=torch.bool)
    ordinary[tok.all_special_ids] = False
    ordinary[: min(999, len(tok))] = False  # BERT's [PAD] and [unusedN] slots
    return torch.nonzero(ordinary & (n >= counts[0]) & (n < counts[1])).squeeze(1)


def substitute_tokens(input_ids: torch.Tensor, mask: torch.Tensor, pool: torch.Tensor, rate: float,
                      gen: torch.Generator) -> torch.Tensor:
    """A copy of a batch in which each sequence, with probability ``rate``, has one of its inner tokens
    (not the first or last: [CLS] / [SEP]) replaced by a random token of ``pool``."""
    ids = input_ids.clone()
    lengths = mask.sum(1).tolist()
    for row, (n, hit) in enumerate(zip(lengths, (torch.rand(ids.shape[0], generator=gen) < rate).tolist())):
        if hit and n > 2:
            pos = 1 + int(torch.randint(0, n - 2, (1,), generator=gen))
            ids[row, pos] = pool[int(torch.randint(0, pool.numel(), (1,), generator=gen))]
    return ids


@contextlib.contextmanager
def _dropout(model, rate: float, device):
    """Every dropout layer of ``model`` at ``rate`` (attention reads ``.p`` too) with seeded masks inside the
    block; afterwards the layers' rates and the caller's random state (CPU, and the GPU trained on) as they were."""
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    rates = [m.p for m in drops]
    dev = torch.device(device)
    gpus = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(2)
        for mod in drops:
            mod.p = rate
        try:
            yield
        finally:
            for mod, p in zip(drops, rates):
                mod.p = p


def distill_steps(student, teacher, tok, train, steps: int, opt, sched=None, *,
                  batch_size=MINILM_CONFIG["batch_size"], max_length=MINILM_CONFIG["max_length"],
                  cos_weight=MINILM_CONFIG["cos_weight"], tok_weight=MINILM_CONFIG["tok_weight"], hidden_weight=0.0,
                  augment: float = 0.0, dropout: float = 0.0, rare_swap: float = 0.0, rare_counts=(0, 10),
                  extra_loss=None, device="cpu", log=print, status=None) -> float:
    """``steps`` optimizer steps of distillation on training verses (in a fixed shuffled order) -> seconds.

    loss = cos_weight * (1 - cos of mean-pooled embeddings) + tok_weight * token-level MSE of the
    normalized last hidden states (+ ``hidden_weight`` * the same MSE averaged over the intermediate
    layers' outputs, + ``extra_loss()``, e.g. the rate term). With ``augment`` > 0, that fraction of
    each batch (on average) is replaced by :func:`spliced_text` windows around the same verses, so a long
    run does not fit the training verses themselves (measured on MiniLM after 6,000 plain steps: training
    verses 0.9925, held-out 0.9868; after post-training alone the two were level). Measured at 0.5: the
    gap narrows (0.9889 / 0.9854 after 4,000 steps) but the held-out cosine falls too, so the run_all
    points that use it are a negative result, kept reproducible. ``dropout`` > 0 trains the student with
    that dropout in every dropout layer (attention's included; seeded, without touching the caller's random
    state; the modules' rates are restored afterwards), a regulariser against that fit. Measured at 0.1,
    training and held-out cosine both fall by ~0.008 and the gap stays: those points are negative results too.
    Otherwise the student trains without dropout: its parametrizations compute the weights with gradients,
    as in training, but the model itself is the deterministic one the teacher's embeddings come from.
    ``rare_swap`` > 0: that fraction of the verses (on average) has one token replaced by a random token
    looked up ``lo <= n < hi`` times in ``train`` (``rare_counts``; :func:`substitute_tokens`), for teacher and
    student alike, so the rarely read rows of the word-embedding table, and the encoder's response to
    their coarse codes, are trained too. Measured at 0.5 (4,000 steps): verses with such a token gain, the
    rest lose, and the file grows slightly; no gain at equal size, so those points are negative results too.
    """
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(train), generator=gen)
    aug_gen = torch.Generator().manual_seed(1)
    swap_gen = torch.Generator().manual_seed(3)
    pool = rare_token_pool(tok, train, rare_counts, max_length) if rare_swap else None
    if pool is not None and not pool.numel():
        raise ValueError(f"rare_swap: no token of the vocabulary is read {rare_counts[0]}-{rare_counts[1] - 1} times in training")
    with _dropout(student, dropout, device):
        t0 = time.perf_counter()
        student.train()
        layers = bool(hidden_weight)
        for step in range(steps):
            start = (step * batch_size) % len(perm)
            idx = perm[start:start + batch_size].tolist()
            swap = (torch.rand(len(idx), generator=aug_gen) < augment).tolist() if augment else [False] * len(idx)
            batch = [spliced_text(train, i, aug_gen) if w else train[i] for i, w in zip(idx, swap)]
            enc = tok(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            if pool is not None:
                enc["input_ids"] = substitute_tokens(enc["input_ids"], enc["attention_mask"], pool, rare_swap, swap_gen)
            enc = enc.to(device)
            with torch.no_grad():
                tout = teacher(**enc, output_hidden_states=layers)
            sout = student(**enc, output_hidden_states=layers)
            th, sh = tout.last_hidden_state, sout.last_hidden_state
            mask = enc["attention_mask"]
            cos = F.cosine_similarity(_pool(sh, mask), _pool(th, mask), dim=-1)
            m = mask.unsqueeze(-1).to(sh.dtype)

            def token_mse(s, t):
                return (((F.normalize(s, dim=-1) - F.normalize(t, dim=-1)) ** 2) * m).sum() / m.sum()
            loss = cos_weight * (1 - cos).mean() + tok_weight * token_mse(sh, th)
            if layers:  # hidden_states: the embeddings' output, each layer's, the last one's (counted above)
                inner = [token_mse(s, t) for s, t in zip(sout.hidden_states[1:-1], tout.hidden_states[1:-1])]
                loss = loss + hidden_weight * sum(inner) / max(len(inner), 1)
            if extra_loss is not None:
                loss = loss + extra_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if step % 25 == 0 or step == steps - 1:
                log(f"  step {step:4d}  cos {float(cos.detach().mean()):.4f}  " + (status() + "  " if status else "")
                    + f"{time.perf_counter() - t0:.0f}s")
        student.eval()
        return time.perf_counter() - t0


def finetune_at_fixed_steps(student, teacher, tok, train, steps: int, lr: float, *, pct_start=0.05, log=print,
                            rate_weight: float = 0.0, freeze=(), blank_unread: bool = False, **cfg) -> float:
    """Quantization-aware distillation of a post-trained model (``compress_posttraining``) -> seconds.

    The step sizes stay those the post-training allocation chose (its bit-allocation network
    is frozen, and no rate term is added), so the file keeps about its size, while every
    coefficient, bias and norm parameter learns to cancel the rounding error of the others
    through the straight-through quantizer. Adam with a one-cycle schedule peaking at ``lr``.
    ``rate_weight > 0`` adds ``lsc.quantization_loss(student, weight=rate_weight)``, which then only
    pulls coefficients towards cheaper bins (measured on MiniLM: a worse trade than a coarser start).
    ``freeze``: glob patterns of parameters kept as they are. With the steps frozen too, lsc computes
    such a weight once instead of every step (on MiniLM, freezing the word-embedding table, whose error
    QAT does not repair, makes a step ~15% faster at the same result). ``hidden_weight`` (in ``cfg``)
    adds the intermediate layers' outputs to the distillation loss (see :func:`distill_steps`).
    ``blank_unread``: afterwards, zero the coefficients of the word-embedding rows that no training verse
    reads (:func:`blank_unread_rows`).
    """
    if rate_weight:
        cfg["extra_loss"] = lambda: lsc.quantization_loss(student, weight=rate_weight)
    q_net = lsc.state.get_state(student).q_net
    for p in q_net.parameters():
        p.requires_grad_(False)
    for name, p in student.named_parameters():
        if any(fnmatch.fnmatch(name, g) for g in freeze):
            p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct_start)
    seconds = distill_steps(student, teacher, tok, train, steps, opt, sched, log=log, **cfg)
    if blank_unread:
        blank_unread_rows(student, tok, train, cfg.get("max_length", MINILM_CONFIG["max_length"]), log)
    return seconds


def blank_unread_rows(student, tok, train, max_length=64, log=print) -> int:
    """Zero the spectral coefficients of the word-embedding rows no training verse reads -> rows blanked.

    Such a row then decodes to the table's mean and costs almost nothing in the file. The count-weighted
    rounding credits every row with ``row_prior`` (1) lookups on top of its count, about 1/31 of an average
    row's weight on KJV, while Good-Turing puts the expected lookups of a row never seen at N1 / N0 (rows read
    once over rows never read: 0.06 here); the held-out verses read those 22.8k rows 7 times in 256 verses.
    Distillation never reads them either (they get no gradient), so blanking them after it equals blanking
    them before. Special tokens count as read. Needs the table in one-row blocks (``compress_posttraining``
    with token counts).
    """
    par = student.embeddings.word_embeddings.parametrizations.weight
    coeffs = par.original
    if par[0].layout.block_shape[0] != 1:
        raise ValueError(f"{WORD_EMBEDDINGS}: blanking rows needs one-row blocks, not {par[0].layout.block_shape}")
    unread = ~train_vocab(tok, train, max_length)
    with torch.no_grad():
        coeffs[unread.to(coeffs.device)] = 0.0
    rows = int(unread.sum())
    log(f"  blanked {rows} word-embedding rows no training verse reads")
    return rows


def distill(target_bytes: float, steps: int, *, n_heldout=256, log=print, keep_vocab=False, loader=load_minilm,
            corpus=None, device="cpu", save=None, **overrides) -> dict:
    """One fine-tuned point; ``loader() -> (model, tokenizer)`` and ``corpus = (train, held)`` are
    replaceable so the smoke test can run the same code on a tiny model.

    Teacher and student train on ``device``; the file is always decoded into a fresh CPU model,
    and ``save`` (a path) keeps a copy of it."""
    cfg = {**MINILM_CONFIG, **overrides}
    torch.manual_seed(0)
    teacher, tok = loader()
    teacher.to(device)
    train, held = corpus or kjv_split()
    held = held[:n_heldout]
    ref = embed(teacher, tok, held, max_length=cfg["max_length"])
    student = copy.deepcopy(teacher)
    n = sum(p.numel() for p in teacher.parameters())
    info = {}
    bounds = cfg["init_max_error"]
    if not keep_vocab:
        seen = train_vocab(tok, train, cfg["max_length"])
        full_norm = float(student.embeddings.word_embeddings.weight.detach().norm())
        held_ids = set(i for row in tok(held, truncation=True, max_length=cfg["max_length"])["input_ids"] for i in row)
        info["vocab_kept"] = int(seen.sum())
        info["heldout_tokens_unseen"] = int(sum(1 for i in held_ids if not seen[i]))
        with torch.no_grad():
            student.embeddings.word_embeddings.weight[~seen.to(device)] = 0.0
        if cfg["scale_vocab_bound"]:
            # the post-training bound is relative to ||W||: keep it relative to the *original* table's norm,
            # so dropping the unseen rows does not make the kept ones pay for a tighter bound
            ratio = full_norm / max(float(student.embeddings.word_embeddings.weight.detach().norm()), 1e-12)
            bounds = {WORD_EMBEDDINGS: bounds * ratio, "default": bounds}
        log(f"  vocabulary: {int(seen.sum())} of {len(seen)} rows kept (tokens of the training verses); "
            f"{info['heldout_tokens_unseen']} held-out token types unseen")
    t_init = time.perf_counter()
    sens = None
    if cfg.get("init_calibrated"):
        # start from the calibrated post-training allocation instead: per-tensor bounds from measured
        # sensitivities (1 - mean cosine on 128 training verses), for a predicted 1 - cos of init_calibrated
        sens = calibration_sensitivity(student, tok, train, cfg["max_length"])
        bounds = lsc.allocate_error_bounds(sens, cfg["init_calibrated"])
    if cfg["init_max_error"] > 0:
        # start from lsc's post-training allocation (per-tensor bits meeting an error bound), then learn
        lsc.compress_posttraining(student, max_error=bounds, block_size=cfg["block_size"], progress=False)
        q_net = lsc.state.get_state(student).q_net
        for p in q_net.parameters():
            p.requires_grad_(True)
        info["init"] = (f"post-training, calibrated 1-cos target={cfg['init_calibrated']}" if cfg.get("init_calibrated")
                        else f"post-training max_error={cfg['init_max_error']}")
    else:
        q_net = lsc.spectral(student, block_size=cfg["block_size"], init_bits=cfg["init_bits"])
        info["init"] = f"init_bits={cfg['init_bits']}"
    info["init_s"] = time.perf_counter() - t_init
    # ``freeze``: glob patterns of parameters kept as they are (their bits still learn through q_net)
    frozen = {name for name, _ in student.named_parameters()
              if any(fnmatch.fnmatch(name, g) for g in cfg.get("freeze", ()))}
    coeffs = [p for name, p in student.named_parameters() if name not in frozen]
    for name, p in student.named_parameters():
        p.requires_grad_(name not in frozen)
    opt = torch.optim.Adam([dict(params=coeffs, lr=cfg["lr"]), dict(params=list(q_net.parameters()), lr=cfg["qnet_lr"])])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[cfg["lr"], cfg["qnet_lr"]], total_steps=steps,
                                                pct_start=0.1, div_factor=10, final_div_factor=10)
    ctrl = lsc.RateController(student, target_bytes=target_bytes, total_steps=steps, ramp=cfg["ramp"],
                              init_weight=cfg["init_weight"])
    t0 = time.perf_counter()
    distill_steps(student, teacher, tok, train, steps, opt, sched, extra_loss=ctrl.loss, device=device, log=log,
                  status=lambda: f"predicted {ctrl.predicted_bytes() / 1e6:.3f} MB  lambda {ctrl.weight:.3g}",
                  **{k: cfg[k] for k in ("batch_size", "max_length", "cos_weight", "tok_weight")})
    # finalize_sensitivity: the last cut follows the measured sensitivities instead of one shift for all
    ctrl.finalize(sensitivity=sens if cfg.get("finalize_sensitivity") else None)
    train_s = time.perf_counter() - t0

    def write(path):
        lsc.save(student, path)
        if save:
            shutil.copyfile(path, save)

    size, dec, enc_s, dec_s = timed_file_round_trip(write, lambda: loader()[0])
    met = cosine_metrics(ref, embed(dec, tok, held, max_length=cfg["max_length"]))
    row = dict(model="minilm", method="lsc (fine-tuned)", setting=f"target={target_bytes / 1e6:g}MB",
               **_size_fields(size, n), enc_s=enc_s, dec_s=dec_s, steps=steps, train_s=train_s,
               batch_size=cfg["batch_size"], device=str(device), passes=met["mean_cos"] >= 0.99, **met, **info)
    log(f"  RESULT {json.dumps(row)}")
    return row


def _size_fields(size: int, n: int) -> dict:
    """File bytes, ratio against fp32 and bits per parameter."""
    return dict(bytes=size, ratio=4 * n / size, bpp=8 * size / n)


def score_file(path, n_heldout=256, max_length=64, loader=load_minilm, corpus=None) -> dict:
    """Held-out mean / minimum cosine of a MiniLM .lsc file (decoded on the CPU) against the fp32 teacher.

    Scores files trained elsewhere (e.g. with ``--device cuda`` on another machine) on this one;
    ``loader`` and ``corpus`` as in :func:`distill`."""
    teacher, tok = loader()
    held = (corpus or kjv_split())[1][:n_heldout]
    ref = embed(teacher, tok, held, max_length=max_length)
    t0 = time.perf_counter()
    dec = lsc.load(path, loader()[0])
    dec_s = time.perf_counter() - t0
    n = sum(p.numel() for p in teacher.parameters())
    size = os.path.getsize(path)
    met = cosine_metrics(ref, embed(dec, tok, held, max_length=max_length))
    return dict(file=str(path), **_size_fields(size, n), dec_s=dec_s, **met)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target-mb", type=float, default=4.5)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--keep-vocab", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="override a MINILM_CONFIG key: key=value")
    ap.add_argument("--out", default=None, help="append the result row (JSON line) to this file")
    ap.add_argument("--device", default="cpu", help="train on this device (the file is decoded on the CPU)")
    ap.add_argument("--save", default=None, help="keep the .lsc file at this path")
    ap.add_argument("--score", nargs="+", metavar="FILE", help="only score these .lsc files (held-out cosine)")
    args = ap.parse_args(argv)
    if args.score:
        for path in args.score:
            print(json.dumps(score_file(path)))
        return
    over = {k: type(MINILM_CONFIG[k])(ast.literal_eval(v)) for k, v in (kv.split("=", 1) for kv in args.set)}
    torch.set_num_threads(int(os.environ.get("LSC_THREADS", "2")))
    row = distill(args.target_mb * 1e6, args.steps, keep_vocab=args.keep_vocab, device=args.device, save=args.save,
                  **over)
    row["config"] = {**MINILM_CONFIG, **over}
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
