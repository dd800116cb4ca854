"""The fast training step (lsc.training, the shared q_net call, the fused rate surrogate) against
the straightforward formulation it replaces: same values, same gradients, same autograd semantics."""
import contextlib
import copy

import pytest
import torch
from torch import nn

import lsc
import lsc.quantizer as quantizer
import lsc.rate as rate
import lsc.training as training
from lsc.blocking import BlockLayout, from_blocks
from lsc.quantizer import bits_to_exponent, step_size
from lsc.rate import logistic_code_length, surrogate_bits_total
from lsc.reconstruct import synthesize
from lsc.training import quantized_synthesis
from lsc.transforms import block_inverse_transform

SCALE_PER_MEAN_ABS = 0.6079271018540267


class Mixed(nn.Module):
    """Every path of the training forward: ragged dims, one and two Kronecker factors, 1-D, 0-D, wavelets."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)              # ragged leading dim
        self.lin = nn.Linear(20, 13)                 # ragged in both dims
        self.conv = nn.Conv2d(16, 16, 3)             # 8x8x3x3 blocks: two factors
        self.conv1 = nn.Conv1d(3, 10, 3)             # one factor
        self.wave = nn.Linear(16, 24)                # wavelet: generic path
        self.norm = nn.LayerNorm(13)
        self.scale = nn.Parameter(torch.tensor(0.7))  # 0-D: generic path


def _model(dtype=torch.float64, init_bits=5.0, **kw):
    torch.manual_seed(0)
    model = Mixed().to(dtype)
    q_net = lsc.spectral(model, init_bits=init_bits, transform={"wave.weight": "wavelet", "default": "dct"}, **kw)
    with torch.no_grad():  # a non-trivial bit allocation (the last layer starts at zero)
        for p in q_net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.train()
    return model, q_net


def _reference_loss(model, w_grads, rate_weight):
    """sum(weight * G) + rate_weight * surrogate bits, per tensor with the seed's formulas and plain autograd."""
    st = model._lsc
    total = 0.0
    for e in st.entries:
        par, coeffs = e.parametrization, e.coefficients
        exp = bits_to_exponent(st.q_net(par.features, par.tensor_id))
        step = step_size(exp).to(par.mean.dtype).reshape(par.layout.block_shape)
        with torch.no_grad():
            x = coeffs / step
            r = (torch.round(x) - x) * (1.0 - par.leak)
        w = synthesize(coeffs + r * step, par.layout, par.mean, par.std, par.orig_dtype, par.transform)
        total = total + (w * w_grads[e.name]).sum()
        c = coeffs.reshape(par.layout.num_blocks, par.layout.block_numel)
        scale = (c.detach().abs().mean(0) * SCALE_PER_MEAN_ABS).clamp_min(1e-8)
        total = total + rate_weight * logistic_code_length(c, step.reshape(-1), scale).sum()
    return total


def _grads(model, q_net):
    return [p.grad.clone() for p in list(model.parameters()) + list(q_net.parameters())]


@pytest.fixture(params=["whole", "chunked"])
def chunking(request, monkeypatch):
    """Run a test as is, and again with tiny CPU chunks so that every tensor with several block
    rows goes through the chunked forward, backward and rate passes (big tensors in real models)."""
    if request.param == "chunked":
        monkeypatch.setattr(training, "_CHUNK", 16)
        monkeypatch.setattr(rate, "_CHUNK", 16)
    training._JOBS.clear()
    yield request.param
    training._JOBS.clear()


@pytest.mark.parametrize("leak", [0.0, 0.2])
def test_training_step_gradients_match_the_reference_formulation(leak, chunking):
    model, q_net = _model(leak=leak)
    ref_model = copy.deepcopy(model)
    ref_q = ref_model._lsc.q_net
    numel = lsc.loss.compressed_numel(model)
    w_grads = {e.name: torch.randn(e.parametrization.layout.shape, dtype=torch.float64) for e in model._lsc.entries}
    fast = sum((getattr(e.module, e.attr) * w_grads[e.name]).sum() for e in model._lsc.entries)
    (fast + lsc.quantization_loss(model, weight=0.3)).backward()
    _reference_loss(ref_model, w_grads, 0.3 / numel).backward()
    names = [n for n, _ in model.named_parameters()] + [f"q_net.{n}" for n, _ in q_net.named_parameters()]
    for name, a, b in zip(names, _grads(model, q_net), _grads(ref_model, ref_q)):
        # q_net is float32: one batched evaluation sums its gradient in another order than per-tensor calls
        tol = dict(rtol=2e-4, atol=1e-6) if name.startswith("q_net.") else dict(rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")


def test_training_forward_matches_eval_forward():
    model, _ = _model()
    with torch.no_grad():
        train = {e.name: getattr(e.module, e.attr).clone() for e in model._lsc.entries}
        model.eval()
        for e in model._lsc.entries:
            torch.testing.assert_close(train[e.name], getattr(e.module, e.attr), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape,block", [((37,), (8,)), ((10,), (8,)), ((30, 20), (8, 8)), ((5, 16), (8, 8)),
                                         ((12, 5), (8, 8)), ((20, 6, 3, 3), (8, 8, 3, 3)), ((3, 40), (1, 8)),
                                         # whole-row blocks are the weight's own memory order (no copies), ragged or not
                                         ((3, 36), (1, 8)), ((300, 64), (1, 64)), ((301, 100), (1, 64)),
                                         ((4, 6, 10), (1, 1, 5)), ((4, 6, 10), (1, 2, 5))])
def test_quantized_synthesis_matches_fake_quantize_then_synthesize(shape, block, dtype, chunking):
    layout = BlockLayout(shape, block)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    c = (3 * torch.randn(layout.coeff_shape, dtype=cdt)).requires_grad_()
    step = (0.5 * torch.rand(layout.block_numel, dtype=cdt) + 0.05).requires_grad_()
    mean, std = torch.tensor(0.3, dtype=cdt), torch.tensor(1.7, dtype=cdt)
    g = torch.randn(shape, dtype=dtype)
    w = quantized_synthesis(c, step, layout, mean, std, dtype)
    assert w.shape == shape and w.dtype == dtype and w.is_contiguous()
    w.backward(g)
    got = (w.detach(), c.grad.clone(), step.grad.clone())
    c.grad = step.grad = None
    with torch.no_grad():
        x = c / step.reshape(block)
        r = torch.round(x) - x
    ref = (from_blocks(block_inverse_transform(c + r * step.reshape(block), block), layout) * std + mean).to(dtype)
    ref.backward(g)
    tol = dict(rtol=1e-3, atol=1e-2) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], ref.detach(), **tol)
    torch.testing.assert_close(got[1], c.grad, rtol=1e-5, atol=1e-6)
    # the step's gradient sums over every block: float32 rounding grows with their number
    torch.testing.assert_close(got[2], step.grad, rtol=1e-5, atol=1e-6 * layout.num_blocks ** 0.5)


def test_batched_surrogate_matches_autograd_of_the_formula():
    torch.manual_seed(1)
    shapes = [(40, 6), (5000, 64), (3, 8), (700, 64), (1, 1)]  # small ones are concatenated, large ones not
    cs = [torch.randn(s, dtype=torch.float64) * (1 + 3 * torch.rand(s[1], dtype=torch.float64)) for s in shapes]
    steps = [0.5 * torch.rand(s[1], dtype=torch.float64) + 0.01 for s in shapes]
    a = [t.clone().requires_grad_() for t in cs + steps]
    b = [t.clone().requires_grad_() for t in cs + steps]
    ref = sum(logistic_code_length(c, s, (c.detach().abs().mean(0) * SCALE_PER_MEAN_ABS).clamp_min(1e-8)).sum()
              for c, s in zip(a[:5], a[5:]))
    ref.backward()
    got = surrogate_bits_total(b[:5], b[5:])
    torch.testing.assert_close(got, ref.detach())
    got.backward(retain_graph=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(y.grad, x.grad, rtol=1e-10, atol=1e-12)
    got.backward()  # a second backward through the same graph recomputes what the first one handed out
    for x, y in zip(a, b):
        torch.testing.assert_close(y.grad, 2 * x.grad, rtol=1e-10, atol=1e-12)


def test_qnet_runs_once_per_step_and_again_after_the_optimizer_step(monkeypatch):
    import lsc.qnet
    calls = []
    step_size_ = lsc.qnet.step_size
    monkeypatch.setattr(lsc.qnet, "step_size", lambda e: calls.append(1) or step_size_(e))  # once per evaluation
    model, q_net = _model(torch.float32)
    opt = torch.optim.Adam(list(model.parameters()) + list(q_net.parameters()), lr=1e-3)
    for step in range(3):
        opt.zero_grad()
        loss = sum(getattr(e.module, e.attr).square().sum() for e in model._lsc.entries) + lsc.quantization_loss(model)
        loss.backward()
        opt.step()
        assert len(calls) == step + 1


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    return sum((getattr(e.module, e.attr) * torch.randn(e.parametrization.layout.shape, generator=g)).sum()
               for e in model._lsc.entries) + lsc.quantization_loss(model, weight=0.1)


def test_gradient_accumulation_and_interleaved_backward_passes():
    model, q_net = _model(torch.float32)
    _loss(model, 1).backward()
    _loss(model, 2).backward()            # accumulation over two steps' forwards
    accumulated = _grads(model, q_net)
    for p in list(model.parameters()) + list(q_net.parameters()):
        p.grad = None
    first, second = _loss(model, 1), _loss(model, 2)  # both graphs share this step's q_net output
    first.backward()
    second.backward()                      # must not find the shared part of the graph freed
    for a, b in zip(accumulated, _grads(model, q_net)):
        torch.testing.assert_close(a, b)
    for p in list(model.parameters()) + list(q_net.parameters()):
        p.grad = None
    loss = _loss(model, 1)
    loss.backward(retain_graph=True)
    once = _grads(model, q_net)
    loss.backward()
    for a, b in zip(once, _grads(model, q_net)):
        torch.testing.assert_close(2 * a, b)


def test_no_grad_forward_in_training_mode_then_a_training_step():
    model, q_net = _model(torch.float32)
    with torch.no_grad():
        lsc.quantization_loss(model)
        [getattr(e.module, e.attr) for e in model._lsc.entries]
    _loss(model, 3).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in q_net.parameters())


def test_deepcopy_and_state_dict_after_training_steps():
    model, q_net = _model(torch.float32)
    _loss(model, 4).backward()
    clone = copy.deepcopy(model)
    loaded, _ = _model(torch.float32)
    loaded.load_state_dict(model.state_dict())
    for other in (clone, loaded):
        with torch.no_grad():
            for e, f in zip(model._lsc.entries, other._lsc.entries):
                torch.testing.assert_close(getattr(e.module, e.attr), getattr(f.module, f.attr))
        other._lsc.q_net.zero_grad()
        _loss(other, 5).backward()
        assert other._lsc.q_net.mlp[0].weight.grad is not None
        assert q_net.mlp[0].weight.grad is not other._lsc.q_net.mlp[0].weight.grad


def test_pooled_buffers_are_only_reused_once_nothing_refers_to_them(monkeypatch):
    monkeypatch.setattr(quantizer, "_POOL_MIN", 16)
    monkeypatch.setattr(quantizer, "_SCRATCH", type(quantizer._SCRATCH)())
    a = quantizer.fresh((8, 8), torch.float32, torch.device("cpu"))
    a.fill_(1.0)
    view = a.t()
    del a
    b = quantizer.fresh((8, 8), torch.float32, torch.device("cpu"))
    assert b.data_ptr() != view.data_ptr()  # a view keeps the first buffer alive
    addr = view.data_ptr()
    del view
    c = quantizer.fresh((64,), torch.float32, torch.device("cpu"))
    assert c.data_ptr() == addr and c.shape == (64,)  # free again: recycled, in the requested shape


def test_pooled_gradients_are_summed_in_place_by_autograd(monkeypatch):
    """Two pooled gradients reaching one leaf are added into one of them (no third full-size tensor):
    the pool holds memory maps, not the tensors' storages."""
    monkeypatch.setattr(quantizer, "_POOL_MIN", 16)
    monkeypatch.setattr(quantizer, "_SCRATCH", type(quantizer._SCRATCH)())
    handed = []

    class Pooled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, k):
            ctx.k = k
            return x * k

        @staticmethod
        def backward(ctx, g):
            out = quantizer.fresh(tuple(g.shape), g.dtype, g.device)
            handed.append(out.data_ptr())
            return torch.mul(g, ctx.k, out=out), None

    x = torch.ones(8, 8, requires_grad=True)
    (Pooled.apply(x, 2.0).sum() + Pooled.apply(x, 3.0).sum()).backward()
    assert len(set(handed)) == 2 and x.grad.data_ptr() in handed
    assert torch.equal(x.grad, torch.full((8, 8), 5.0))


def test_hand_differentiated_qnet_matches_autograd():
    from lsc.qnet import _SharedBits, _SharedBitsMLP
    model, q_net = _model(torch.float32)
    with torch.no_grad():
        q_net.tensor_offset[1] = 6.0  # some bits beyond MAX_BITS: the clamp's gradient mask matters
    members = q_net.__dict__["_members"]
    assert q_net._plain_mlp()
    params = tuple(getattr(m, n) for m, n in members["slots"])
    rows = members["features"].shape[0]
    grads = (torch.randn(rows), torch.randn(rows))
    results = []
    for fn in (_SharedBits, _SharedBitsMLP):
        q_net.zero_grad()
        e, s = fn.apply(q_net, members["features"], members["ids"], *params)
        torch.autograd.backward((e, s), grads)
        results.append((e, s, [p.grad.clone() for p in params]))
    (e0, s0, g0), (e1, s1, g1) = results
    assert torch.equal(e0, e1) and torch.equal(s0, s1)
    for a, b in zip(g0, g1):  # fp32 sums over the rows in another order: error relative to the gradient's scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_chunked_paths_are_taken_for_tensors_with_several_block_rows(chunking):
    """The fixture's small chunks really reach the chunked code (else the tests above prove nothing)."""
    layout = BlockLayout((40, 16), (8, 8))
    c = torch.randn(layout.coeff_shape, requires_grad=True)
    step = torch.full((64,), 0.3, requires_grad=True)
    quantized_synthesis(c, step, layout, torch.tensor(0.0), torch.tensor(1.0), torch.float32)
    job = next(iter(training._JOBS.values()))
    assert (job.rows > 0) == (chunking == "chunked")
    assert len(rate._chunks(100, 64, c.device)) == (1 if chunking == "whole" else 100)


def test_torch_compile_of_a_spectral_model_trains_and_evaluates_like_eager():
    """The user's layers compile; the spectral weights and the rate term run eagerly inside the graph."""
    from lsc.zoo import DigitsCNN

    def make():
        torch.manual_seed(0)
        m = DigitsCNN()
        return m, lsc.spectral(m, init_bits=6)

    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    (eager, q_eager), (model, q_model) = make(), make()
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(3):
        for m, q, f in ((eager, q_eager, eager), (model, q_model, compiled)):
            m.train()
            (f(x).pow(2).mean() + lsc.quantization_loss(m)).backward()
            with torch.no_grad():
                for p in list(m.parameters()) + list(q.parameters()):
                    p -= 1e-2 * p.grad
                    p.grad = None
    for a, b in zip(list(eager.parameters()) + list(q_eager.parameters()),
                    list(model.parameters()) + list(q_model.parameters())):
        assert torch.equal(a, b)
    eager.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(compiled(x), eager(x))


def _bn_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.Linear(32, 3))


@pytest.mark.parametrize("order", ["compile_then_spectral", "spectral_then_compile"])
def test_a_compiled_model_is_compressed_under_its_own_names(order, tmp_path):
    """torch.compile's wrapper prefixes its state dict with ``_orig_mod.``; the file must not."""
    model = _bn_mlp()
    if order == "compile_then_spectral":
        wrapped = torch.compile(model, backend="aot_eager")
        lsc.spectral(wrapped, init_bits=6)
    else:
        lsc.spectral(model, init_bits=6)
        wrapped = torch.compile(model, backend="aot_eager")
    x = torch.randn(8, 32)
    wrapped.train()
    (wrapped(x).pow(2).mean() + lsc.quantization_loss(wrapped)).backward()
    assert lsc.RateController(wrapped, target_bytes=10_000).predicted_bytes() == \
        lsc.RateController(model, target_bytes=10_000).predicted_bytes()
    path = tmp_path / "c.lsc"
    size = lsc.save(wrapped, path)
    assert size == lsc.save(model, tmp_path / "bare.lsc")
    assert path.read_bytes() == (tmp_path / "bare.lsc").read_bytes()
    assert sorted(lsc.load(path)) == sorted(_bn_mlp().state_dict())  # no q_net, no prefix
    assert [r["name"] for r in lsc.report(wrapped, print_table=False)][:-1] == \
        [r["name"] for r in lsc.report(model, print_table=False)][:-1]
    wrapped.eval()
    with torch.no_grad():
        expected = model(x)
    plain = lsc.load(path, _bn_mlp()).eval()
    compiled_plain = torch.compile(_bn_mlp(), backend="aot_eager")
    assert lsc.load(path, compiled_plain) is compiled_plain  # loads into the module inside, returns the wrapper
    lazy = lsc.load(path, torch.compile(_bn_mlp(), backend="aot_eager"), lazy=True)
    with torch.no_grad():
        assert torch.equal(plain(x), expected)
        assert torch.equal(compiled_plain.eval()(x), expected)
        assert torch.equal(lazy(x), expected)


def test_conversions_refuse_a_ddp_wrapped_model():
    class FakeDDP(nn.parallel.DistributedDataParallel):  # DDP proper needs a process group
        def __init__(self, module):
            nn.Module.__init__(self)
            self.module = module
    wrapped = FakeDDP(_bn_mlp())
    for convert in (lsc.spectral, lsc.factorize, lambda m: lsc.compress_posttraining(m, max_error=0.1)):
        with pytest.raises(lsc.LscError, match="call .* on the bare model first"):
            convert(wrapped)
    assert not hasattr(wrapped.module[0], "parametrizations")


def test_calibration_of_a_compiled_model_uses_its_own_names(tmp_path):
    model = _bn_mlp().eval()
    wrapped = torch.compile(model, backend="aot_eager")
    x = torch.randn(64, 32)
    reference = model(x).detach()
    hessians = lsc.collect_hessians(wrapped, lambda m: m(x))
    bare = lsc.collect_hessians(model, lambda m: m(x))
    assert list(hessians) == list(bare) == ["0.weight", "2.weight"]
    assert all(torch.equal(hessians[k], bare[k]) for k in bare)
    sens = lsc.measure_sensitivity(wrapped, lambda m: float((m(x) - reference).pow(2).mean()))
    assert list(sens) == ["0.weight", "2.weight"]
    bounds = lsc.allocate_error_bounds(sens, target=1e-3)
    lsc.compress_posttraining(wrapped, max_error=bounds, hessians=hessians)
    lsc.save(wrapped, tmp_path / "c.lsc")
    assert sorted(lsc.load(tmp_path / "c.lsc")) == sorted(_bn_mlp().state_dict())


def test_parametrize_cached_synthesizes_a_looped_weight_once_with_the_same_gradients():
    """The README's advice for weights read many times per forward (an LSTMCell in a Python loop)."""
    from torch.nn.utils import parametrize

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell, self.out = nn.LSTMCell(8, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = c = torch.zeros(x.shape[0], 16)
            for t in range(x.shape[1]):
                h, c = self.cell(x[:, t], (h, c))
            return self.out(h)

    torch.manual_seed(0)
    base, x = Loop(), torch.randn(4, 6, 8)
    calls = []

    def run(cached):
        model = copy.deepcopy(base)
        torch.manual_seed(1)
        q_net = lsc.spectral(model)
        par = model.cell.parametrizations.weight_ih[0]
        hook = par.register_forward_hook(lambda *_: calls.append(cached))
        for _ in range(2):  # two accumulated steps: the cache must not outlive a forward
            with parametrize.cached() if cached else contextlib.nullcontext():
                loss = model(x).pow(2).mean() + lsc.quantization_loss(model)
            loss.backward()
        hook.remove()
        return [p.grad for p in list(model.parameters()) + list(q_net.parameters())]
    plain, cached = run(False), run(True)
    assert calls.count(False) == 2 * 6 and calls.count(True) == 2
    for a, b in zip(plain, cached):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
