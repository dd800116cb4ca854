"""Mixed-precision training (``torch.autocast``): the model's layers run in half precision, lsc's
own arithmetic does not, so weights, gradients, files and decoded weights are those of full precision."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lsc
from lsc.codec import to_bytes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HALF = {"cpu": torch.bfloat16, "cuda": torch.float16}


def _model(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 16, 5), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8, 4)).to(device)
    return model, lsc.spectral(model, init_bits=6)


def _weights(model):
    return [m.weight.detach().clone() for m in (model[0], model[3])]


def _probe_gradients(model, q_net, device, autocast: bool, backward_inside: bool):
    """Gradients of a loss linear in the weights (so independent of their values' precision)."""
    for p in list(model.parameters()) + list(q_net.parameters()):
        p.grad = None
    g = torch.Generator().manual_seed(3)
    probes = [torch.randn(m.weight.shape, generator=g).to(device) for m in (model[0], model[3])]
    with torch.autocast(device, dtype=HALF[device], enabled=autocast):
        loss = sum((m.weight * r).sum() for m, r in zip((model[0], model[3]), probes))
        loss = loss + lsc.quantization_loss(model, weight=0.5)
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return [p.grad.clone() for p in model.parameters()] + [p.grad.clone() for p in q_net.parameters()], float(loss.detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_weights_gradients_and_rate_are_full_precision_under_autocast(device, mode):
    model, q_net = _model(device)
    model.train(mode == "train")
    reference = _weights(model)
    with torch.autocast(device, dtype=HALF[device]):
        inside = _weights(model)
        out = model(torch.randn(5, 3, 12, device=device))
    assert out.dtype == HALF[device]  # the layers themselves did run in half precision
    assert all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip(inside, reference))
    want, want_loss = _probe_gradients(model, q_net, device, autocast=False, backward_inside=False)
    # bit for bit on the CPU; CUDA's atomic index_add_ (the rate term's per-position sums) may reorder float additions
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-6, atol=1e-9)
    for backward_inside in (False, True):
        got, got_loss = _probe_gradients(model, q_net, device, autocast=True, backward_inside=backward_inside)
        torch.testing.assert_close(got_loss, want_loss, **tol)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tol)


def _fit(device, autocast: bool, steps: int = 80):
    """A short fine-tune (task + rate) inside an autocast region or not; returns (model, task losses)."""
    model, q_net = _model(device)
    opt = torch.optim.Adam(list(model.parameters()) + list(q_net.parameters()), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, 12, generator=g).to(device), torch.randint(0, 4, (32,), generator=g).to(device)
    losses = []
    for _ in range(steps):
        with torch.autocast(device, dtype=HALF[device], enabled=autocast):
            task = F.cross_entropy(model(x), y)
            loss = task + lsc.quantization_loss(model, weight=1e-2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(task.detach()))
    return model, losses


@pytest.mark.parametrize("device", DEVICES)
def test_a_mixed_precision_fine_tune_learns_and_its_file_decodes_exactly(device):
    model, losses = _fit(device, autocast=True)
    _, full = _fit(device, autocast=False)
    assert losses[-1] < 0.6 * losses[0]
    assert abs(losses[-1] - full[-1]) < 0.1 * full[-1]  # learns as the full-precision run does
    model.eval()
    with torch.no_grad():
        decoded = _weights(model)
    plain_bytes = to_bytes(lsc.compress_weights(model))
    with torch.autocast(device, dtype=HALF[device]):
        assert to_bytes(lsc.compress_weights(model)) == plain_bytes  # the same file inside an autocast region
        fresh = nn.Sequential(nn.Conv1d(3, 16, 5), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8, 4)).to(device)
        lsc.load(plain_bytes, fresh)
        lazy = nn.Sequential(nn.Conv1d(3, 16, 5), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8, 4)).to(device)
        lsc.load_lazy(plain_bytes, lazy)
        lazy_weights = _weights(lazy)
    assert all(torch.equal(a, b) for a, b in zip(_weights(fresh), decoded))
    assert all(torch.equal(a, b) for a, b in zip(lazy_weights, decoded))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_casting_a_spectral_model_sets_its_weights_dtype_and_keeps_lsc_state_at_full_precision(dtype):
    """model.half() / .to(torch.bfloat16) / .double() after lsc.spectral: the layers get weights of that dtype,
    as a plain model's would; the standardization and q_net's inputs stay full precision; the file decodes exactly."""
    model, q_net = _model("cpu")
    before = _weights(model)
    model.to(dtype)
    par = model[3].parametrizations.weight[0]
    assert par.mean.dtype == par.std.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert par.features.dtype == torch.float32
    x = torch.randn(5, 3, 12, dtype=dtype)
    out = model(x)  # used to fail: float32 weights against half-precision inputs
    assert out.dtype == dtype and model[3].weight.dtype == dtype
    (out.float().square().mean() + lsc.quantization_loss(model)).backward()
    assert model[3].parametrizations.weight.original.grad.abs().sum() > 0
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-6}[dtype]
    assert all(torch.allclose(a.double(), b.double(), atol=tol) for a, b in zip(_weights(model), before))
    model.eval()
    with torch.no_grad():
        decoded = _weights(model)
    fresh = nn.Sequential(nn.Conv1d(3, 16, 5), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8, 4)).to(dtype)
    lsc.load(to_bytes(lsc.compress_weights(model)), fresh)
    assert all(torch.equal(a, b) and a.dtype == dtype for a, b in zip(_weights(fresh), decoded))
    model.float()
    assert model(x.float()).dtype == torch.float32
