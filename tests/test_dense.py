"""lsc.to_dense: a spectral model made plain again, with exactly its decoded weights."""
import io

import pytest
import torch
from torch import nn

import lsc
from model_zoo import Tied, cases, fine_tune, first_output, spectral_tiny_bert


def _trained(factory, x):
    torch.manual_seed(0)
    model = factory()
    return fine_tune(model, lsc.spectral(model, init_bits=4), x)


@pytest.mark.parametrize("name,factory,make_input", cases(), ids=[c[0] for c in cases()])
def test_weights_are_the_decoded_weights_and_the_model_is_plain(name, factory, make_input):
    x = make_input()
    model = _trained(factory, x)
    model.eval()
    with torch.no_grad():
        expected_out = first_output(model(x))
    decoded = lsc.load(lsc.compress_weights(model), factory())
    returned = lsc.to_dense(model)
    assert returned is model
    assert type(model) is type(factory())  # parametrize's subclass is rolled back
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert not hasattr(model, "_lsc")
    sd, ref = model.state_dict(), decoded.state_dict()
    assert list(sd) == list(ref)
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k
    with torch.no_grad():
        assert torch.equal(first_output(model(x)), expected_out)
    buf = io.BytesIO()
    torch.save(model, buf)  # parametrized modules cannot be pickled; a plain one can
    with pytest.raises(lsc.LscError, match="not a spectral model"):
        lsc.quantization_loss(model)


def test_tied_weights_stay_one_parameter_and_train_as_plain():
    idx = torch.randint(0, 50, (4, 6))
    model = _trained(Tied, idx)
    lsc.to_dense(model)
    assert model.head.weight is model.emb.weight
    assert model.head.weight.requires_grad
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.emb.weight.detach().clone()
    model(idx).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(model.emb.weight, before)


def test_frozen_coefficients_give_a_frozen_weight():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)
    lsc.spectral(model)
    lsc.to_dense(model)
    assert [p.requires_grad for p in model.parameters()] == [False, True, True, True]


def test_half_precision_model_keeps_its_dtype():
    torch.manual_seed(0)
    model = nn.Linear(16, 8).half()
    lsc.spectral(model, init_bits=5)  # float32 coefficients under a float16 weight: original0
    model.eval()
    expected = model.weight.detach().clone()
    decoded = lsc.load(lsc.compress_weights(model), nn.Linear(16, 8).half())
    lsc.to_dense(model)
    assert model.weight.dtype == torch.float16
    assert torch.equal(model.weight, expected)
    assert torch.equal(model.weight, decoded.weight)


def test_factored_weights_fold_as_load_does():
    torch.manual_seed(0)
    factory = lambda: nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 4))  # noqa: E731
    model = factory()
    lsc.factorize(model, rank=4)
    kept = factory()
    lsc.factorize(kept, rank=4)
    kept.load_state_dict(model.state_dict())
    lsc.spectral(model, init_bits=6)
    lsc.spectral(kept, init_bits=6)
    kept.load_state_dict(model.state_dict())
    decoded = lsc.load(lsc.compress_weights(model), factory())  # folded into the unfactored model
    lsc.to_dense(model)
    assert type(model[0]) is nn.Linear and model[0].weight.shape == (48, 64)
    for k, v in decoded.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    lsc.to_dense(kept, keep_factors=True)
    factors = kept[0].parametrizations.weight
    assert factors.original0.shape == (48, 4) and type(factors.original0) is nn.Parameter
    assert torch.equal(kept[0].weight, model[0].weight)


def test_a_weight_that_cannot_decode_leaves_the_model_untouched():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    lsc.spectral(model)
    with torch.no_grad():
        model[1].parametrizations.weight.original[0, 0] = float("nan")
    with pytest.raises(lsc.LscError, match="1.weight"):
        lsc.to_dense(model)
    assert hasattr(model, "_lsc") and all(hasattr(m, "parametrizations") for m in model)
    lsc.quantization_loss(model)  # still a working spectral model


def test_refuses_plain_and_lazily_loaded_models(tmp_path):
    with pytest.raises(lsc.LscError, match="not a spectral model"):
        lsc.to_dense(nn.Linear(4, 4))
    model = nn.Linear(16, 16)
    lsc.spectral(model)
    path = tmp_path / "m.lsc"
    lsc.save(model, path)
    with pytest.raises(lsc.LscError, match="lazily"):
        lsc.to_dense(lsc.load(path, nn.Linear(16, 16), lazy=True))


def test_hugging_face_round_trip_through_save_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, ids = spectral_tiny_bert()
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    lsc.to_dense(model)
    model.save_pretrained(tmp_path)
    reloaded = transformers.BertModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).last_hidden_state, expected)


def test_a_dense_model_can_be_made_spectral_again():
    """Fine-tune dense, then compress again: the second conversion is a normal spectral model."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    lsc.spectral(model)
    lsc.to_dense(model)
    lsc.spectral(model, init_bits=6)
    state = model.state_dict()
    model.load_state_dict(state)  # its own checkpoint, q_net included, loads back
    fresh = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    lsc.spectral(fresh, init_bits=6)
    fresh.load_state_dict(state)
    x = torch.randn(3, 8)
    assert torch.equal(fresh.eval()(x), model.eval()(x))
