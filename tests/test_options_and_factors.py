"""Per-tensor option dicts of lsc.spectral (unmatched keys, module types, tied names), and lazy loading of a
factored file (lsc.factorize) into the unfactored model."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import lsc
from lsc.codec import to_bytes
from lsc.lazy import lazy_info

MODES = ("packed", "entropy")


# --------------------------------------------------------------------------- per-tensor option dicts

def _emb_lin():
    return nn.Sequential(nn.Embedding(100, 64), nn.Linear(64, 64))


class _Tied(nn.Module):  # an LM head tied to the embedding
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight


def _got(model):
    return {e.name: (e.parametrization.layout.block_shape, e.parametrization.transform) for e in model._lsc.entries}


def _spectral_warnings(model, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lsc.spectral(model, **kw)
    return [str(w.message) for w in caught if "lsc.spectral" in str(w.message)]


@pytest.mark.parametrize("option,value", [("block_size", (1, 64)), ("transform", "wavelet")])
def test_a_key_that_matches_no_parameter_is_named_in_a_warning_as_include_exclude_are(option, value):
    model = _emb_lin()
    got = _spectral_warnings(model, **{option: {"0.weigth": value, "1.weight": value}})
    assert got == [f"lsc.spectral: no parameter name matches {option}['0.weigth']"]
    assert _got(model)["0.weight"] == ((8, 8), "dct")  # the typo leaves the tensor at the default, said aloud


def test_unmatched_keys_join_the_include_exclude_warning_and_default_or_matching_keys_warn_not():
    model = _emb_lin()
    got = _spectral_warnings(model, exclude="0.wieght", block_size={"default": 4, "weight": 8, "1.bias": 4},
                             transform={"nope.*": "wavelet", nn.Conv2d: "wavelet"})
    assert got == ["lsc.spectral: no parameter name matches exclude='0.wieght', transform['nope.*']; "
                   "no module holding a parameter is an instance of transform[nn.Conv2d]"]
    assert _spectral_warnings(_emb_lin(), block_size={"default": 4, "0.weight": (1, 64), nn.Linear: 4}) == []


def test_a_module_type_key_selects_the_parameters_of_such_modules():
    model = _emb_lin()
    assert _spectral_warnings(model, block_size={nn.Embedding: (1, 64)}, transform={nn.Linear: "wavelet"}) == []
    got = _got(model)
    assert got["0.weight"] == ((1, 64), "dct")
    assert got["1.weight"] == ((8, 8), "wavelet") and got["1.bias"] == ((8,), "wavelet")


def test_an_exact_name_wins_over_a_glob_and_a_glob_over_a_module_type_whatever_the_dict_order():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16))
    lsc.spectral(model, block_size={nn.Linear: 2, "weight": 4, "2.weight": (1, 16), "default": 8},
                 transform={nn.Linear: "wavelet53", "1.*": "wavelet"})
    got = _got(model)
    assert got["2.weight"] == ((1, 16), "wavelet53")  # exact name; type (no glob matches its transform)
    assert got["0.weight"] == ((4, 4), "wavelet53") and got["1.weight"] == ((4, 4), "wavelet")  # glob over type
    assert got["0.bias"] == ((2,), "wavelet53") and got["1.bias"] == ((2,), "wavelet")  # type over "default"


def test_a_tied_weight_takes_an_option_keyed_by_any_of_its_names():
    model = _Tied()
    assert _spectral_warnings(model, block_size={"head.weight": (1, 16)}, transform={"head.weight": "wavelet"}) == []
    assert _got(model) == {"emb.weight": ((1, 16), "wavelet")}
    model = _Tied()  # a module type of the second name, and a glob on it
    lsc.spectral(model, block_size={nn.Linear: (2, 8)}, transform={"head.*": "wavelet53"})
    assert _got(model) == {"emb.weight": ((2, 8), "wavelet53")}
    model = _Tied()  # one value under both names is no conflict; a more specific key decides
    lsc.spectral(model, block_size={"emb.weight": (1, 16), "head.weight": [1, 16]},
                 transform={"emb.weight": "wavelet", "head.*": "dct"})
    assert _got(model) == {"emb.weight": ((1, 16), "wavelet")}


@pytest.mark.parametrize("kw,message", [
    (dict(block_size={"emb.weight": (1, 16), "head.weight": (2, 8)}),
     r"block_size: 'emb.weight' and 'head.weight' are one tied tensor but get different values: \(1, 16\) "
     r"\(key 'emb.weight'\) and \(2, 8\) \(key 'head.weight'\)"),
    (dict(transform={nn.Embedding: "wavelet", nn.Linear: "dct"}),
     r"transform: 'emb.weight' and 'head.weight' are one tied tensor but get different values: 'wavelet' "
     r"\(key nn.Embedding\) and 'dct' \(key nn.Linear\)"),
])
def test_two_names_of_a_tie_with_conflicting_values_are_refused_naming_both(kw, message):
    model = _Tied()
    with pytest.raises(lsc.LscError, match=message):
        lsc.spectral(model, **kw)
    assert getattr(model, "_lsc", None) is None and type(model.emb) is nn.Embedding  # left as it was


# --------------------------------------------------------------------------- lazy loading of a factored file

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 48)
        self.conv = nn.Conv2d(6, 12, 3, padding=1)
        self.conv_flat = nn.Conv1d(12, 16, 3, padding=1)
        self.fc = nn.Linear(48, 40)
        self.out = nn.Linear(40, 10)

    def forward(self, idx, img):
        a = self.out(torch.tanh(self.fc(self.emb(idx)))).sum(1)
        b = self.conv_flat(self.conv(img).mean(-1)).mean((1, 2))
        return a + b[:, None]


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (3, 5), generator=g), torch.randn(3, 6, 8, 8, generator=g)


def _factored_file(**spectral_kw):
    torch.manual_seed(0)
    model = _Net()
    lsc.factorize(model, rank=0.5, min_saving=0.0, min_numel=0, include=["emb.weight", "conv.weight", "fc.weight"])
    lsc.factorize(model, rank=0.5, min_saving=0.0, min_numel=0, include="conv_flat.weight", tucker=False)
    lsc.spectral(model, init_bits=6, **spectral_kw)
    buf = io.BytesIO()
    lsc.save(model.eval(), buf)
    return buf.getvalue()


@pytest.mark.parametrize("mode", MODES)
def test_a_factored_file_loads_lazily_into_the_unfactored_model_as_densely(mode):
    data = _factored_file()
    torch.manual_seed(2)
    dense = lsc.load(data, _Net()).eval().requires_grad_(False)
    torch.manual_seed(3)
    lazy = lsc.load(data, _Net(), lazy=mode, chunk_numel=64)  # tiny chunks: chunked decoding of the factors too
    for n, p in dense.named_parameters():  # every weight, the folded ones included, bit for bit
        mod, _, attr = n.rpartition(".")
        assert torch.equal(getattr(lazy.get_submodule(mod), attr), p), n
    x = _inputs()
    with torch.inference_mode():
        ref = dense(*x)
        assert torch.equal(lazy(*x), ref) and torch.equal(lazy(*x), ref)
    lazy_sd = lazy.state_dict()
    assert lazy_sd.keys() == dense.state_dict().keys()
    assert all(torch.equal(lazy_sd[k], v) for k, v in dense.state_dict().items())
    # memory stays compressed: the folded weights are not held densely, only their factors' compact form
    info = lazy_info(lazy)
    assert info["tensors"] == 9  # 4 folded weights and 5 biases
    assert info["dense_bytes"] == sum(p.numel() * 4 for p in dense.parameters())
    assert info["other_bytes"] == 0 and 0 < info["compact_bytes"] < info["dense_bytes"]
    assert all(p.numel() == 0 for p in lazy.parameters())
    # casts and copies behave as for any lazy weight
    half = copy.deepcopy(lazy).half()
    assert torch.equal(half.fc.weight, dense.fc.weight.half())
    assert torch.equal(half.conv.weight, dense.conv.weight.half())
    assert lazy.fc.weight.dtype == torch.float32


def test_a_factor_left_raw_by_spectral_is_folded_from_the_raw_tensor():
    data = _factored_file(exclude="fc.parametrizations.weight.original1")
    info = lsc.file_info(data)["rows"]
    assert {r["name"]: r["kind"] for r in info}["fc.parametrizations.weight.original1"] != "spectral"
    dense = lsc.load(data, _Net()).eval()
    lazy = lsc.load(data, _Net(), lazy=True)
    assert torch.equal(lazy.fc.weight, dense.fc.weight)
    with torch.inference_mode():
        assert torch.equal(lazy(*_inputs()), dense.requires_grad_(False)(*_inputs()))


def test_a_factored_file_still_loads_lazily_into_a_model_factorized_the_same_way():
    data = _factored_file()
    dense = lsc.load(data, _Net()).eval().requires_grad_(False)
    model = _Net()
    lsc.factorize(model, rank=0.5, min_saving=0.0, min_numel=0, include=["emb.weight", "conv.weight", "fc.weight"])
    lsc.factorize(model, rank=0.5, min_saving=0.0, min_numel=0, include="conv_flat.weight", tucker=False)
    lazy = lsc.load(data, model, lazy=True)
    with torch.inference_mode():
        assert torch.allclose(lazy(*_inputs()), dense(*_inputs()), atol=1e-5)


def test_a_factored_file_into_a_model_factorized_otherwise_is_refused_by_name():
    data = _factored_file()
    model = _Net()
    lsc.factorize(model, rank=0.5, min_saving=0.0, min_numel=0, include="conv.weight", tucker=False)  # 2, not 3
    with pytest.raises(lsc.LscError,
                       match=r"conv\.parametrizations\.weight\.original1: file has shape \(6, 3\), model has \(6, 54\)"):
        lsc.load(data, model, lazy=True)
    assert type(model.fc) is nn.Linear and model.fc.weight.numel() == 48 * 40  # untouched


def test_a_factored_file_into_a_model_of_other_shapes_is_refused_before_the_model_is_touched():
    data = _factored_file()
    model = _Net()
    model.fc = nn.Linear(47, 40)
    with pytest.raises(lsc.LscError, match=r"fc\.weight: file has shape \(40, 48\), model has \(40, 47\)"):
        lsc.load(data, model, lazy=True)
    assert all(p.numel() > 0 for p in model.parameters())


def test_a_factored_rnn_loads_lazily_with_a_cache_into_a_model_built_on_the_meta_device():
    torch.manual_seed(0)
    model = nn.LSTM(16, 24, batch_first=True)
    assert len(lsc.factorize(model, rank=0.5, min_saving=0.0, min_numel=0)) == 2
    lsc.spectral(model, init_bits=6)
    buf = io.BytesIO()
    lsc.save(model.eval(), buf)
    dense = lsc.load(buf.getvalue(), nn.LSTM(16, 24, batch_first=True)).eval().requires_grad_(False)
    with torch.device("meta"):
        bare = nn.LSTM(16, 24, batch_first=True)
    lazy = lsc.load(buf.getvalue(), bare, lazy="entropy", cache=2)
    x = torch.randn(2, 5, 16)
    with torch.inference_mode():
        ref = dense(x)[0]
        assert torch.equal(lazy(x)[0], ref) and torch.equal(lazy(x)[0], ref)
    assert torch.equal(lazy.weight_hh_l0, dense.weight_hh_l0)


def test_type_selectors_reach_weights_a_parametrization_holds():
    """lsc.factorize (or weight_norm) moves a Linear's weight into parametrization originals: a type key still
    means every parameter of the Linear."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    lsc.factorize(m, rank=4, min_saving=0.0)
    lsc.spectral(m, include=nn.Linear, block_size={nn.Linear: 2})
    names = [e.name for e in lsc.state.get_state(m).entries]
    assert "0.parametrizations.weight.original0" in names and "0.parametrizations.weight.original1" in names
    assert all(e.parametrization.layout.block_shape in ((2,), (2, 2)) for e in lsc.state.get_state(m).entries)


def test_a_module_used_at_two_places_is_matched_under_both_names():
    shared = nn.Linear(8, 8)
    m = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(8, 2))
    lsc.spectral(m, exclude="2.weight", block_size={"2.bias": 4})
    entries = {e.name: e for e in lsc.state.get_state(m).entries}
    assert "0.weight" not in entries and entries["0.bias"].parametrization.layout.block_shape == (4,)
    m2 = nn.Sequential(nn.Linear(8, 8))
    m2 = nn.Sequential(m2[0], nn.ReLU(), m2[0])
    lsc.spectral(m2, include="2.weight")
    assert [e.name for e in lsc.state.get_state(m2).entries] == ["0.weight"]


def test_exact_names_with_glob_characters_select_themselves():
    m = nn.Module()
    m.blocks = nn.ModuleDict({"attn[0]": nn.Linear(8, 8), "attn[1]": nn.Linear(8, 8)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lsc.spectral(m, exclude="blocks.attn[0].weight")
    names = [e.name for e in lsc.state.get_state(m).entries]
    assert "blocks.attn[0].weight" not in names and "blocks.attn[1].weight" in names


def test_float8_parameters_are_left_raw():
    m = nn.Module()
    m.w = nn.Parameter(torch.randn(16, 16))
    m.f8 = nn.Parameter(torch.randn(16, 16).to(torch.float8_e4m3fn), requires_grad=False)
    lsc.spectral(m)
    assert [e.name for e in lsc.state.get_state(m).entries] == ["w"]
    assert torch.equal(lsc.load(lsc.compress_weights(m))["f8"].view(torch.uint8), m.f8.view(torch.uint8))


def test_min_group_symbols_beyond_what_a_file_holds_is_refused():
    with pytest.raises(lsc.LscError, match="at most 2\\*\\*62"):
        lsc.spectral(nn.Linear(4, 4), min_group_symbols=2 ** 63)
