"""The CUDA paths: training without host syncs, and eval forward == decoded file on the GPU.

CI has no GPU, so these are skipped there; they run wherever CUDA is present.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lsc
from lsc.codec import to_bytes
from lsc.state import get_state
from lsc.zoo import DigitsCNN
from model_zoo import cases, fine_tune, first_output

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


def _round_trip(model, make):
    """Decode ``model``'s file into a fresh ``make()`` on the GPU."""
    return lsc.load(to_bytes(lsc.compress_weights(model)), make().to(CUDA)).eval()


def _digits_batch(n=64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g).to(CUDA), torch.randint(0, 10, (n,), generator=g).to(CUDA)


def test_training_steps_between_rate_refreshes_never_wait_for_the_gpu():
    torch.manual_seed(0)
    model = DigitsCNN().to(CUDA)
    q_net = lsc.spectral(model, init_bits=6)
    opt = torch.optim.Adam(list(model.parameters()) + list(q_net.parameters()), lr=1e-3)
    x, y = _digits_batch()
    refresh = get_state(model).rate_refresh
    losses = []

    def step():
        loss = F.cross_entropy(model(x), y) + lsc.quantization_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    model.train()
    step()  # the first call runs the exact rate pass (host syncs by design) and builds the caches
    before = [p.detach().clone() for p in model.parameters()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(refresh - 2):  # rate_calls 1 .. refresh-2: no refresh falls in here
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(torch.stack(losses)))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("name,make,inp", cases(), ids=[c[0] for c in cases()])
def test_eval_forward_equals_the_decoded_file_on_cuda(name, make, inp):
    torch.manual_seed(0)
    model = make().to(CUDA)
    q_net = lsc.spectral(model, init_bits=6)
    x = inp().to(CUDA)
    fine_tune(model, q_net, x)
    model.eval()
    dec = _round_trip(model, make)
    with torch.no_grad():
        a, b = first_output(model(x)), first_output(dec(x))
    assert a.device.type == "cuda"
    assert torch.equal(a, b), name
    lsc.to_dense(model)  # the plain model keeps the weights rebuilt on the GPU, bit for bit
    assert all(p.device.type == "cuda" for p in model.parameters())
    with torch.no_grad():
        c = first_output(model(x))
    assert torch.equal(c, a), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_trains_and_round_trips_on_cuda(dtype):
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 10))  # noqa: E731
    model = make().to(CUDA, dtype)
    q_net = lsc.spectral(model, init_bits=8)
    x = torch.randn(32, 64, device=CUDA, dtype=dtype)
    opt = torch.optim.Adam(list(model.parameters()) + list(q_net.parameters()), lr=1e-3)
    model.train()
    for _ in range(3):
        loss = model(x).float().pow(2).mean() + lsc.quantization_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model[0].weight.dtype == dtype and model[2].bias.dtype == dtype  # the transform runs in fp32
    model.eval()
    dec = _round_trip(model, lambda: make().to(dtype))
    with torch.no_grad():
        assert torch.equal(model(x), dec(x))


def test_posttraining_on_cuda_meets_its_bound_and_round_trips():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64))  # noqa: E731
    model = make().to(CUDA)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    lsc.compress_posttraining(model, max_error=0.05, progress=False)
    model.eval()
    dec = _round_trip(model, make)
    for n, w in ref.items():
        got = dec.get_parameter(n)  # the fresh model is plain: its parameters are the decoded weights
        assert got.device.type == "cuda"
        bound = 0.05 if w.dim() > 1 else 0.05 / 20
        assert float((got.detach() - w).norm() / w.norm()) <= bound * (1 + 1e-4), n
    x = torch.randn(16, 128, device=CUDA)
    with torch.no_grad():
        assert torch.equal(model(x), dec(x))
