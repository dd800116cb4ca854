"""Issue 8: wavelet transform, low-rank + spectral, buffer compression, size target."""
import io
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lsc
from lsc.buffers import float_buffers, quantized_values
from lsc.lowrank import factor_report
from lsc.rate import HEADER_BYTES_PER_TENSOR
from lsc.transforms import TRANSFORMS, block_inverse_transform, block_transform
from lsc.wavelets import WAVELETS, lifting_forward, lifting_inverse, wavelet_matrices
from lsc.zoo import train_classifier


# ----------------------------------------------------------------------------- wavelets

@pytest.mark.parametrize("name", ["wavelet", "wavelet53"])
@pytest.mark.parametrize("block", [(1,), (2,), (5,), (8,), (3, 7), (8, 8), (2, 3, 5), (4, 3, 1, 2), (9, 16)])
def test_wavelet_block_transform_is_exactly_invertible(name, block):
    x = torch.randn(3, 2, *block, dtype=torch.float64)  # two block-grid dims
    c = block_transform(x, block, name)
    assert c.shape == x.shape
    torch.testing.assert_close(block_inverse_transform(c, block, name), x, atol=1e-12, rtol=0)
    x32 = x.float()
    back = block_inverse_transform(block_transform(x32, block, name), block, name)
    torch.testing.assert_close(back, x32, atol=2e-6, rtol=0)


def _reference_lift(x: list[float], steps, scale) -> list[float]:
    """One level of lifting with whole-sample symmetric extension, written as a plain loop."""
    n = len(x)
    ext = lambda v, i: v[-i] if i < 0 else (v[2 * (n - 1) - i] if i >= n else v[i])  # noqa: E731
    y = list(x)
    for j, c in enumerate(steps):
        start = 1 if j % 2 == 0 else 0  # predict odd samples from even ones, then update even ones
        new = list(y)
        for i in range(start, n, 2):
            new[i] = y[i] + c * (ext(y, i - 1) + ext(y, i + 1))
        y = new
    s = [y[i] * scale[0] for i in range(0, n, 2)]
    d = [y[i] * scale[1] for i in range(1, n, 2)]
    return s + d


@pytest.mark.parametrize("wavelet", ["cdf97", "legall53"])
@pytest.mark.parametrize("n", [2, 3, 4, 7, 8, 13, 16])
def test_lifting_matches_direct_loop_implementation(wavelet, n):
    steps, scale = WAVELETS[wavelet]
    x = torch.randn(n, dtype=torch.float64)
    want = x.tolist()
    m = n
    while m >= 2:  # multi-level: re-split the low band
        want = _reference_lift(want[:m], steps, scale) + want[m:]
        m = (m + 1) // 2
    got = lifting_forward(x, wavelet)
    np.testing.assert_allclose(got.numpy(), np.array(want), atol=1e-12)
    torch.testing.assert_close(lifting_inverse(got, wavelet), x, atol=1e-12, rtol=0)
    # the block transform's matrix is the lifting transform with each coefficient rescaled
    a, s = wavelet_matrices(n, wavelet, torch.float64)
    lift_rows = lifting_forward(torch.eye(n, dtype=torch.float64), wavelet).T
    torch.testing.assert_close(a, lift_rows * (a.norm(dim=1) / lift_rows.norm(dim=1))[:, None])
    torch.testing.assert_close(s @ a, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.allclose(s.norm(dim=0), torch.ones(n, dtype=torch.float64))


def test_cdf97_is_the_jpeg2000_filter():
    # the 9-tap analysis low-pass impulse response of the lifting scheme (deep inside a long signal)
    n = 64
    rows = lifting_forward(torch.eye(n, dtype=torch.float64), "cdf97", levels=1).T
    low = rows[n // 4, :]  # low-band coefficient 16 <- samples 32 +- 4
    taps = low[28:37] / low[28:37].sum()
    ref = torch.tensor([0.026748757411, -0.016864118443, -0.078223266529, 0.266864118443, 0.602949018236,
                        0.266864118443, -0.078223266529, -0.016864118443, 0.026748757411], dtype=torch.float64)
    torch.testing.assert_close(taps, ref, atol=1e-8, rtol=0)
    assert low[:28].abs().max() < 1e-14 and low[37:].abs().max() < 1e-14


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 6 * 6, 40)
        self.out = nn.Linear(40, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.out(F.relu(self.fc(x.flatten(1))))


def _warm_bn(model, x):
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(x + 0.3 * torch.randn_like(x))
    model.eval()


def test_wavelet_selectable_per_tensor_and_round_trips_through_the_file(tmp_path):
    model = Small()
    lsc.spectral(model, transform={"fc.*": "wavelet", "conv.*": "wavelet53", "default": "dct"})
    kinds = {e.name: e.parametrization.transform for e in model._lsc.entries}
    assert kinds["fc.weight"] == "wavelet" and kinds["conv.weight"] == "wavelet53" and kinds["out.weight"] == "dct"
    model.eval()
    path = tmp_path / "m.lsc"
    size = lsc.save(model, path)
    assert size == os.path.getsize(path)
    sd = lsc.load(path)
    for name in ("fc.weight", "conv.weight", "out.weight"):
        mod, attr = name.split(".")
        assert torch.equal(sd[name], getattr(getattr(model, mod), attr))


# ----------------------------------------------------------------------------- low rank

def test_factorize_respects_error_threshold_and_saves():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Conv2d(32, 48, 3))
    with torch.no_grad():  # make the matrix genuinely low-rank + noise
        model[0].weight.copy_(torch.randn(96, 8) @ torch.randn(8, 64) + 0.01 * torch.randn(96, 64))
        core = torch.randn(6, 5, 3, 3)
        model[2].weight.copy_(torch.einsum("abij,oa,cb->ocij", core, torch.randn(48, 6), torch.randn(32, 5))
                              + 0.01 * torch.randn(48, 32, 3, 3))
    w0 = model[0].weight.detach().clone()
    k0 = model[2].weight.detach().clone()
    infos = lsc.factorize(model, max_error=0.05, min_saving=0.0)
    by = {i.name: i for i in infos}
    assert by["0.weight"].kind == "svd" and by["0.weight"].ranks[0] <= 10
    assert by["2.weight"].kind == "tucker2" and by["2.weight"].ranks[0] <= 8 and by["2.weight"].ranks[1] <= 7
    for name, before, now in (("0.weight", w0, model[0].weight), ("2.weight", k0, model[2].weight)):
        rel = float((now.detach() - before).norm() / before.norm())
        assert rel <= 0.05 + 1e-6, (name, rel)
        assert math.isclose(rel, by[name].error, rel_tol=1e-3, abs_tol=1e-6)
        assert now.shape == before.shape
    assert isinstance(model[0], nn.Linear)  # the module keeps its class
    assert len(factor_report(model)) == 2


def test_lowrank_spectral_round_trip_through_the_file(tmp_path):
    torch.manual_seed(2)
    model = Small()
    x = torch.randn(8, 3, 8, 8)
    _warm_bn(model, x)
    infos = lsc.factorize(model, rank=0.5, min_saving=0.0, min_numel=0)
    assert {i.name for i in infos} >= {"fc.weight", "conv.weight"}
    lsc.spectral(model, init_bits=12)
    model.eval()
    y = model(x)
    path = tmp_path / "lr.lsc"
    lsc.save(model, path)
    sd = lsc.load(path)
    assert any(".parametrizations.weight.original" in k for k in sd)  # the factors are what is stored
    plain = Small()
    plain.load_state_dict(lsc.fold_factored_state_dict(sd, plain))
    plain.eval()
    torch.testing.assert_close(plain(x), y, atol=1e-5, rtol=1e-5)
    # and back into the factored spectral model, exactly
    other = Small()
    lsc.factorize(other, rank=0.5, min_saving=0.0, min_numel=0)
    lsc.spectral(other, init_bits=12)
    other.eval()
    lsc.load(path, other)
    assert torch.equal(other(x), y)


# ----------------------------------------------------------------------------- buffers

def test_buffer_codec_is_exact_and_within_error_bound():
    torch.manual_seed(3)
    model = Small()
    x = torch.randn(16, 3, 8, 8) * 2 + 1
    _warm_bn(model, x)
    bufs = {k: v.clone() for k, v in float_buffers(model).items()}
    assert set(bufs) == {"bn.running_mean", "bn.running_var"}
    tol = 2.0 ** -8
    blob = lsc.encode_buffers(bufs, tol)
    dec = lsc.decode_buffers(blob)
    want = quantized_values(bufs, tol)
    for k in bufs:
        assert torch.equal(dec[k], want[k]) and dec[k].dtype == bufs[k].dtype
    raw = sum(v.numel() * v.element_size() + HEADER_BYTES_PER_TENSOR for v in bufs.values())  # raw, with headers
    assert len(blob) < raw
    big = {"bn.running_mean": torch.randn(256), "bn.running_var": torch.rand(256) + 0.1}
    assert len(lsc.encode_buffers(big, tol)) < 0.5 * 256 * 4 * 2
    std = (bufs["bn.running_var"].double() + 1e-5).sqrt()
    std_q = (dec["bn.running_var"].double() + 1e-5).sqrt()
    assert float((std_q / std - 1).abs().max()) <= tol / 2 * 1.01
    assert float(((dec["bn.running_mean"].double() - bufs["bn.running_mean"].double()) / std_q).abs().max()) <= tol / 2 + 1e-9
    # an arbitrary float buffer and a non-float one
    other = {"a.b": torch.randn(10, 3), "n": torch.tensor(7)}
    dec2 = lsc.decode_buffers(lsc.encode_buffers(other, tol))
    assert set(dec2) == {"a.b"}
    assert float((dec2["a.b"] - other["a.b"]).abs().max()) <= tol / 2 * float(other["a.b"].std(unbiased=False)) + 1e-7


def test_buffer_tolerance_keeps_outputs_within_budget():
    torch.manual_seed(4)
    model = Small()
    x = torch.randn(32, 3, 8, 8)
    _warm_bn(model, x)
    with torch.no_grad():
        ref = model(x)
    tol = lsc.choose_buffer_tolerance(model, x, max_rel_error=1e-3)
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # the search leaves the model unchanged
    info = lsc.quantize_buffers_(model, tol)
    with torch.no_grad():
        err = float((model(x) - ref).norm() / ref.norm())
    assert err <= 1e-3
    assert info["compressed_bytes"] < info["raw_bytes"]
    assert tol >= 2.0 ** -12  # not just the finest candidate


# ----------------------------------------------------------------------------- size target

@pytest.fixture(scope="module")
def digits():
    from lsc.zoo import load_digits_split, train_digits_cnn
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threading only adds overhead on a shared CPU
    yield train_digits_cnn(epochs=4), load_digits_split()
    torch.set_num_threads(threads)


def _finetune(model, q_net, ctrl, data, epochs):
    train_classifier(model, data, epochs, extra_params=q_net.parameters(), extra_loss=ctrl.loss)


def test_size_target_lands_within_5_percent(digits, tmp_path):
    import copy
    base, data = digits
    model = copy.deepcopy(base)
    q_net = lsc.spectral(model, init_bits=8)
    ctrl = lsc.RateController(model, target_bits_per_weight=1.5, total_steps=2 * 23)
    _finetune(model, q_net, ctrl, data, epochs=2)
    assert ctrl.history[0][0] > 5  # it really had to move
    ctrl.finalize()
    assert abs(ctrl.predicted_bits_per_weight() / 1.5 - 1) <= 0.05
    size = lsc.save(model, tmp_path / "t.lsc")
    assert size == os.path.getsize(tmp_path / "t.lsc")
    real_bpw = 8 * size / ctrl.numel
    assert abs(real_bpw / 1.5 - 1) <= 0.05, real_bpw


def test_size_target_in_bytes_with_real_measurement(digits, tmp_path):
    import copy
    base, data = digits
    model = copy.deepcopy(base)
    q_net = lsc.spectral(model, init_bits=8)
    target = 20_000
    ctrl = lsc.RateController(model, target_bytes=target, total_steps=2 * 23)
    _finetune(model, q_net, ctrl, data, epochs=2)
    measure = lambda m: len(lsc.codec.to_bytes(lsc.compress_weights(m)))  # noqa: E731
    err = ctrl.finalize(measure=measure)
    assert abs(err) <= 0.05
    size = lsc.save(model, tmp_path / "b.lsc")
    assert abs(size / target - 1) <= 0.05, size
    assert abs(ctrl.predicted_bytes() / size - 1) <= 0.02  # the prediction agrees with the file


def test_rate_controller_rejects_bad_targets(digits):
    import copy
    model = copy.deepcopy(digits[0])
    lsc.spectral(model)
    with pytest.raises(lsc.LscError):
        lsc.RateController(model)
    with pytest.raises(lsc.LscError):
        lsc.RateController(model, target_bits_per_weight=1.0, target_bytes=100)
    with pytest.raises(lsc.LscError):
        lsc.RateController(model, target_bits_per_weight=-1.0)


def _controlled_run(steps, checkpoint=None):
    """A size-targeted fine-tune of a small MLP: ``steps`` steps, resumed from ``checkpoint`` if given."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    q_net = lsc.spectral(model, init_bits=8)
    opt = torch.optim.Adam(list(model.parameters()) + list(q_net.parameters()), lr=1e-2)
    ctrl = lsc.RateController(model, target_bits_per_weight=2.0, total_steps=50)
    if checkpoint is not None:
        state = torch.load(io.BytesIO(checkpoint), weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        ctrl.load_state_dict(state["ctrl"])
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y) + ctrl.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ctrl": ctrl.state_dict()}, buf)
    return model, ctrl, buf.getvalue()


def test_rate_controller_resumes_where_it_stopped():
    whole, whole_ctrl, _ = _controlled_run(50)
    _, first_ctrl, checkpoint = _controlled_run(25)
    resumed, ctrl, _ = _controlled_run(25, checkpoint)
    assert whole_ctrl.history[0][1] != whole_ctrl.history[-1][1]  # lambda really moved
    assert ctrl.history == whole_ctrl.history and ctrl.weight == whole_ctrl.weight
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()):
        assert torch.equal(a, b)
    # without the controller's state, the resumed run would restart its ramp and lambda
    fresh = lsc.RateController(resumed, target_bits_per_weight=2.0, total_steps=50)
    assert fresh.state_dict()["steps"] == 0 and first_ctrl.state_dict()["steps"] == 25


def test_rate_controller_state_must_fit_the_model():
    ctrl = _controlled_run(1)[1]
    other = nn.Linear(4, 4)
    lsc.spectral(other)
    with pytest.raises(lsc.LscError, match="compressed weights"):
        lsc.RateController(other, target_bits_per_weight=2.0).load_state_dict(ctrl.state_dict())
    with pytest.raises(lsc.LscError, match="missing"):
        lsc.RateController(other, target_bits_per_weight=2.0).load_state_dict({"steps": 3})


def test_transforms_registered():
    assert {"dct", "wavelet", "wavelet53"} <= set(TRANSFORMS)


def test_lossy_buffers_round_trip_through_the_file_exactly(tmp_path):
    """save(buffer_tolerance=...) stores BatchNorm statistics quantized; after quantize_buffers_ the
    in-memory model and the file agree bit for bit, and the file is smaller than with exact buffers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 4))
    model.train()
    for _ in range(3):
        model(torch.randn(8, 3, 8, 8))  # non-trivial running statistics
    model.eval()
    lsc.spectral(model, init_bits=6)
    exact = lsc.save(model, tmp_path / "exact.lsc")
    tol = 2.0 ** -6
    lossy = lsc.save(model, tmp_path / "lossy.lsc", buffer_tolerance=tol)
    assert lossy < exact
    lsc.quantize_buffers_(model, tol)
    plain = lsc.load(tmp_path / "lossy.lsc")
    for name, b in model.named_buffers():
        if name in plain:
            assert torch.equal(plain[name], b), name
    info = lsc.file_info(tmp_path / "lossy.lsc")
    assert info["totals"]["file_bytes"] == lossy
    fresh = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 4)).eval()
    fresh.load_state_dict(plain)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(fresh(x), model(x))


def test_factored_file_loads_into_an_unfactored_plain_model(tmp_path):
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))
    model = make()
    lsc.factorize(model, rank=0.5, min_saving=0.0, min_numel=0)
    lsc.spectral(model, init_bits=12)
    model.eval()
    lsc.save(model, tmp_path / "f.lsc")
    plain = lsc.load(tmp_path / "f.lsc", make().eval())
    x = torch.randn(4, 32)
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)  # folding U @ V is a new matmul


@pytest.mark.parametrize("options, message", [
    (dict(max_error=-1.0), "max_error must be a finite number >= 0"), (dict(max_error=float("nan")), "max_error must be"),
    (dict(rank=0), "rank must be a positive integer or a fraction"), (dict(rank=1.5), "rank must be a positive integer"),
    (dict(min_saving=2.0), r"min_saving must be in \[0, 1\)"), (dict(min_numel=-1), "min_numel must be an integer >= 0"),
])
def test_factorize_refuses_bad_options_before_touching_the_model(options, message):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    with pytest.raises(lsc.LscError, match=message):
        lsc.factorize(model, **options)
    assert type(model[0]) is nn.Linear


def test_factorize_refuses_a_non_finite_weight_by_name_before_touching_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with torch.no_grad():
        model[2].weight[3, 5] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lsc.LscError, match=r"2\.weight: contains NaN or Inf"):
        lsc.factorize(model, rank=4)
    assert type(model[0]) is nn.Linear  # the first weight, which comes before the bad one, is not factored either
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True)
