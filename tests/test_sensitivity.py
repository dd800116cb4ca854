"""Calibrated error bounds: sensitivity measurement, the allocation, and their use in post-training compression."""
import math

import pytest
import torch
from torch import nn

import lsc
from lsc import TensorSensitivity as S


def _rate(bounds, sens):
    """Bits the high-rate model charges for these bounds (up to a constant): sum n log2(1 / e)."""
    return sum(s.numel * math.log2(1 / bounds[n]) for n, s in sens.items())


def test_allocation_meets_the_target_and_beats_a_uniform_bound():
    sens = {"a": S(1.0, 100), "b": S(100.0, 100), "c": S(1.0, 10_000)}
    bounds = lsc.allocate_error_bounds(sens, 1e-3)
    assert lsc.predicted_distortion(sens, bounds) == pytest.approx(1e-3, rel=1e-9)
    # e^2 proportional to n / s: 100x the sensitivity at equal size -> a 10x tighter bound
    assert bounds["a"] / bounds["b"] == pytest.approx(10.0)
    assert bounds["c"] / bounds["a"] == pytest.approx(10.0)
    assert bounds["default"] == 0.05
    # one bound for all at the same predicted distortion costs more bits
    uniform = math.sqrt(1e-3 / sum(s.per_error2 for s in sens.values()))
    assert _rate(bounds, sens) < _rate({n: uniform for n in sens}, sens) - 100


def test_insensitive_tensors_are_capped_and_the_rest_still_meet_the_target():
    sens = {"dead": S(0.0, 1000), "a": S(1.0, 100), "b": S(4.0, 100)}
    bounds = lsc.allocate_error_bounds(sens, 1e-3, max_bound=0.4)
    assert bounds["dead"] == 0.4
    assert lsc.predicted_distortion(sens, bounds) == pytest.approx(1e-3, rel=1e-9)
    assert bounds["a"] == pytest.approx(2 * bounds["b"])
    # a budget larger than everything at the cap: every tensor at the cap
    loose = lsc.allocate_error_bounds(sens, 10.0, max_bound=0.4)
    assert all(loose[n] == 0.4 for n in sens)


@pytest.mark.parametrize("kwargs, match", [(dict(target=0.0), "target"), (dict(target=float("nan")), "target"),
                                           (dict(target=1e-3, max_bound=0.0), "max_bound"),
                                           (dict(target=1e-3, default=-1.0), "default=-1.0 must be a finite number >= 0")])
def test_allocation_rejects_bad_arguments(kwargs, match):
    with pytest.raises(lsc.LscError, match=match):
        lsc.allocate_error_bounds({"a": S(1.0, 10)}, **kwargs)
    with pytest.raises(lsc.LscError, match="empty"):
        lsc.allocate_error_bounds({}, 1e-3)


class TwoBranches(nn.Module):
    """out = loud(x) + 0.01 * quiet(x): the quiet branch's weights barely reach the output."""

    def __init__(self):
        super().__init__()
        self.loud = nn.Linear(64, 64)
        self.quiet = nn.Linear(64, 64)

    def forward(self, x):
        return self.loud(x) + 0.01 * self.quiet(x)


def _mse_to(model, x):
    with torch.no_grad():
        ref = model(x).clone()

    @torch.no_grad()
    def distortion(m):
        return float(((m(x) - ref) ** 2).mean() / ref.pow(2).mean())
    return distortion


def test_measure_sensitivity_ranks_tensors_and_restores_the_model():
    torch.manual_seed(0)
    model = TwoBranches()
    x = torch.randn(256, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    sens = lsc.measure_sensitivity(model, _mse_to(model, x), probe=0.05, progress=False)
    assert set(sens) == {"loud.weight", "quiet.weight"}  # vectors are not probed
    assert sens["loud.weight"].numel == 64 * 64
    assert sens["loud.weight"].per_error2 > 1000 * sens["quiet.weight"].per_error2 > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), rng)
    # the small-error model: distortion per squared error hardly depends on the probe's size
    again = lsc.measure_sensitivity(model, _mse_to(model, x), probe=0.02, progress=False)
    assert again["loud.weight"].per_error2 == pytest.approx(sens["loud.weight"].per_error2, rel=0.25)


def test_calibrated_bounds_give_a_smaller_file_at_the_same_distortion(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    base = TwoBranches()
    state = base.state_dict()
    distortion = _mse_to(base, x)
    sens = lsc.measure_sensitivity(base, distortion, progress=False)
    target = 1e-3
    bounds = lsc.allocate_error_bounds(sens, target)
    uniform = math.sqrt(target / sum(s.per_error2 for s in sens.values()))
    got = {}
    for name, max_error in (("calibrated", bounds), ("uniform", uniform)):
        model = TwoBranches()
        model.load_state_dict(state)
        res = lsc.compress_posttraining(model, max_error=max_error, path=tmp_path / f"{name}.lsc", progress=False)
        decoded = lsc.load(tmp_path / f"{name}.lsc", TwoBranches())
        got[name] = (res.file_bytes, distortion(decoded))
        if name == "calibrated":  # each tensor got its own bound, by exact name
            assert {t["name"]: t["bound"] for t in res.tensors if t["name"] in bounds} == \
                {n: pytest.approx(bounds[n]) for n in sens}
    assert got["calibrated"][0] < 0.8 * got["uniform"][0]
    assert got["calibrated"][1] <= 2 * target and got["uniform"][1] <= 2 * target


def test_measure_sensitivity_rejects_bad_input_and_restores_weights_on_failure():
    model = TwoBranches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lsc.LscError, match="probe"):
        lsc.measure_sensitivity(model, lambda m: 0.0, probe=0.0)
    calls = []

    def nan_when_perturbed(m):
        calls.append(1)
        return 0.0 if len(calls) == 1 else float("nan")
    with pytest.raises(lsc.LscError, match="loud.weight perturbed"):
        lsc.measure_sensitivity(model, nan_when_perturbed, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(lsc.LscError, match="must return a number"):
        lsc.measure_sensitivity(model, lambda m: "far", progress=False)
    with pytest.raises(lsc.LscError, match="rank >= 2"):
        lsc.measure_sensitivity(nn.LayerNorm(8), lambda m: 0.0, progress=False)
    with pytest.raises(lsc.LscError, match="probe"):
        lsc.measure_sensitivity(model, lambda m: 0.0, probe={"default": True}, progress=False)
    lsc.spectral(model)
    with pytest.raises(lsc.LscError, match="already a spectral model"):
        lsc.measure_sensitivity(model, lambda m: 0.0, progress=False)


def test_probe_per_tensor_from_a_bounds_dict():
    torch.manual_seed(0)
    model = TwoBranches()
    d = _mse_to(model, torch.randn(64, 64))
    small = lsc.measure_sensitivity(model, d, probe=0.02, progress=False)
    large = lsc.measure_sensitivity(model, d, probe=0.3, progress=False)
    mixed = lsc.measure_sensitivity(model, d, probe={"loud.weight": 0.02, "default": 0.3}, progress=False)
    assert mixed["loud.weight"] == small["loud.weight"] and mixed["quiet.weight"] == large["quiet.weight"]
    # the second pass of the recipe: probing at the allocated bounds
    bounds = lsc.allocate_error_bounds(small, 1e-3)
    again = lsc.measure_sensitivity(model, d, probe=bounds, progress=False)
    assert set(again) == set(small)
    with pytest.raises(lsc.LscError, match="quiet.weight"):
        lsc.measure_sensitivity(model, d, probe={"quiet.weight": 1.5}, progress=False)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mid(self.emb(ids))))


def test_tied_and_half_precision_tensors_are_probed_once_and_restored():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (32, 8))
    for dtype in (torch.float32, torch.float16):
        model = Tied().to(dtype)
        with torch.no_grad():
            ref = model(ids).float()

        @torch.no_grad()
        def d(m):
            return float(((m(ids).float() - ref) ** 2).mean())
        before = {k: v.clone() for k, v in model.state_dict().items()}
        sens = lsc.measure_sensitivity(model, d, progress=False)
        assert set(sens) == {"emb.weight", "mid.weight"}  # the tied copy is one tensor
        assert all(s.per_error2 > 0 for s in sens.values())
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert model.out.weight is model.emb.weight


def test_finalize_with_sensitivity_cuts_where_the_output_cares_least():
    import copy

    from lsc.zoo import load_digits_split, train_digits_cnn
    torch.manual_seed(0)
    xtr = load_digits_split()[0]
    base = train_digits_cnn(epochs=5).eval()
    with torch.no_grad():
        ref = torch.log_softmax(base(xtr), -1)

    @torch.no_grad()
    def kl(m):
        return float((ref.exp() * (ref - torch.log_softmax(m(xtr), -1))).sum(-1).mean())
    sens = lsc.measure_sensitivity(base, kl, progress=False)
    spectral = copy.deepcopy(base)
    lsc.compress_posttraining(spectral, bits=5, progress=False)
    start = lsc.RateController(spectral, target_bytes=1e9).predicted_bytes()
    got = {}
    for mode in ("uniform", "sensitivity"):
        model = copy.deepcopy(spectral)
        ctrl = lsc.RateController(model, target_bytes=0.5 * start)
        err = ctrl.finalize(sensitivity=sens if mode == "sensitivity" else None)
        assert abs(err) <= ctrl.tolerance and abs(ctrl.predicted_bytes() / (0.5 * start) - 1) <= ctrl.tolerance
        got[mode] = kl(model.eval())
    # the same size, a much smaller divergence from the original predictions
    assert got["sensitivity"] < 0.5 * got["uniform"]


def test_measure_sensitivity_wants_a_distortion_function():
    with pytest.raises(lsc.LscError, match=r"distortion must be a function distortion\(model\) -> float.*got float"):
        lsc.measure_sensitivity(nn.Sequential(nn.Linear(8, 4)), 0.1)


def test_a_tensor_the_distortion_does_not_see_gets_the_cap_whatever_the_target():
    """Its bound costs no distortion; with a finite weight it used to take a share of a small budget."""
    from lsc import TensorSensitivity
    sens = {"seen": TensorSensitivity(1e4, 1000), "unseen": TensorSensitivity(0.0, 10**6)}
    for target in (1e-2, 1e-6, 1e-10):
        bounds = lsc.allocate_error_bounds(sens, target=target, max_bound=0.5)
        assert bounds["unseen"] == 0.5
        assert lsc.predicted_distortion(sens, bounds) == pytest.approx(target, rel=1e-6)
