"""Error feedback (GPTQ-style) in post-training compression: lsc.collect_hessians + hessians=."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lsc
from lsc import TensorSensitivity as S
from lsc.feedback import feedback_quantize
from lsc.blocking import BlockLayout
from lsc.state import get_state


def _correlated_inputs(n, features, seed=0):
    """Inputs whose features are strongly correlated and of very different scales, like a transformer's."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) * torch.logspace(0, -2, features).unsqueeze(1)
    return torch.randn(n, features, generator=g) @ mix + 0.1 * torch.randn(n, features, generator=g)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(12, 16, 3, padding=1)
        self.fc = nn.Linear(37, 21)  # neither dim a multiple of the 8x8 block: padding rows and columns

    def forward(self, img, vec):
        return self.conv(img).mean((2, 3)), self.fc(vec)


def _setup(seed=0):
    torch.manual_seed(seed)
    net = Net()
    vec = _correlated_inputs(512, 37, seed)
    img = _correlated_inputs(64 * 36, 12, seed + 1).reshape(64, 6, 6, 12).permute(0, 3, 1, 2).contiguous()
    return net, img, vec


def _output_errors(net, ref, img, vec):
    with torch.no_grad():
        out = net(img, vec)
    return [float((o - r).pow(2).sum()) for o, r in zip(out, ref)]


def test_collect_hessians_is_x_transpose_x_of_every_layer_input():
    net, img, vec = _setup()
    h = lsc.collect_hessians(net, lambda m: (m(img[:10], vec[:100]), m(img[10:], vec[100:])))
    assert set(h) == {"conv.weight", "fc.weight"}
    x = vec.double()
    torch.testing.assert_close(h["fc.weight"], x.T @ x)
    patches = F.unfold(img.double(), 3, padding=1).transpose(1, 2).reshape(-1, 12 * 9)
    torch.testing.assert_close(h["conv.weight"], patches.T @ patches)
    assert all(t.dtype == torch.float64 for t in h.values())


def test_feedback_cuts_the_output_error_at_about_the_same_size(tmp_path):
    net, img, vec = _setup()
    with torch.no_grad():
        ref = net(img, vec)
    hessians = lsc.collect_hessians(net, lambda m: m(img, vec))
    plain, fed = copy.deepcopy(net), copy.deepcopy(net)
    a = lsc.compress_posttraining(plain, bits=3, path=tmp_path / "plain.lsc", progress=False)
    b = lsc.compress_posttraining(fed, bits=3, hessians=hessians, path=tmp_path / "fed.lsc", progress=False)
    err_plain, err_fed = _output_errors(plain, ref, img, vec), _output_errors(fed, ref, img, vec)
    for p, f in zip(err_plain, err_fed):
        assert f < 0.5 * p  # the output error on the calibration inputs at least halves
    assert abs(b.file_bytes / a.file_bytes - 1) < 0.1
    rows = {r["name"]: r for r in b.tensors}
    assert rows["fc.weight"]["feedback"] and rows["conv.weight"]["feedback"] and not rows["fc.bias"]["feedback"]
    ratios = b.feedback_ratios
    assert set(ratios) == {"conv.weight", "fc.weight"}
    assert ratios["fc.weight"] == pytest.approx(err_fed[1] / err_plain[1], rel=0.05)  # biases are exact enough
    # the weight error grows: feedback trades it for the output error
    assert rows["fc.weight"]["rel_error"] > {r["name"]: r for r in a.tensors}["fc.weight"]["rel_error"]
    # the file decodes to exactly the weights the compressed model uses
    fresh = Net()
    fresh.load_state_dict(lsc.load(tmp_path / "fed.lsc"))
    with torch.no_grad():
        for name in ("conv.weight", "fc.weight"):
            mod = getattr(fed, name.split(".")[0])
            assert torch.equal(getattr(fresh, name.split(".")[0]).weight, mod.weight)


def test_an_identity_hessian_gives_plain_rounding():
    net, img, vec = _setup()
    plain, fed = copy.deepcopy(net), copy.deepcopy(net)
    lsc.compress_posttraining(plain, max_error=0.1, progress=False)
    lsc.compress_posttraining(fed, max_error=0.1, hessians={"fc.weight": 7 * torch.eye(37, dtype=torch.float64)},
                              progress=False)
    assert torch.equal(plain.fc.weight, fed.fc.weight)
    assert torch.equal(plain.conv.weight, fed.conv.weight)


def test_feedback_quantize_of_an_isolated_block_column_is_rounding():
    layout = BlockLayout((8, 8), (8, 8))  # one block column: nothing after it to compensate
    w = torch.randn(8, 8, dtype=torch.float64)
    step = torch.full((8, 8), 0.3, dtype=torch.float64)
    h = _correlated_inputs(100, 8).double()
    q = feedback_quantize(w, h.T @ h, layout, step, 0.0, 1.0)
    from lsc.transforms import block_transform
    assert torch.equal(q, torch.round(block_transform(w.reshape(1, 1, 8, 8), (8, 8)) / step).to(torch.int64))


def test_allocation_with_feedback_ratios_scales_each_sensitivity():
    sens = {"a": S(1.0, 1000), "b": S(1.0, 1000)}
    plain = lsc.allocate_error_bounds(sens, 1e-4)
    fed = lsc.allocate_error_bounds(sens, 1e-4, feedback={"a": 0.25})
    assert plain["a"] == pytest.approx(plain["b"])
    assert fed["a"] / fed["b"] == pytest.approx(2.0)  # a quarter of the sensitivity: twice the error
    assert lsc.predicted_distortion(sens, fed, feedback={"a": 0.25}) == pytest.approx(1e-4)
    with pytest.raises(lsc.LscError, match="feedback"):
        lsc.allocate_error_bounds(sens, 1e-4, feedback={"a": float("nan")})


@pytest.mark.parametrize("kwargs,match", [
    (dict(hessians={"fc.weight": torch.eye(36)}), r"shape \(36, 36\).*\(37, 37\)"),
    (dict(hessians={"nope.weight": torch.eye(37)}), "no parameter named 'nope.weight'"),
    (dict(hessians={"fc.weight": torch.full((37, 37), float("nan"))}), "NaN"),
    (dict(hessians={"fc.weight": [[1.0]]}), "must be a tensor"),
    (dict(hessians={"fc.weight": torch.ones(20)}), r"one count per row.*\(21, 37\)"),
    (dict(hessians={"fc.bias": torch.ones(21)}), "needs a matrix"),
    (dict(hessians={"fc.weight": -torch.ones(21)}), "counts >= 0"),
    (dict(hessians=[torch.eye(37)]), "must be a dict"),
    (dict(hessians={"fc.weight": torch.eye(37)}, rdo=1.0), "rdo and hessians"),
    (dict(hessians={}, damp=-1), "damp"),
    (dict(hessians={}, row_prior=0), "row_prior"),
    (dict(hessians={}, row_prior=float("inf")), "row_prior"),
])
def test_bad_hessians_are_refused_before_anything_changes(kwargs, match):
    net, _, _ = _setup()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(lsc.LscError, match=match):
        lsc.compress_posttraining(net, max_error=0.1, progress=False, **kwargs)
    assert getattr(net, "_lsc", None) is None
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_collect_hessians_needs_a_layer_that_runs():
    with pytest.raises(lsc.LscError, match="no nn.Linear, nn.Conv2d or nn.Embedding"):
        lsc.collect_hessians(nn.Sequential(nn.LayerNorm(4)), lambda m: m(torch.randn(2, 4)))
    with pytest.raises(lsc.LscError, match="did not call"):
        lsc.collect_hessians(nn.Sequential(nn.Linear(4, 4)), lambda m: None)


def test_tied_tensors_are_rounded_plainly_and_half_precision_gets_feedback(tmp_path):
    torch.manual_seed(0)
    tied = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False), nn.Linear(16, 24)).half()
    tied[1].weight = tied[0].weight
    x = _correlated_inputs(256, 16).half()
    hess = lsc.collect_hessians(tied, lambda m: m(x))
    assert set(hess) == {"0.weight", "2.weight"}  # the tie is one parameter: its two uses add up
    res = lsc.compress_posttraining(tied, bits=2, hessians=hess, path=tmp_path / "t.lsc", progress=False)
    rows = {r["name"]: r for r in res.tensors}
    assert not rows["0.weight"]["feedback"] and rows["0.weight"]["tied"] == ["1.weight"]
    assert rows["2.weight"]["feedback"] and rows["2.weight"]["output_error_ratio"] < 1.0
    back = lsc.load(tmp_path / "t.lsc")
    assert back["2.weight"].dtype == torch.float16
    assert torch.equal(back["2.weight"], tied[2].weight) and torch.equal(back["1.weight"], back["0.weight"])


class Lookup(nn.Module):
    """A text model in miniature: an embedding table read through Zipf-distributed tokens, then a Linear layer."""

    def __init__(self, vocab=400, dim=48):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, 8)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


def _zipf_ids(n, vocab, seed=0):
    """Token ids whose frequencies fall as 1/rank, over a fifth of the vocabulary (the rest never occur)."""
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, vocab // 5 + 1, dtype=torch.float64)
    ids = torch.multinomial(p / p.sum(), n * 12, replacement=True, generator=g)
    return torch.randperm(vocab, generator=g)[ids].reshape(n, 12)  # frequent ids spread over the table


def test_collect_hessians_counts_the_rows_an_embedding_looks_up():
    torch.manual_seed(0)
    net, ids = Lookup(), _zipf_ids(64, 400)
    h = lsc.collect_hessians(net, lambda m: (m(ids[:10]), m(ids[10:])))
    assert set(h) == {"emb.weight", "fc.weight"}
    assert h["emb.weight"].dtype == torch.float64
    assert torch.equal(h["emb.weight"], torch.bincount(ids.reshape(-1), minlength=400).double())
    tied = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10, bias=False))
    tied[1].weight = tied[0].weight  # an output layer tied to the input table keeps its X^T X
    ht = lsc.collect_hessians(tied, lambda m: m(torch.tensor([[1, 2, 3]])))
    assert list(ht) == ["0.weight"] and ht["0.weight"].shape == (6, 6)


def test_row_counts_spend_the_bits_on_the_rows_that_are_read(tmp_path):
    torch.manual_seed(0)
    net, ids = Lookup(), _zipf_ids(4096, 400)
    with torch.no_grad():
        ref = net(ids)
    counts = lsc.collect_hessians(net, lambda m: m(ids))["emb.weight"]
    plain_net, rows_net = copy.deepcopy(net), copy.deepcopy(net)
    plain = lsc.compress_posttraining(plain_net, max_error=0.1, path=tmp_path / "plain.lsc", progress=False,
                                      block_size={"emb.weight": (1, 64), "default": 8})  # the same blocks
    rows = lsc.compress_posttraining(rows_net, max_error=0.1, hessians={"emb.weight": counts},
                                     path=tmp_path / "rows.lsc", progress=False)
    row = next(t for t in rows.tensors if t["name"] == "emb.weight")
    assert row["row_weighted"] and row["feedback"] and row["bits"] == next(
        t["bits"] for t in plain.tensors if t["name"] == "emb.weight")  # same step: only the symbols differ
    assert _block_shape(rows_net, "emb.weight") == (1, 48)  # 1 x 64, clipped
    assert rows.file_bytes < 0.6 * plain.file_bytes
    w, w_hat = net.emb.weight.detach(), rows_net.emb.weight.detach()
    err = (w_hat - w).pow(2).sum(1) / w.pow(2).sum(1)
    read, unread = counts >= 20, counts == 0
    assert read.sum() >= 5 and unread.sum() >= 300
    assert err[read].mean() < 0.1 * err[unread].mean()  # read rows stay close, unread ones may vanish
    d = w_hat - w
    expected = float(((d.double().pow(2).sum(1)) * (counts + 1)).sum())
    assert row["output_error_ratio"] == pytest.approx(expected / _plain_row_error(plain_net, net, counts))
    with torch.no_grad():  # the model's output on the calibration tokens barely moves
        out, plain_out = rows_net(ids), plain_net(ids)
    assert float((out - ref).pow(2).mean()) < 2 * float((plain_out - ref).pow(2).mean())
    fresh = Lookup()
    lsc.load(tmp_path / "rows.lsc", fresh)
    assert torch.equal(fresh.emb.weight, w_hat) and torch.equal(fresh.fc.weight, rows_net.fc.weight.detach())


def _block_shape(net, name):
    return next(e for e in get_state(net).entries if e.name == name).parametrization.layout.block_shape


def _plain_row_error(plain_net, net, counts, prior=1.0):
    d = plain_net.emb.weight.detach() - net.emb.weight.detach()
    return float((d.double().pow(2).sum(1) * (counts + prior)).sum())


def test_a_larger_row_prior_keeps_the_unread_rows_for_a_larger_file(tmp_path):
    torch.manual_seed(0)
    net, ids = Lookup(), _zipf_ids(4096, 400)
    counts = lsc.collect_hessians(net, lambda m: m(ids))["emb.weight"]
    plain_net = copy.deepcopy(net)
    lsc.compress_posttraining(plain_net, max_error=0.1, progress=False, block_size={"emb.weight": (1, 64), "default": 8})
    unread = counts == 0
    got = {}
    for prior in (1.0, 30.0):
        m = copy.deepcopy(net)
        res = lsc.compress_posttraining(m, max_error=0.1, hessians={"emb.weight": counts}, row_prior=prior,
                                        path=tmp_path / f"{prior}.lsc", progress=False)
        row = next(t for t in res.tensors if t["name"] == "emb.weight")
        d = (m.emb.weight.detach() - net.emb.weight.detach()).double()
        # the reported ratio weighs rows by count + prior, as the rounding did
        assert row["output_error_ratio"] == pytest.approx(
            float((d.pow(2).sum(1) * (counts + prior)).sum()) / _plain_row_error(plain_net, net, counts, prior))
        got[prior] = (res.file_bytes, float(d[unread].pow(2).mean()))
    assert got[30.0][0] > got[1.0][0]              # more bytes ...
    assert got[30.0][1] < 0.5 * got[1.0][1]        # ... spent on the rows calibration never read


def test_row_counts_keep_a_block_size_given_per_tensor():
    torch.manual_seed(0)
    net, ids = Lookup(), _zipf_ids(64, 400)
    counts = lsc.collect_hessians(net, lambda m: m(ids))["emb.weight"]
    lsc.compress_posttraining(net, max_error=0.1, hessians={"emb.weight": counts},
                              block_size={"emb.*": (4, 4), "default": 8}, progress=False)
    assert _block_shape(net, "emb.weight") == (4, 4)


def test_collect_hessians_on_a_spectral_model_says_to_use_the_plain_one():
    model = nn.Sequential(nn.Linear(8, 8))
    lsc.spectral(model)
    with pytest.raises(lsc.LscError, match="collect_hessians takes the plain model"):
        lsc.collect_hessians(model, lambda m: m(torch.randn(4, 8)))


def test_collect_hessians_wants_a_function_not_the_batches():
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(lsc.LscError, match=r"run must be a function run\(model\).*got list"):
        lsc.collect_hessians(model, [torch.randn(2, 8)])
    assert not model[0]._forward_pre_hooks


@pytest.mark.parametrize("bad", [lambda n: -torch.eye(n, dtype=torch.float64),
                                 lambda n: torch.diag(torch.tensor([1.0] * (n - 1) + [-1e6], dtype=torch.float64))],
                         ids=["negative", "one-negative-direction"])
def test_a_hessian_that_is_not_positive_definite_is_refused_before_the_model_changes(bad):
    model, x, ref, params = _mlp_and_its_state()
    with pytest.raises(lsc.LscError, match=r"hessians\['0.weight'\] is not positive definite even with damp=0.01"):
        lsc.compress_posttraining(model, max_error=0.05, hessians={"0.weight": bad(16)}, progress=False)
    _assert_as_it_was(model, params, x, ref)
    good = {"0.weight": x.T.double() @ x.double()}  # a retry with a real X^T X works
    assert lsc.compress_posttraining(model, max_error=0.05, hessians=good, progress=False).tensors[0]["feedback"]


def test_a_failure_inside_the_feedback_loop_leaves_the_model_as_it_was(monkeypatch):
    import lsc.posttraining as pt
    model, x, ref, params = _mlp_and_its_state()

    def breaks(*a, **k):
        raise lsc.LscError("the Hessian is not positive definite even with damp=0.01; raise damp")
    monkeypatch.setattr(pt, "feedback_quantize", breaks)
    with pytest.raises(lsc.LscError, match="not positive definite"):
        lsc.compress_posttraining(model, max_error=0.05, hessians={"2.weight": torch.eye(16)}, progress=False)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    _assert_as_it_was(model, params, x, ref)


def _mlp_and_its_state():
    """A small MLP, an input, its output and (name, parameter, value) of each parameter, to compare against later."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(64, 16)
    with torch.no_grad():
        ref = model(x)
    params = [(n, p, p.detach().clone()) for n, p in model.named_parameters()]
    return model, x, ref, params


def _assert_as_it_was(model, params, x, ref):
    """No parametrization or lsc state left, the same Parameter objects with the same values, the same outputs."""
    from torch.nn.utils import parametrize
    assert not any(parametrize.is_parametrized(m) for m in model.modules()) and getattr(model, "_lsc", None) is None
    assert [(n, p) for n, p in model.named_parameters()] == [(n, p) for n, p, _ in params]
    assert all(torch.equal(p, v) for _, p, v in params)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
