"""Issue 5: lazy (per-layer, on the fly) decompression at inference time."""
import gc

import pytest
import torch
from torch import nn

import lsc
from lsc.codec import to_bytes
from lsc.lazy import lazy_info, load_lazy, set_cache, track_decode_memory
from model_zoo import Tied, cases, spectral_tiny_bert, tiny_bert_config

MODES = ("packed", "entropy")


def _file(model, **kw):
    lsc.spectral(model, init_bits=kw.pop("init_bits", 6), **kw)
    return to_bytes(lsc.compress_weights(model.eval()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,make,inp", cases(), ids=[c[0] for c in cases()])
def test_equals_dense_loading(name, make, inp, mode):
    data = _file(make())
    x = inp()
    dense = lsc.load(data, make().eval())
    # a tiny chunk size forces chunked reconstruction wherever a tensor has several block rows
    lazy = lsc.load(data, make(), lazy=mode, chunk_numel=64)
    assert isinstance(lazy, type(dense))  # parametrize keeps the class (as a subclass)
    with torch.no_grad():
        ref = dense(x)
        assert torch.equal(lazy(x), ref)
    with torch.inference_mode():
        assert torch.equal(lazy(x), ref)
        assert torch.equal(lazy(x), ref)  # second run: chunking decided, nothing kept from the first
    # its state_dict is the dense checkpoint (decoded weights under the model's own keys), not the placeholders
    dense_sd, lazy_sd = dense.state_dict(), lazy.state_dict()
    assert lazy_sd.keys() == dense_sd.keys() and all(torch.equal(lazy_sd[k], v) for k, v in dense_sd.items())
    for n, p in dense.named_parameters():  # attribute access decodes too
        mod, _, attr = n.rpartition(".")
        assert torch.equal(getattr(lazy.get_submodule(mod) if mod else lazy, attr), p), n


def _stack(n=4, d=64):
    return nn.Sequential(*[nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(n)])


@pytest.mark.parametrize("mode", MODES)
def test_memory_released_between_layers(mode):
    torch.manual_seed(0)
    n = 8
    data = _file(_stack(n))
    lazy = load_lazy(data, _stack(n), mode=mode, chunk_numel=1024)
    stores = lazy.__dict__["_lsc_lazy"].stores
    weights = [s for s in stores if s.name.endswith("weight")]
    alive_seen = []

    def check(module, args):  # before each layer runs: how many decoded weights are still alive?
        alive_seen.append(sum(s.last is not None and s.last() is not None for s in weights))

    for layer in lazy:
        layer[0].register_forward_pre_hook(check)
    x = torch.randn(8, 64)
    with torch.inference_mode():
        lazy(x)
    assert alive_seen == [0] * n
    # no module holds anything dense: parameters are empty placeholders
    assert all(p.numel() == 0 for _, p in lazy.named_parameters())
    # byte accounting of every tensor the decoders allocate, for as long as it lives
    tracker = track_decode_memory(lazy)
    with torch.inference_mode():
        lazy(x)
    dense_bytes = lazy_info(lazy)["dense_bytes"]
    layer_bytes = (64 * 64 + 64) * 4
    assert dense_bytes == n * layer_bytes
    assert 0 < tracker.peak <= 3 * layer_bytes  # one decoded weight + chunk temporaries
    assert tracker.current == 0
    # the same checks do catch a model that keeps every layer decoded (an LRU cache of all tensors)
    set_cache(lazy, 100)
    alive_seen.clear()
    tracker.reset_peak()
    with torch.inference_mode():
        lazy(x)
        lazy(x)
    assert alive_seen[-1] == n
    assert tracker.peak >= dense_bytes
    set_cache(lazy, 0)
    gc.collect()
    assert tracker.current == 0


def test_lru_cache_and_decode_counts():
    torch.manual_seed(0)
    data = _file(_stack())
    lazy = load_lazy(data, _stack(), cache=2)
    x = torch.randn(2, 64)
    with torch.no_grad():
        lazy(x)
        assert lazy_info(lazy)["decodes"] == 8
        lazy(x)  # cache of 2 cannot hold 8 tensors used in a cycle: all decoded again
        assert lazy_info(lazy)["decodes"] == 16
        set_cache(lazy, 0)
        set_cache(lazy, 8)
        lazy(x)
        lazy(x)
        assert lazy_info(lazy)["decodes"] == 24


def test_tied_decoded_once_per_use_and_stored_once():
    data = _file(Tied())
    lazy = load_lazy(data, Tied())
    rt = lazy.__dict__["_lsc_lazy"]
    assert len(rt.stores) == 3  # emb.weight (shared with head.weight), body.weight, body.bias
    assert lazy.emb.parametrizations.weight[0].store is lazy.head.parametrizations.weight[0].store
    with torch.no_grad():
        lazy(torch.randint(0, 50, (2, 6)))
    assert rt.decodes == 4  # emb, body.weight, body.bias, then the tied weight again for head


def test_rnn_weights_not_kept():
    from model_zoo import RNNs
    data = _file(RNNs())
    lazy = load_lazy(data, RNNs())
    with torch.no_grad():
        lazy(torch.randn(2, 5, 6))
    assert all(w is None for w in lazy.lstm._flat_weights)
    assert all(w is None for w in lazy.gru._flat_weights)


def test_tiny_bert_same_embeddings():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    make = lambda: transformers.BertModel(cfg, add_pooling_layer=False).eval()  # noqa: E731
    torch.manual_seed(0)
    data = _file(make())
    dense = lsc.load(data, make())
    ids = torch.randint(0, 300, (3, 17))
    mask = torch.ones_like(ids)
    for mode in MODES:
        lazy = lsc.load(data, make(), lazy=mode, chunk_numel=1024)
        with torch.inference_mode():
            assert torch.equal(lazy(input_ids=ids, attention_mask=mask).last_hidden_state,
                               dense(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_rejects_bad_use():
    data = _file(_stack(1))
    with pytest.raises(lsc.LscError):
        load_lazy(data, _stack(1), mode="zip")
    spec = _stack(1)
    lsc.spectral(spec)
    with pytest.raises(lsc.LscError):
        load_lazy(data, spec)
    with pytest.raises(lsc.LscError):
        load_lazy(data, _stack(2))  # strict: the model has tensors the file lacks
    with pytest.raises(lsc.LscError):
        lsc.load(data, lazy=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_equals_spectral_eval(mode):
    torch.manual_seed(0)
    spec = _stack()
    data = _file(spec)
    lazy = load_lazy(data, _stack().cuda(), mode=mode, chunk_numel=256)
    ref_model = lsc.load(data, spec).cuda().eval()  # the eval forward decodes with reconstruct() on CUDA
    x = torch.randn(8, 64, device="cuda")
    with torch.inference_mode():
        assert torch.equal(lazy(x), ref_model(x))
        assert torch.equal(lazy(x), ref_model(x))


@pytest.mark.parametrize("mode", MODES)
def test_embedding_decodes_only_the_rows_it_looks_up(mode):
    make = lambda: nn.Embedding(4000, 64)  # noqa: E731
    torch.manual_seed(0)
    data = _file(make())
    dense = lsc.load(data, make())
    lazy = load_lazy(data, make(), mode=mode, chunk_numel=16384)
    store = lazy.__dict__["_lsc_lazy"].stores[0]
    assert len(store.chunks) > 4
    idx = torch.tensor([[3, 3999, 17], [17, 0, 5]])
    with torch.inference_mode():
        assert torch.equal(lazy(idx), dense(idx))  # first use decodes whole and checks the chunking
        assert store.chunk_ok[torch.device("cpu")]
        tracker = track_decode_memory(lazy)
        assert torch.equal(lazy(idx), dense(idx))
    # only the chunks holding the rows are reconstructed, never the whole table ("entropy" still
    # entropy-decodes all integer coefficients, in int16 here: half the bytes of the float table)
    assert tracker.peak < 4000 * 64 * 4 * (0.5 if mode == "packed" else 1.0)


def test_spectral_refuses_a_lazily_loaded_model():
    """Its weights are decoded placeholders, not parameters: wrapping it would silently train only the rest."""
    data = _file(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), exclude=nn.LayerNorm)
    lazy = lsc.load(data, nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), lazy=True)
    with pytest.raises(lsc.LscError, match="loaded lazily"):
        lsc.spectral(lazy)
    assert type(lazy[1]) is nn.LayerNorm  # untouched


@pytest.mark.parametrize("mode", ["packed", "entropy"])
@pytest.mark.parametrize("cache", [0, 2])
def test_a_lazy_model_serves_many_threads_at_once(mode, cache):
    """A served model runs in a thread pool: every thread gets the serial outputs, and the cache survives
    (its LRU bookkeeping once raised KeyError when two threads evicted and refreshed at the same time)."""
    from concurrent.futures import ThreadPoolExecutor
    import io
    transformers = pytest.importorskip("transformers")
    model, _ = spectral_tiny_bert()
    buf = io.BytesIO()
    lsc.save(model, buf)
    lazy = lsc.load(buf.getvalue(), transformers.BertModel(tiny_bert_config()), lazy=mode, cache=cache)
    inputs = [torch.randint(0, 120, (2, 9)) for _ in range(8)]

    def run(k):
        with torch.no_grad():
            return lazy(input_ids=inputs[k % len(inputs)]).last_hidden_state
    serial = [run(k) for k in range(len(inputs))]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            for k, out in enumerate(pool.map(run, range(64))):
                assert torch.equal(out, serial[k % len(inputs)])
    assert not lazy._lsc_lazy.scopes  # this thread's scopes all closed
    assert len(lazy._lsc_lazy.cache) <= cache
