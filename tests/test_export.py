"""torch.export and torch.jit.trace of spectral models: the traced program computes the decoded weights."""
import copy
import io
import traceback
import warnings

import pytest
import torch
from torch import nn

import lsc
from model_zoo import cases, fine_tune, first_output, spectral_tiny_bert


def _trained(factory, x):
    torch.manual_seed(0)
    model = factory()
    fine_tune(model, lsc.spectral(model, init_bits=4), x)
    return model.eval()


def _dense_copy(model):
    """The decoded model, frozen: the exported program computes its weights from detached inputs, and
    PyTorch picks some CPU kernels by whether the weights require grad (nn.MultiheadAttention's fast
    path differs from its general one in the last bit on some CPUs)."""
    return lsc.to_dense(copy.deepcopy(model)).requires_grad_(False)


@pytest.mark.filterwarnings("ignore:The tensor attributes .*_flat_weights")  # export's note on RNNs, plain ones too
@pytest.mark.parametrize("name,factory,make_input", cases(), ids=[c[0] for c in cases()])
def test_exported_program_equals_the_exported_dense_model(name, factory, make_input):
    """The exported program decodes the weights itself; its outputs are those of the decoded model, bit for bit
    (compared with the dense model exported the same way: export's own lowering of an LSTM or attention
    may round differently from eager, for a plain model too)."""
    x = make_input()
    model = _trained(factory, x)
    with torch.no_grad():
        eager = first_output(model(x))
    program = torch.export.export(model, (x,))
    dense_program = torch.export.export(_dense_copy(model), (x,))
    got = first_output(program.module()(x))
    assert torch.equal(got, first_output(dense_program.module()(x)))
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    # the coefficients stay the program's parameters: a fine-tuned model exported again gives new weights
    assert any("parametrizations" in spec.target for spec in program.graph_signature.input_specs if spec.target)
    buf = io.BytesIO()
    torch.export.save(program, buf)  # the saved program (.pt2) loads back and computes the same
    buf.seek(0)
    assert torch.equal(first_output(torch.export.load(buf).module()(x)), got)


def test_export_of_a_model_loaded_from_a_file(tmp_path):
    """A spectral model that took a file's integers and exponents (lsc.load into it) exports those weights."""
    x = torch.randn(4, 12)
    factory = cases()[0][1]
    model = _trained(factory, x)
    lsc.save(model, tmp_path / "m.lsc")
    target = factory()
    lsc.spectral(target)
    lsc.load(tmp_path / "m.lsc", target)
    target.eval()
    plain = lsc.load(tmp_path / "m.lsc", factory()).eval()
    with torch.no_grad():
        assert torch.equal(torch.export.export(target, (x,)).module()(x), plain(x))


def test_hugging_face_bert_exports():
    model, ids = spectral_tiny_bert()
    got = torch.export.export(model, (ids,)).module()(ids).last_hidden_state
    want = torch.export.export(_dense_copy(model), (ids,)).module()(ids).last_hidden_state
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["linear", "conv2d_bn", "embedding", "tied"])
def test_jit_trace_records_the_decoded_weights(name):
    factory, make_input = next((f, i) for n, f, i in cases() if n == name)
    x = make_input()
    model = _trained(factory, x)
    with torch.no_grad():
        eager = first_output(model(x))
    with warnings.catch_warnings():  # torch.jit.trace is deprecated (not gone) in recent PyTorch
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, x, check_trace=False)
    assert torch.equal(first_output(traced(x)), eager)


def test_export_in_train_mode_is_refused_by_name():
    model = nn.Sequential(nn.Linear(6, 4))
    lsc.spectral(model)
    model.train()
    with pytest.raises(lsc.LscError, match=r"0\.weight: torch.export .* train mode"):
        torch.export.export(model, (torch.randn(2, 6),))


def test_strict_export_names_the_way_out():
    model = nn.Sequential(nn.Linear(6, 4))
    lsc.spectral(model)
    model.eval()
    with pytest.raises(Exception) as info:
        torch.export.export(model, (torch.randn(2, 6),), strict=True)
    assert "strict=False" in "".join(traceback.format_exception(info.value))


@pytest.mark.parametrize("mode", ["packed", "entropy"])
def test_a_lazy_model_refuses_export_and_trace_by_name(tmp_path, mode):
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 3))
    lsc.spectral(model)
    lsc.save(model, tmp_path / "m.lsc")
    lazy = lsc.load(tmp_path / "m.lsc", nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 3)), lazy=mode).eval()
    idx = torch.randint(0, 20, (2, 5))
    with pytest.raises(lsc.LscError, match=r"0\.weight: a model loaded with lazy=.*lsc.load\(path, model\)"):
        torch.export.export(lazy, (idx,))
    with pytest.raises(lsc.LscError, match=r"0\.weight: a model loaded with lazy="), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace is deprecated, not gone
        torch.jit.trace(lazy, idx)


_EXPORT_FIRST = """
import io, warnings, torch, lsc
from torch import nn
warnings.filterwarnings("ignore")
torch.manual_seed(0)
def make():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
m = make()
lsc.spectral(m, init_bits=4)
m.eval()
x = torch.randn(3, 16)
got = torch.export.export(m, (x,)).module()(x)   # the first decode of the process happens inside the trace
f = io.BytesIO(); lsc.save(m, f); f.seek(0)
with torch.no_grad():
    want = lsc.load(f, make()).eval()(x)
    assert torch.equal(got, want), (got - want).abs().max()
    big = nn.Linear(64, 64)                       # an eager model afterwards reads the same cached matrices
    lsc.spectral(big, block_size={"weight": (8, 64), "default": 8})
    big.eval()
    g = io.BytesIO(); lsc.save(big, g); g.seek(0)
    xb = torch.randn(2, 64)
    assert torch.equal(big(xb), lsc.load(g, nn.Linear(64, 64))(xb))
print("ok")
"""


def test_export_as_the_first_decode_of_a_process_caches_real_matrices():
    """Matrices first built while export traces (under its fake mode) must not be cached as fake tensors."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(lsc.__path__[0]), os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-c", _EXPORT_FIRST], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
