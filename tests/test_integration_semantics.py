"""What a training job around a spectral model relies on: checkpoints that resume the same model,
gradients that model-level utilities clear, layers that edit their weight in place, and parametrizations
a user stacks on lsc's."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import lsc


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


X = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(2))


def test_checkpoint_of_a_model_loaded_from_a_file_resumes_at_the_files_steps():
    res = lsc.compress_posttraining(_mlp(), max_error=0.1)
    f = io.BytesIO()
    lsc.save(res.model, f)
    m = _mlp()
    lsc.spectral(m)
    lsc.load(io.BytesIO(f.getvalue()), m)  # fine-tuning at the file's fixed steps
    ck = m.state_dict()
    assert any(k.endswith("frozen_exponent") for k in ck)
    fresh = _mlp()
    lsc.spectral(fresh)  # its q_net would quantize at 10 bits
    assert not fresh.load_state_dict(ck).missing_keys
    assert torch.equal(_eval_out(fresh, X), _eval_out(m, X))
    assert lsc.bits_per_weight(fresh) == lsc.bits_per_weight(m)
    g, h = io.BytesIO(), io.BytesIO()
    lsc.save(m, g)
    lsc.save(fresh, h)
    assert g.getvalue() == h.getvalue()


def test_checkpoint_carries_the_quantization_networks_settings():
    res = lsc.compress_posttraining(_mlp(), max_error=0.1)  # its q_net starts at 0 bits, lsc.spectral's at 10
    ck = res.model.state_dict()
    fresh = _mlp()
    q = lsc.spectral(fresh)
    assert q.init_bits == 10.0
    fresh.load_state_dict(ck)
    assert q.init_bits == lsc.quantization_network(res.model).init_bits
    assert torch.equal(_eval_out(fresh, X), _eval_out(res.model, X))


def test_checkpoints_from_before_the_settings_were_saved_still_load():
    m = _mlp()
    lsc.spectral(m, init_bits=7)
    old = {k: v for k, v in m.state_dict().items() if not k.endswith("_extra_state")}
    fresh = _mlp()
    q = lsc.spectral(fresh, init_bits=7)
    assert not fresh.load_state_dict(old).missing_keys
    assert q.init_bits == 7.0
    assert torch.equal(_eval_out(fresh, X), _eval_out(m, X))


def test_a_bad_frozen_exponent_in_a_checkpoint_is_named():
    m = _mlp()
    lsc.spectral(m)
    ck = m.state_dict()
    ck["0.parametrizations.weight.0.frozen_exponent"] = torch.full((3,), 1.5)
    with pytest.raises(RuntimeError, match=r"0\.weight: .*frozen_exponent has shape \(3,\)"):
        m.load_state_dict(ck)
    ck["0.parametrizations.weight.0.frozen_exponent"] = torch.full((64,), 1.5)
    with pytest.raises(RuntimeError, match="must hold integers"):
        m.load_state_dict(ck)


def _step(model, opt, rate=True):
    loss = nn.functional.cross_entropy(model(X), Y)
    if rate:
        loss = loss + lsc.quantization_loss(model)
    loss.backward()
    opt.step()


def _q_net_grad_norms_over_steps(m, set_to_none: bool = True) -> tuple[list[float], set[int]]:
    """q_net's gradient norm after each of 3 steps at lr 0 (the same point every step) with ``model.zero_grad``
    between them, as Hugging Face's Trainer does; and the ids of the gradient tensors seen."""
    q = lsc.quantization_network(m)
    opt = torch.optim.SGD(list(m.parameters()) + list(q.parameters()), lr=0.0)
    norms, objects = [], set()
    for _ in range(3):
        _step(m, opt)
        norms.append(q.tensor_offset.grad.norm().item())
        objects.add(id(q.tensor_offset.grad))
        m.zero_grad(set_to_none=set_to_none)
    return norms, objects


def test_model_zero_grad_clears_the_quantization_networks_gradients_too():
    norms, _ = _q_net_grad_norms_over_steps(_spectral_mlp())
    assert norms[0] > 0 and norms == [norms[0]] * 3


def test_zero_grad_without_set_to_none_clears_the_quantization_networks_gradients_too():
    """``model.zero_grad(set_to_none=False)`` zeroes the coefficients' gradients in place: q_net's are zeroed
    too (in place, as the model's), not added up over steps."""
    norms, objects = _q_net_grad_norms_over_steps(_spectral_mlp(), set_to_none=False)
    assert norms[0] > 0 and norms == [norms[0]] * 3
    assert len(objects) == 1  # the same gradient tensors, zeroed in place as the model's were


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_metric_logged_between_the_step_and_zero_grad_does_not_stop_the_clearing(set_to_none):
    """``bits_per_weight`` (or a metric forward) with gradients on, right after ``optimizer.step()`` and before
    ``model.zero_grad()``, is a graph before the clearing: it must not use up the check."""
    m = _spectral_mlp()
    q = lsc.quantization_network(m)
    opt = torch.optim.SGD(list(m.parameters()) + list(q.parameters()), lr=0.0)
    left = []
    for _ in range(3):
        m.zero_grad(set_to_none=set_to_none)
        m(X)  # the forward that clears q_net's gradients (if the model's were cleared)
        left.append(0.0 if q.tensor_offset.grad is None else q.tensor_offset.grad.abs().sum().item())
        (nn.functional.cross_entropy(m(X), Y) + lsc.quantization_loss(m)).backward()
        opt.step()
        lsc.bits_per_weight(m).item()  # logging, gradients on
    assert left == [0.0, 0.0, 0.0]


def test_deep_copy_of_a_deep_copied_model_clears_its_own_quantization_network():
    """The copy's q_net watches the copy's coefficients, not the original's."""
    norms, _ = _q_net_grad_norms_over_steps(copy.deepcopy(_spectral_mlp()))
    assert norms[0] > 0 and norms == [norms[0]] * 3


def _spectral_mlp():
    m = _mlp()
    lsc.spectral(m)
    return m


def test_quantization_network_alone_copies_and_saves_without_the_model():
    """q_net links to the model weakly: copying or saving it (to keep an allocation) takes only q_net."""
    m = _spectral_mlp()
    q = lsc.quantization_network(m)
    before = {id(p) for p in m.parameters()}
    copied = copy.deepcopy(q)
    assert not list(copied.__dict__["_members"]["entries"])  # serves no model
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for a, b, c in zip(q.parameters(), copied.parameters(), loaded.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert {id(p) for p in m.parameters()} == before and len(buf.getvalue()) < 64_000
    assert [e.name for e in q.__dict__["_members"]["entries"]] == [e.name for e in lsc.state.get_state(m).entries]


def test_gradient_accumulation_keeps_the_quantization_networks_gradients():
    m = _mlp()
    q = lsc.spectral(m)
    opt = torch.optim.SGD(list(m.parameters()) + list(q.parameters()), lr=1e-3)
    _step(m, opt)
    opt.zero_grad()
    for _ in range(2):  # two micro-batches, one optimizer step
        (nn.functional.cross_entropy(m(X), Y) + lsc.quantization_loss(m)).backward()
    one = q.tensor_offset.grad.clone()
    opt.zero_grad()
    (nn.functional.cross_entropy(m(X), Y) + lsc.quantization_loss(m)).backward()
    torch.testing.assert_close(one, 2 * q.tensor_offset.grad)


def test_averaged_model_saves_with_the_live_allocation_as_documented():
    torch.manual_seed(0)
    m = _mlp()
    q = lsc.spectral(m, init_bits=8)
    ema = AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    opt = torch.optim.Adam(list(m.parameters()) + list(q.parameters()), 1e-2)
    for _ in range(100):
        opt.zero_grad()
        _step(m, opt)
        ema.update_parameters(m)
    lsc.quantization_network(ema.module).load_state_dict(q.state_dict())
    live, averaged = lsc.save(m, io.BytesIO()), lsc.save(ema.module, io.BytesIO())
    assert averaged < 1.5 * live


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_embedding_with_max_norm_trains_and_matches_its_file(mode):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(50, 16, max_norm=1.0), nn.Flatten(), nn.Linear(16 * 5, 3))
    ids = torch.randint(0, 50, (4, 5), generator=torch.Generator().manual_seed(3))
    m = make()
    q = lsc.spectral(m)
    getattr(m, mode)()
    opt = torch.optim.Adam(list(m.parameters()) + list(q.parameters()), 1e-2)
    for _ in range(3):
        opt.zero_grad()
        (m(ids).pow(2).mean() + lsc.quantization_loss(m)).backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        out = m(ids)
    plain = make()
    lsc.load(io.BytesIO(_saved(m)), plain)
    with torch.no_grad():
        assert torch.equal(plain.eval()(ids), out)


def _saved(model) -> bytes:
    f = io.BytesIO()
    lsc.save(model, f)
    return f.getvalue()


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_a_parametrization_stacked_on_lscs_is_refused_by_save_and_to_dense():
    m = _mlp()
    lsc.spectral(m)
    parametrize.register_parametrization(m[0], "weight", _Double())
    for fn in (lambda: lsc.save(m, io.BytesIO()), lambda: lsc.to_dense(m)):
        with pytest.raises(lsc.LscError, match=r"0\.weight: has other parametrizations stacked on lsc's "
                                                r"\(SpectralParametrization, _Double\)"):
            fn()
    _step(m, torch.optim.SGD(m.parameters(), lr=1e-3))  # training goes on: only storing it is refused


def test_quantization_network_gradients_added_up_over_the_models_steps_are_kept():
    """A loop that steps the model every iteration but q_net every second one, with a no-grad forward
    in between: only an optimizer step on q_net starts the check that clears its gradients."""
    xs = [torch.randn(8, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def grads_of(x):
        m = _mlp()
        q = lsc.spectral(m, init_bits=8)
        (m(x).pow(2).mean() + lsc.quantization_loss(m)).backward()
        return [p.grad.clone() for p in q.parameters()]
    want = [a + b for a, b in zip(*(grads_of(x) for x in xs))]
    m = _mlp()
    q = lsc.spectral(m, init_bits=8)
    model_opt = torch.optim.SGD(m.parameters(), lr=0.0)
    for x in xs:
        (m(x).pow(2).mean() + lsc.quantization_loss(m)).backward()
        model_opt.step()
        m.zero_grad()
        with torch.no_grad():
            m(x)
    for got, ref in zip((p.grad for p in q.parameters()), want):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("before,after", [(torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                                          (torch.float16, torch.float32), (torch.float32, torch.float64)])
def test_assigning_a_weight_after_a_dtype_cast(before, after):
    """``layer.weight = W`` keeps the coefficients' form (``original`` / ``original0``) and current dtype after
    the model was cast, as on a plain cast model; ``functional_call`` with a dense key too."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 8)).to(before)
    lsc.spectral(m, init_bits=12)
    m.to(after).eval()
    plist = m[0].parametrizations.weight
    form = [n for n, _ in plist.named_parameters(recurse=False)]
    w = torch.randn(8, 16, dtype=after)
    m[0].weight = w
    assert [n for n, _ in plist.named_parameters(recurse=False)] == form
    assert m[0].weight.dtype == after
    torch.testing.assert_close(m[0].weight.float(), w.float(), rtol=0.05, atol=0.05)
    x = torch.randn(2, 16, dtype=after)
    torch.func.functional_call(m, {"0.weight": w}, (x,))


def test_a_checkpoint_under_another_name_of_the_same_transform_loads():
    a, b = nn.Sequential(nn.Linear(16, 16)), nn.Sequential(nn.Linear(16, 16))
    lsc.spectral(a, transform="wavelet")
    lsc.spectral(b, transform="cdf97")
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.eval()(torch.ones(1, 16)), a.eval()(torch.ones(1, 16)))


def test_a_checkpoint_of_another_transform_is_refused():
    """Coefficients of another transform have the same shapes: loading them would give wrong weights silently."""
    torch.manual_seed(0)
    dct = nn.Sequential(nn.Linear(16, 16))
    lsc.spectral(dct)
    state = dct.state_dict()
    other = nn.Sequential(nn.Linear(16, 16))
    lsc.spectral(other, transform="wavelet")
    with pytest.raises(lsc.LscError, match="'dct' transform, this model's of 'wavelet'"):
        other.load_state_dict(state)
    same = nn.Sequential(nn.Linear(16, 16))
    lsc.spectral(same)
    same.load_state_dict(state)
    old = {k: v for k, v in state.items() if not k.endswith("0._extra_state")}  # written before it was saved
    assert len(old) == len(state) - 2  # the weight's and the bias's
    same.load_state_dict(old)
    assert torch.equal(same.eval()(torch.ones(1, 16)), dct.eval()(torch.ones(1, 16)))


def test_an_in_place_edit_of_a_kept_weight_is_named_once():
    """``nn.init`` / ``reset_parameters`` write into a computed weight, which the coefficients overwrite: said once."""
    m = nn.Linear(8, 4)
    lsc.spectral(m)
    m.eval()
    kept = m.weight.clone()
    with torch.no_grad():
        nn.init.zeros_(m.weight)
    with pytest.warns(UserWarning, match=r"weight was edited in place .*module\.weight = new_weight"):
        w = m.weight
    assert torch.equal(w, kept)
    with torch.no_grad():
        m.weight.mul_(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(m.weight, kept)  # once per tensor
    m.weight = torch.zeros(4, 8)  # assigning is the way: it re-analyzes
    assert torch.equal(m.weight, torch.zeros(4, 8))


class _TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(x[:, :8] + self.emb.weight[:1])


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), _TiedHead],
                         ids=["mlp", "tied"])
def test_meta_round_trip_then_checkpoint_restores_the_model(make):
    """``to("meta")``, ``to_empty(device=...)``, ``load_state_dict``: as for a plain model, the model comes back
    (lsc's position tables are rebuilt from the layouts, also for a tied tensor, whose parametrization sees
    each cast twice; the values come from the checkpoint)."""
    torch.manual_seed(0)
    m = make()
    q = lsc.spectral(m, init_bits=6)
    x = torch.randn(3, 16)
    (m(x).pow(2).mean() + lsc.quantization_loss(m)).backward()  # q_net's shared tables in use
    state = copy.deepcopy(m.state_dict())
    want = m.eval()(x)
    file = lsc.save(m, io.BytesIO())
    bits = lsc.bits_per_weight(m).item()
    m.to("meta")
    m.to_empty(device="cpu")
    m.load_state_dict(state)
    assert torch.equal(m.eval()(x), want) and lsc.save(m, io.BytesIO()) == file
    assert lsc.bits_per_weight(m).item() == bits  # the index tables (groups, scan order) are whole again
    m.train()
    opt = torch.optim.Adam(list(m.parameters()) + list(q.parameters()), 1e-2)
    (m(x).pow(2).mean() + lsc.quantization_loss(m)).backward()
    opt.step()


@pytest.mark.parametrize("arch", ["gpt2", "bert-mlm"])
def test_hugging_face_save_pretrained_of_a_tied_spectral_model(arch, tmp_path):
    """A tied LM head shares the embedding's coefficients: ``save_pretrained`` (what every Trainer checkpoint
    calls) writes them once, and the checkpoint restores the model bit for bit."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    def make():
        torch.manual_seed(0)
        if arch == "gpt2":
            return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=32,
                                                                        n_layer=1, n_head=2))
        return transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                                    num_attention_heads=2, intermediate_size=64))
    m = make()
    q = lsc.spectral(m, init_bits=6)
    opt = torch.optim.Adam(list(m.parameters()) + list(q.parameters()), 1e-2)
    ids = torch.randint(0, 100, (2, 8))
    m(input_ids=ids).logits.pow(2).mean().backward()
    opt.step()
    m.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    head = "lm_head" if arch == "gpt2" else "cls.predictions.decoder"
    assert not any(k.startswith(f"{head}.parametrizations.weight.original") for k in saved)
    fresh = make()
    lsc.spectral(fresh, init_bits=6)
    fresh.load_state_dict(saved, strict=False)
    m.eval(), fresh.eval()
    assert torch.equal(fresh(input_ids=ids).logits, m(input_ids=ids).logits)


def test_to_dense_gives_hugging_face_its_own_tie_declarations_back():
    """lsc declares the tied copies of its state for save_pretrained; a plain model must tie and resize as before."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=1,
                                                             n_head=2))
    before = m._tied_weights_keys
    lsc.spectral(m)
    assert len(m._tied_weights_keys) == len(before) + 1
    copied = copy.deepcopy(m)
    for model in (m, copied):  # a copy gives them back too
        lsc.to_dense(model)
        assert model._tied_weights_keys == before and "_tied_weights_keys" not in model.__dict__
        model.tie_weights()
        model.resize_token_embeddings(130)
        assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.shape[0] == 130


def test_hugging_face_save_pretrained_of_a_nested_tied_spectral_model(tmp_path):
    """The tie declared on a submodule (an EncoderDecoderModel's GPT-2 decoder): keys relative to it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    enc = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    dec = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                  add_cross_attention=True, is_decoder=True)
    m = transformers.EncoderDecoderModel(config=transformers.EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec))
    lsc.spectral(m, init_bits=6)
    m.save_pretrained(tmp_path)


def test_a_step_the_grad_scaler_skips_does_not_leave_q_net_stuck():
    """Mixed precision with ``model.zero_grad()`` (Hugging Face's Trainer): a step a GradScaler skips (inf gradients,
    usual in the first fp16 steps) must not keep q_net's inf gradients, or every later step is skipped too."""
    def run(clear):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        q_net = lsc.spectral(model, rate_weight=0.1)
        opt = torch.optim.Adam(list(model.parameters()) + list(q_net.parameters()), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)  # the first steps overflow
        x = torch.randn(8, 16)
        ran = 0
        for _ in range(40):
            scaler.scale(model(x).pow(2).mean() + lsc.quantization_loss(model)).backward()
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            ran += scaler.get_scale() >= before  # the scale is cut only when the step was skipped
            clear(model, opt)
        return ran
    assert run(lambda m, o: m.zero_grad()) == run(lambda m, o: o.zero_grad()) > 20
