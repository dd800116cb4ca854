"""Smoke test of the benchmark suite (benchmarks/run_all.py) on a tiny budget.

Runs every code path of the real benchmark -- baselines, lsc fine-tuned and
post-training points on the digits CNN, the MiniLM distillation loop (on a tiny
BERT with the real tokenizer and corpus), the report and the plots -- with a
few steps each, so the benchmark cannot rot. The numbers are not checked
against targets; only that rows are well formed and files are written.
"""
from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("zstandard")
pytest.importorskip("matplotlib")

ROW_KEYS = {"model", "method", "setting", "bytes", "ratio", "bpp", "enc_s", "dec_s", "passes"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from benchmarks import run_all as RA
    plan = dict(digits_grid=dict(fixed=("int8+zstd", "int4+zstd"), svd_eps=[0.2], prune_fracs=[0.9], qps=[-20]),
                digits_lsc=[(8000, 15)], digits_pt=[0.1], digits_cal=[(3e-4, 2)], digits_cal_fb=[(3e-4, 1, 0.8)])
    cache = RA.Cache(tmp_path_factory.mktemp("cache"), fresh=False)
    include_nncodec = importlib.util.find_spec("nnc") is not None
    sec = RA.digits_section(plan, cache, include_nncodec=include_nncodec, log=lambda s: None)
    return sec, cache, plan


def test_digits_section_rows(digits):
    sec, _, _ = digits
    methods = {r["method"] for r in sec["rows"]}
    assert {"int8+zstd", "int4+zstd", "lsc (fine-tuned)", "lsc (post-training)", "lsc (post-training, calibrated)"} <= methods
    for r in sec["rows"]:
        assert ROW_KEYS <= set(r), r
        assert r["bytes"] > 0 and 0.0 <= r["accuracy"] <= 1.0
    ft = next(r for r in sec["rows"] if r["method"] == "lsc (fine-tuned)")
    assert ft["steps"] == 15 and ft["train_s"] > 0
    cal = next(r for r in sec["rows"] if r["method"] == "lsc (post-training, calibrated)")
    assert cal["calib_s"] > 0 and "KL target=0.0003" in cal["setting"]
    fb = next(r for r in sec["rows"] if r["method"] == "lsc (post-training, calibrated + error feedback)")
    assert fb["calib_s"] > 0 and "1 pass," in fb["setting"]


def test_cache_reuses_points(digits):
    from benchmarks import run_all as RA
    sec, cache, plan = digits
    calls = []
    again = RA.digits_section(dict(plan, digits_grid=plan["digits_grid"]), cache,
                              include_nncodec=importlib.util.find_spec("nnc") is not None, log=calls.append)
    assert all(line.startswith("  [cached]") for line in calls)
    assert [r["bytes"] for r in again["rows"]] == [r["bytes"] for r in sec["rows"]]


@pytest.fixture(scope="module")
def tiny_bert():
    """(loader, corpus): a 1-layer BERT with MiniLM's tokenizer, and KJV (train, held-out) verses."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer, BertConfig, BertModel

    from benchmarks.minilm import kjv_split, minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)

    def loader():
        torch.manual_seed(0)
        return BertModel(cfg, add_pooling_layer=False).eval(), tok
    return loader, kjv_split()


def test_minilm_distill_tiny(tmp_path, tiny_bert):
    from benchmarks.lsc_minilm import distill, score_file
    loader, (train, held) = tiny_bert
    path = tmp_path / "tiny.lsc"
    row = distill(60_000, 3, n_heldout=8, log=lambda s: None, loader=loader, corpus=(train[:48], held[:8]),
                  batch_size=4, max_length=16, init_max_error=0.1, save=path)
    assert ROW_KEYS <= set(row)
    assert row["bytes"] > 0 and -1.0 <= row["mean_cos"] <= 1.0 + 1e-6 and row["steps"] == 3
    # the kept file is the one scored: scoring it again (as for files trained on another machine) agrees
    again = score_file(path, n_heldout=8, max_length=16, loader=loader, corpus=(train[:48], held[:8]))
    assert again["bytes"] == row["bytes"] == path.stat().st_size
    assert again["mean_cos"] == pytest.approx(row["mean_cos"], abs=1e-6)
    assert again["min_cos"] == pytest.approx(row["min_cos"], abs=1e-6)


def test_minilm_calibrated_point_tiny(tiny_bert):
    from benchmarks import run_all as RA
    loader, (train, held) = tiny_bert
    rows = [RA.minilm_calibrated_point(t, n_heldout=8, max_length=16, loader=loader, corpus=(train[:64], held[:8]),
                                       n_calib=8) for t in (1e-3, 1e-2)]
    for row in rows:
        assert ROW_KEYS <= set(row) and row["method"] == "lsc (post-training, calibrated)"
        assert 0.0 < row["predicted_cos"] < 1.0 and -1.0 <= row["mean_cos"] <= 1.0 + 1e-6
    # a looser output budget gives a smaller file
    assert rows[1]["bytes"] < rows[0]["bytes"]
    fb = RA.minilm_calibrated_point(1e-2, n_heldout=8, max_length=16, loader=loader, corpus=(train[:64], held[:8]),
                                    n_calib=8, feedback=True)
    assert fb["method"] == "lsc (post-training, calibrated + error feedback)"
    assert 0.0 < fb["predicted_cos"] < 1.0 and -1.0 <= fb["mean_cos"] <= 1.0 + 1e-6
    by_rows = RA.minilm_calibrated_point(1e-2, n_heldout=8, max_length=16, loader=loader,
                                         corpus=(train[:64], held[:8]), n_calib=8, feedback=True, rows=True)
    assert by_rows["method"] == "lsc (post-training, calibrated + error feedback + token counts)"
    assert "token counts" in by_rows["setting"] and -1.0 <= by_rows["mean_cos"] <= 1.0 + 1e-6
    assert by_rows["bytes"] != fb["bytes"]  # the embedding table was weighted: different symbols, another size
    finer = RA.minilm_calibrated_point(1e-2, n_heldout=8, max_length=16, loader=loader, corpus=(train[:64], held[:8]),
                                       n_calib=8, feedback=True, rows=True, table_scale=0.25)
    assert "word-embedding bound x 0.25" in finer["setting"]
    assert finer["bytes"] > by_rows["bytes"]  # a quarter of the table's bound: a finer step, a bigger table
    with pytest.raises(ValueError, match="feedback"):
        RA.minilm_calibrated_point(1e-2, loader=loader, corpus=(train[:64], held[:8]), n_calib=8, table_scale=0.5)
    qat = RA.minilm_calibrated_point(1e-2, n_heldout=8, max_length=16, loader=loader, corpus=(train[:64], held[:8]),
                                     n_calib=8, feedback=True, rows=True, log=lambda s: None,
                                     qat=dict(steps=2, lr=0.3, batch_size=4, **RA.INNER_FROZEN_TABLE))
    assert qat["method"] == "lsc (post-training, calibrated + error feedback + token counts + QAT at fixed steps)"
    assert qat["steps"] == 2 and qat["train_s"] > 0 and "2 distillation steps" in qat["setting"]
    assert "inner layers' outputs x 1000, frozen: embeddings.word_embeddings.*" in qat["setting"]
    assert RA.minilm_qat_key(1e-2, 2, 0.3, 1.0, RA.INNER_FROZEN_TABLE) != RA.minilm_qat_key(1e-2, 2, 0.3)
    # coefficients start at their bins' centres: a large rate moves some across a boundary within two steps
    assert qat["mean_cos"] != by_rows["mean_cos"]


QUERY = "encoder.layer.0.attention.self.query.parametrizations.weight.original"  # a coefficient tensor QAT moves


def _posttrained(tiny_bert):
    """(teacher, tokenizer, training verses, the teacher compressed post-training): where the QAT tests start."""
    import lsc
    loader, (train, _) = tiny_bert
    teacher, tok = loader()
    start = copy.deepcopy(teacher)
    lsc.compress_posttraining(start, max_error=0.1, progress=False)
    return teacher, tok, train, start


def test_finetune_at_fixed_steps_keeps_the_steps(tiny_bert):
    """QAT after post-training moves the coefficients but never the step sizes the allocation chose."""
    import lsc
    from benchmarks.lsc_minilm import finetune_at_fixed_steps
    loader, (train, _) = tiny_bert
    teacher, tok = loader()
    student = copy.deepcopy(teacher)
    lsc.compress_posttraining(student, max_error=0.1, progress=False)
    entries = lsc.state.get_state(student).entries
    before_e = [e.parametrization.exponent().clone() for e in entries]
    before_c = [e.parts()[1].detach().clone() for e in entries]
    secs = finetune_at_fixed_steps(student, teacher, tok, train[:32], 3, 5e-3, log=lambda s: None, batch_size=4,
                                   max_length=16)
    assert secs > 0 and not student.training
    assert all(torch.equal(b, e.parametrization.exponent()) for b, e in zip(before_e, entries))
    assert any(not torch.equal(b, e.parts()[1].detach()) for b, e in zip(before_c, entries))


def test_finetune_at_fixed_steps_freezes_by_name_and_distills_inner_layers(tiny_bert):
    """``freeze`` keeps the named coefficients as they are (their weight is then computed once, not per
    step), and ``hidden_weight`` adds the inner layers' outputs to the loss: another trajectory."""
    import lsc
    from benchmarks.lsc_minilm import finetune_at_fixed_steps
    from benchmarks.minilm import WORD_EMBEDDINGS
    from transformers import BertModel
    loader, (train, _) = tiny_bert
    one_layer, tok = loader()
    torch.manual_seed(0)
    teacher = BertModel(one_layer.config.__class__(**{**one_layer.config.to_dict(), "num_hidden_layers": 2}),
                        add_pooling_layer=False).eval()  # an inner layer to distill
    start = copy.deepcopy(teacher)
    lsc.compress_posttraining(start, max_error=0.1, progress=False)
    table = WORD_EMBEDDINGS.replace(".weight", ".parametrizations.weight.original")
    coeffs = {}
    for hw in (0.0, 1000.0):
        student = copy.deepcopy(start)
        finetune_at_fixed_steps(student, teacher, tok, train[:32], 3, 2e-2, log=lambda s: None, batch_size=4,
                                max_length=16, freeze=["embeddings.word_embeddings.*"], hidden_weight=hw)
        params = dict(student.named_parameters())
        assert torch.equal(params[table], dict(start.named_parameters())[table])
        student.train()
        emb = student.embeddings.word_embeddings
        assert emb.weight is emb.weight and not emb.weight.requires_grad  # frozen: computed once
        coeffs[hw] = params[QUERY].detach()
    assert not torch.equal(coeffs[0.0], coeffs[1000.0])


def test_finetune_at_fixed_steps_rate_weight_pulls_towards_cheaper_bins(tiny_bert):
    """With the rate term, QAT at fixed steps ends with a smaller coded size than without it."""
    import lsc
    from benchmarks.lsc_minilm import finetune_at_fixed_steps
    teacher, tok, train, start = _posttrained(tiny_bert)
    bits = {}
    for w in (0.0, 100.0):
        student = copy.deepcopy(start)
        finetune_at_fixed_steps(student, teacher, tok, train[:32], 8, 2e-2, log=lambda s: None, batch_size=4,
                                max_length=16, rate_weight=w)
        with torch.no_grad():
            bits[w] = float(lsc.rate_estimate(student).total)
    assert bits[100.0] < 0.99 * bits[0.0]


def test_finetune_at_fixed_steps_blank_unread_zeroes_only_unread_rows(tiny_bert):
    """``blank_unread`` zeroes the coefficients of the table rows no training verse reads, after the same
    training: those rows never had a gradient, every other coefficient ends as without the option, and the
    file shrinks. Without one-row blocks there is nothing row-wise to blank: a clear error."""
    import lsc
    from benchmarks.lsc_minilm import blank_unread_rows, finetune_at_fixed_steps, token_counts, train_vocab
    from benchmarks.minilm import WORD_EMBEDDINGS
    loader, (train, _) = tiny_bert
    teacher, tok = loader()
    train = train[:32]
    start = copy.deepcopy(teacher)
    lsc.compress_posttraining(start, max_error=0.1, hessians={WORD_EMBEDDINGS: token_counts(tok, train, 16)}, progress=False)
    table = WORD_EMBEDDINGS.replace(".weight", ".parametrizations.weight.original")
    read = train_vocab(tok, train, 16)
    got = {}
    for blank in (False, True):
        student = copy.deepcopy(start)
        finetune_at_fixed_steps(student, teacher, tok, train, 3, 2e-2, log=lambda s: None, batch_size=4,
                                max_length=16, blank_unread=blank)
        got[blank] = ({k: v.detach().clone() for k, v in student.named_parameters()},
                      sum(t.numel() for t in lsc.compress_weights(student).values()))
    plain, blanked = got[False][0], got[True][0]
    start_table = dict(start.named_parameters())[table]
    assert torch.equal(plain[table][~read], start_table[~read])  # unread rows: no gradient, unchanged by training
    assert start_table[~read].abs().sum() > 0 and torch.count_nonzero(blanked[table][~read]) == 0
    assert torch.equal(blanked[table][read], plain[table][read])
    assert all(torch.equal(plain[k], blanked[k]) for k in plain if k != table)
    assert got[True][1] < got[False][1]  # the file's bytes
    one_block = copy.deepcopy(teacher)
    lsc.compress_posttraining(one_block, max_error=0.1, progress=False)  # no counts: square blocks
    with pytest.raises(ValueError, match="one-row blocks"):
        blank_unread_rows(one_block, tok, train, 16, log=lambda s: None)


def test_spliced_text_is_a_run_of_words_across_two_neighbouring_verses():
    """Augmented distillation text: contiguous words of verse i followed by verse i + 1, reproducible by seed."""
    from benchmarks.lsc_minilm import spliced_text
    train = ["a b c d e f", "g h i j", "k l m"]
    joined = "a b c d e f g h i j".split()
    got = [spliced_text(train, 0, torch.Generator().manual_seed(s)) for s in range(40)]
    for text in got:
        words = text.split()
        assert 4 <= len(words) <= len(joined)
        start = joined.index(words[0])
        assert joined[start:start + len(words)] == words
    assert len(set(got)) > 5  # windows of many lengths and places
    assert got == [spliced_text(train, 0, torch.Generator().manual_seed(s)) for s in range(40)]
    wrap = spliced_text(train, 2, torch.Generator().manual_seed(0), min_words=5, max_words=5).split()
    assert " ".join(wrap) in "k l m a b c d e f"  # the last verse joins the first
    assert spliced_text(["one two"], 0, torch.Generator().manual_seed(0)) in "one two one two"


def test_distill_steps_augment_feeds_spliced_windows(tiny_bert):
    """``augment`` swaps part of each batch for spliced windows: another trajectory, same steps otherwise;
    ``augment=0`` is the plain verse order."""
    from benchmarks.lsc_minilm import finetune_at_fixed_steps
    teacher, tok, train, start = _posttrained(tiny_bert)
    seen, coeffs = {}, {}
    for aug in (0.0, 0.0, 1.0):
        student = copy.deepcopy(start)
        texts = []

        def spy(batch, *a, **k):
            texts.extend(batch)
            return tok(batch, *a, **k)
        finetune_at_fixed_steps(student, teacher, spy, train[:32], 3, 2e-2, log=lambda s: None, batch_size=4,
                                max_length=16, augment=aug)
        c = dict(student.named_parameters())[QUERY].detach()
        if aug in coeffs:
            assert torch.equal(coeffs[aug], c) and seen[aug] == texts  # deterministic
        coeffs[aug], seen[aug] = c, texts
    assert all(t in train[:32] for t in seen[0.0])
    assert sum(t in train[:32] for t in seen[1.0]) <= 1  # windows, not the verses (one may match by chance)
    assert not torch.equal(coeffs[0.0], coeffs[1.0])


def test_distill_steps_dropout_is_seeded_and_restored(tiny_bert):
    """``dropout`` trains the student with that dropout everywhere: another trajectory, the same one on a
    rerun, the caller's random state untouched and the modules' rates as they were afterwards."""
    from benchmarks.lsc_minilm import finetune_at_fixed_steps
    teacher, tok, train, start = _posttrained(tiny_bert)
    rates = [m.p for m in start.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates and any(rates)
    coeffs = {}
    for dropout in (0.0, 0.5, 0.5):
        student = copy.deepcopy(start)
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        finetune_at_fixed_steps(student, teacher, tok, train[:32], 3, 2e-2, log=lambda s: None, batch_size=4,
                                max_length=16, dropout=dropout)
        assert torch.equal(torch.rand(3), expected)  # the caller's random state as it left it
        assert [m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)] == rates
        c = dict(student.named_parameters())[QUERY].detach()
        if dropout in coeffs:
            assert torch.equal(coeffs[dropout], c)  # seeded
        coeffs[dropout] = c
    assert not torch.equal(coeffs[0.0], coeffs[0.5])


def test_substitute_tokens_replaces_one_inner_token():
    """At rate 1 every sequence longer than [CLS] [SEP] gets exactly one inner token from the pool, nothing
    else moves (padding included); at rate 0 nothing does; the same generator seed gives the same batch."""
    from benchmarks.lsc_minilm import substitute_tokens
    ids = torch.tensor([[101, 5, 6, 7, 102, 0], [101, 8, 102, 0, 0, 0], [101, 102, 0, 0, 0, 0], [101, 9, 9, 9, 9, 102]])
    mask = (ids != 0).long()
    pool = torch.tensor([2000, 2001, 2002])
    for seed in range(20):
        out = substitute_tokens(ids, mask, pool, 1.0, torch.Generator().manual_seed(seed))
        assert torch.equal(out, substitute_tokens(ids, mask, pool, 1.0, torch.Generator().manual_seed(seed)))
        changed = out != ids
        assert changed.sum(1).tolist() == [1, 1, 0, 1]
        assert torch.isin(out[changed], pool).all()
        assert not changed[:, 0].any() and not changed[mask == 0].any()
        assert not (changed & (ids == 102)).any()  # [SEP] stays
    assert torch.equal(substitute_tokens(ids, mask, pool, 0.0, torch.Generator().manual_seed(0)), ids)


def test_rare_token_pool_counts_training_lookups(tiny_bert):
    """The pool holds the ordinary tokens whose training count lies in ``[lo, hi)``: never special tokens or
    BERT's unused slots, every token of a once-seen word when ``lo = 1``, and nothing seen ``hi`` times."""
    from benchmarks.lsc_minilm import rare_token_pool, token_counts
    loader, _ = tiny_bert
    _, tok = loader()
    train = ["and the lord spake", "and the people", "and zerubbabel"]
    counts = token_counts(tok, train)
    once = rare_token_pool(tok, train, (1, 2))
    assert set(once.tolist()) == {i for i in range(999, len(tok)) if counts[i] == 1}
    assert set(tok("zerubbabel", add_special_tokens=False)["input_ids"]) <= set(once.tolist())
    unseen = rare_token_pool(tok, train, (0, 1))
    assert not set(unseen.tolist()) & set(tok.all_special_ids) and int(unseen.min()) >= 999
    assert tok.convert_tokens_to_ids("and") not in set(unseen.tolist()) | set(once.tolist())  # seen 3 times
    assert len(unseen) + len(once) + int(((counts >= 2) & (torch.arange(len(tok)) >= 999)).sum()) == len(tok) - 999


def test_distill_steps_rare_swap_feeds_teacher_and_student_the_same_tokens(tiny_bert):
    """``rare_swap`` replaces at most one token per verse by a rare one, in the batch that teacher and student
    both read (otherwise the batches of ``rare_swap=0``): a seeded, different trajectory."""
    from benchmarks.lsc_minilm import finetune_at_fixed_steps, rare_token_pool
    teacher, tok, train, start = _posttrained(tiny_bert)
    pool = set(rare_token_pool(tok, train[:32], (0, 10), 16).tolist())
    coeffs, batches = {}, {}
    for swap in (0.0, 1.0, 1.0):
        student = copy.deepcopy(start)
        seen = {"t": [], "s": []}
        hooks = [m.register_forward_pre_hook(lambda mod, a, k, key=key: seen[key].append(k["input_ids"].clone()),
                                             with_kwargs=True) for m, key in ((teacher, "t"), (student, "s"))]
        finetune_at_fixed_steps(student, teacher, tok, train[:32], 3, 2e-2, log=lambda s: None, batch_size=4,
                                max_length=16, rare_swap=swap)
        for h in hooks:
            h.remove()
        assert len(seen["s"]) == 3 and all(torch.equal(x, y) for x, y in zip(seen["t"], seen["s"]))
        c = dict(student.named_parameters())[QUERY].detach()
        if swap in coeffs:
            assert torch.equal(coeffs[swap], c)  # seeded
        coeffs[swap], batches[swap] = c, seen["s"]
    diff = [x != y for x, y in zip(batches[1.0], batches[0.0])]  # same verses, same padding
    assert all(d.sum(1).max() <= 1 for d in diff) and sum(int(d.sum()) for d in diff) >= 6
    assert set(torch.cat([x[d] for x, d in zip(batches[1.0], diff)]).tolist()) <= pool
    assert not torch.equal(coeffs[0.0], coeffs[1.0])
    with pytest.raises(ValueError, match="no token of the vocabulary is read 5-4 times"):
        finetune_at_fixed_steps(copy.deepcopy(start), teacher, tok, train[:32], 1, 2e-2, log=lambda s: None,
                                batch_size=4, max_length=16, rare_swap=0.5, rare_counts=(5, 5))


def test_report_and_plots(digits, tmp_path):
    from benchmarks import run_all as RA
    sec, _, _ = digits
    mini = dict(rows=[dict(model="minilm", method=m, setting="", bytes=b, ratio=90e6 / b, bpp=8 * b / 22.7e6,
                           enc_s=1.0, dec_s=1.0, mean_cos=c, min_cos=c - 0.05, passes=c >= 0.99)
                      for m, b, c in [("int8+zstd", 21_000_000, 0.999), ("lsc (fine-tuned)", 5_000_000, 0.991),
                                      ("lsc (fine-tuned)", 4_000_000, 0.985)]], seconds=1.0)
    RA.write_report(sec, mini, ["--quick"], 1.0, path=tmp_path / "B.md", summary=tmp_path / "S.md",
                    img=tmp_path / "img")
    text = (tmp_path / "B.md").read_text()
    assert "Digits CNN" in text and "MiniLM-L6" in text and "Versions:" in text
    assert (tmp_path / "img" / "rate_accuracy_digits.png").stat().st_size > 1000
    assert (tmp_path / "img" / "rate_accuracy_minilm.png").stat().st_size > 1000
    assert "lsc (fine-tuned): 5.00 MB" in (tmp_path / "S.md").read_text()


def test_training_benchmark_side_and_table():
    """bench_training's per-process measurement (incl. the exact-rate pass it amortizes) and its table."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_training as BT
    threads = torch.get_num_threads()
    try:
        got = {side: BT.measure_side("digits", side, steps=2, warmup=1) for side in ("plain", "spectral")}
    finally:
        torch.set_num_threads(threads)
    assert got["plain"]["refresh_ms"] == 0.0 and got["spectral"]["refresh_every"] == 25
    assert got["spectral"]["refresh_ms"] > 0 and all(r["ms"] > 0 and r["cpu_ms"] > 0 for r in got.values())
    row = dict(model="digits", steps=2, rounds=1)
    for malloc in ("default", "keep"):
        row.update({f"{malloc}_{k}": v for k, v in dict(plain_ms=1.0, spectral_ms=1.2, ratio=1.2, cpu_ratio=1.2, plain_faults=0,
                                                         spectral_faults=0, refresh_ms=got["spectral"]["refresh_ms"]).items()})
    table = BT.to_markdown([row])
    assert "**1.20x**" in table and len(table.splitlines()) == 3


def test_lazy_benchmark_rows_and_table(tmp_path):
    """bench_lazy on the digits CNN, one repetition: every config's row, the first forward's peak, the table."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import argparse

    import bench_lazy as BL
    device = torch.device("cpu")
    name, make, path, run, desc = BL.digits_case(str(tmp_path), device)
    got = BL.bench(name, make, path, run, device, 1, desc)
    rows = {r["config"]: r for r in got["rows"]}
    assert set(rows) == {"dense fp32", "lazy packed", "lazy entropy"}
    for k in ("lazy packed", "lazy entropy"):
        assert 0 < rows[k]["resident"] < rows["dense fp32"]["resident"] and rows[k]["first_peak"] > rows[k]["resident"]
    table = BL.to_markdown([got], argparse.Namespace(reps=1, threads=torch.get_num_threads()), device)
    assert "first peak MB" in table and table.count("| lazy ") == 2


def test_error_attribution_shares():
    """Restoring the only corrupted tensor (or its corrupted rows) removes all of the loss; others none."""
    from benchmarks.error_attribution import rows, shares, whole
    torch.manual_seed(0)
    table, lin = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3)
    original = {"table": table.weight.detach().clone(), "lin": lin.weight.detach().clone()}
    decoded = dict(original, table=original["table"].clone())
    decoded["table"][[2, 7]] += 0.5
    ids = torch.arange(10)

    def score(sd):
        out = torch.nn.functional.embedding(ids, sd["table"]) @ sd["lin"].T
        ref = torch.nn.functional.embedding(ids, original["table"]) @ original["lin"].T
        return 1 - float((out - ref).norm() / ref.norm())
    base, got = shares(original, decoded, score, {
        "table": whole(lambda k: k == "table"), "lin": whole(lambda k: k == "lin"),
        "bad rows": rows("table", torch.tensor([i in (2, 7) for i in range(10)])),
        "one bad row": rows("table", torch.tensor([i == 2 for i in range(10)]))})
    assert base < 1
    assert got["table"] == (1.0, 1.0) and got["bad rows"] == (1.0, 1.0)
    assert got["lin"] == (base, 0.0)
    assert 0 < got["one bad row"][1] < 1


def test_column_scale_study_keeps_the_output_error():
    """Scaling a layer's input columns, rescaling its Hessian and unscaling the decoded weight is exact:
    the same weight error costs the same output error, and a = 0 changes nothing."""
    from benchmarks.study_column_scales import column_scales, scale_model, unscale
    torch.manual_seed(0)
    x = torch.randn(64, 6, dtype=torch.float64) * torch.tensor([0.1, 1, 5, 1, 20, 2], dtype=torch.float64)
    lin = torch.nn.Linear(6, 3).double()
    w0 = lin.weight.detach().clone()
    hess = {"weight": x.T @ x, "table": torch.ones(5, dtype=torch.float64)}
    assert column_scales(hess, 0.0) == {}
    scales = column_scales(hess, 1.0)
    assert set(scales) == {"weight"} and abs(float(scales["weight"].log().mean())) < 1e-12
    assert torch.allclose(scales["weight"] ** 2 / hess["weight"].diagonal(), (scales["weight"] ** 2 / hess["weight"].diagonal())[0])
    h = scale_model(dict(lin.named_parameters()), hess, scales)
    assert not torch.allclose(lin.weight, w0) and h["table"] is hess["table"]
    err = torch.randn(3, 6, dtype=torch.float64) * 1e-3  # an error of the scaled weight, as the codec would make
    decoded = unscale({"weight": lin.weight.detach() + err, "bias": lin.bias.detach()}, scales)
    assert torch.allclose(unscale({"weight": lin.weight.detach()}, scales)["weight"], w0)
    assert torch.equal(decoded["bias"], lin.bias.detach())
    out_err = ((decoded["weight"] - w0) @ x.T).pow(2).sum()
    assert torch.allclose(out_err, torch.einsum("oi,ij,oj->", err, h["weight"], err))
