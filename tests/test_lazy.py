"""Issue 5: lazy (per-layer, on the fly) decompression at inference time."""
import gc
import io

import numpy as np
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


def _chunked_embedding(mode):
    """(dense, lazy) loads of one 4000-row table file, the lazy one decoding chunks of 16384 values."""
    make = lambda: nn.Embedding(4000, 64)  # noqa: E731
    torch.manual_seed(0)
    data = _file(make())
    return lsc.load(data, make()), load_lazy(data, make(), mode=mode, chunk_numel=16384)


@pytest.mark.parametrize("mode", MODES)
def test_embedding_decodes_only_the_rows_it_looks_up(mode):
    dense, lazy = _chunked_embedding(mode)
    store = lazy.__dict__["_lsc_lazy"].stores[0]
    assert len(store.chunks) > 4
    idx = torch.tensor([[3, 3999, 17], [17, 0, 5]])
    assert store.chunk_ok[torch.device("cpu")]  # the chunking was checked at load, on the model's device
    with torch.inference_mode():
        tracker = track_decode_memory(lazy)  # from the first forward on
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


@pytest.mark.parametrize("mode", MODES)
def test_rnn_with_a_cache_runs_again(mode):
    """Cached weights keep the RNN's weakrefs alive: the released _flat_weights must still be rebuilt."""
    from model_zoo import RNNs
    torch.manual_seed(0)
    data = _file(RNNs())
    dense = lsc.load(data, RNNs().eval())
    lazy = load_lazy(data, RNNs(), mode=mode, cache=16)
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        ref = dense(x)
        for _ in range(3):
            assert torch.equal(lazy(x), ref)
    assert all(w is None for w in lazy.lstm._flat_weights)


def test_rnn_forward_of_one_thread_survives_another_thread():
    """One thread's post-hook released the _flat_weights another thread's RNN forward was about to read."""
    import threading
    torch.manual_seed(0)
    make = lambda: nn.LSTM(6, 8, num_layers=2, batch_first=True)  # noqa: E731
    data = _file(make())
    dense = lsc.load(data, make().eval())
    lazy = load_lazy(data, make())
    x = torch.randn(2, 5, 6)
    inside, done, first = threading.Event(), threading.Event(), threading.current_thread()
    check_input = lazy.check_input

    def paused_check_input(*args):  # the first thread stops here, its flat weights set, until the other is done
        if threading.current_thread() is first:
            inside.set()
            assert done.wait(10)
        return check_input(*args)

    lazy.check_input = paused_check_input
    other = []

    def second():
        inside.wait(10)
        with torch.no_grad():
            other.append(lazy(x)[0])
        done.set()
    t = threading.Thread(target=second)
    t.start()
    with torch.no_grad():
        out = lazy(x)[0]
        ref = dense(x)[0]
    t.join()
    assert torch.equal(out, ref) and torch.equal(other[0], ref)
    assert all(w is None for w in lazy._flat_weights)


@pytest.mark.parametrize("cache", [0, 16])
def test_rnn_serves_many_threads_and_survives_errors(cache):
    from concurrent.futures import ThreadPoolExecutor
    torch.manual_seed(0)
    make = lambda: nn.LSTM(6, 8, num_layers=2, batch_first=True)  # noqa: E731
    data = _file(make())
    dense = lsc.load(data, make().eval())
    lazy = load_lazy(data, make(), cache=cache)
    xs = [torch.randn(2, 5, 6) for _ in range(4)]
    with torch.no_grad():
        refs = [dense(x)[0] for x in xs]
        with pytest.raises(RuntimeError):
            lazy(torch.randn(2, 5, 7))  # wrong input size: raised inside the forward, weights already set

        def run(k):
            with torch.no_grad():
                return lazy(xs[k % 4])[0]
        with ThreadPoolExecutor(8) as pool:
            assert all(torch.equal(out, refs[k % 4]) for k, out in enumerate(pool.map(run, range(64))))
    assert all(w is None for w in lazy._flat_weights)


@pytest.mark.parametrize("mode", MODES)
def test_embedding_index_out_of_range_raises(mode):
    """The chunked lookup filled rows it never decoded with uninitialised memory; a dense one raises."""
    dense, lazy = _chunked_embedding(mode)
    ok = torch.tensor([[3, 3999]])
    with torch.inference_mode():
        for _ in range(2):  # the first use decodes whole, the second the chunks
            for bad in ([[4000]], [[-1]], [[5, 9000]], [[-4001, 3]]):
                with pytest.raises(IndexError):
                    dense(torch.tensor(bad))
                with pytest.raises(IndexError):
                    lazy(torch.tensor(bad))
            assert torch.equal(lazy(ok), dense(ok))
    assert lazy.parametrizations.weight[0].store.chunk_ok[torch.device("cpu")]


def _cast_model():
    return nn.Sequential(nn.Embedding(300, 64), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
def test_cast_lazy_model_equals_cast_dense_model(mode, cast):
    """model.half() on a lazy model: the decoder still runs at the file's precision, only the weight is cast."""
    torch.manual_seed(0)
    data = _file(_cast_model(), init_bits=12)
    dense = getattr(lsc.load(data, _cast_model()), cast)()
    lazy = getattr(load_lazy(data, _cast_model(), mode=mode, chunk_numel=2048, cache=1), cast)()
    idx = torch.randint(0, 300, (3, 7))
    with torch.no_grad():
        for _ in range(2):  # whole, then chunked decoding (and the embedding's chunked row lookup)
            assert torch.equal(lazy(idx), dense(idx))
        for n, p in dense.named_parameters():
            assert torch.equal(lazy.get_parameter(n) if "." not in n else
                               getattr(lazy.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]), p), n
        sd = lazy.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in dense.state_dict().items())
        lazy.float()  # and back: the file's weights, bit for bit
        assert torch.equal(lazy[1].weight, lsc.load(data, _cast_model())[1].weight)
    assert lazy_info(lazy)["dense_bytes"] == sum(p.numel() * 4 for p in dense.parameters())


def test_deepcopy_gives_a_copy_with_its_own_runtime():
    import copy
    torch.manual_seed(0)
    data = _file(Tied())
    lazy = load_lazy(data, Tied(), cache=2)
    dense = lsc.load(data, Tied())
    idx = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        lazy(idx)
        twin = copy.deepcopy(lazy)
        rt, rt2 = lazy._lsc_lazy, twin._lsc_lazy
        assert rt2 is not rt and not rt2.cache and rt2.decodes == 0
        assert twin.emb.parametrizations.weight[0].store is twin.head.parametrizations.weight[0].store
        assert twin.emb.parametrizations.weight[0].store is not lazy.emb.parametrizations.weight[0].store
        set_cache(twin, 0)
        assert torch.equal(twin(idx), dense(idx))
        assert rt2.decodes == 4 and rt.decodes == 4  # the copy's own scopes: the tied weight once per use
        twin.half()
        assert lazy.emb.weight.dtype == torch.float32 and torch.equal(lazy(idx), dense(idx))
        assert torch.equal(twin.state_dict()["body.weight"], dense.body.weight.half())


def test_load_state_dict_into_a_lazy_model_says_what_to_do():
    data = _file(_stack(1))
    lazy = load_lazy(data, _stack(1))
    with pytest.raises(lsc.LscError, match="lazily"):
        lazy.load_state_dict(lazy.state_dict())
    with pytest.raises(lsc.LscError, match="lazily"):
        lazy[0][0].load_state_dict(_stack(1)[0][0].state_dict(), strict=False)


def test_packed_rows_are_exact_when_a_column_spans_more_than_floats_hold():
    """|q| <= 2^24 fits float32, but a column from -2^24 to 2^24 unpacks through values up to 2^25."""
    from lsc.packing import PackedCoefficients
    top = 1 << 24
    q = np.array([[-top, 5, -3], [top, -7, 2], [top - 1, 0, 1]], dtype=np.int64)
    got = PackedCoefficients(q).rows(0, 3)
    assert torch.equal(got.to(torch.int64), torch.from_numpy(q))


def test_lazy_packed_file_at_24_bits_equals_dense_loading():
    torch.manual_seed(0)
    m = nn.Linear(16, 16)
    with torch.no_grad():
        m.weight.uniform_(-1, 1)
        m.bias.uniform_(-1, 1)
    lsc.spectral(m, block_size=1, init_bits=23)  # q = c * 2^23: |q| <= 2^24, max - min > 2^24
    buf = io.BytesIO()
    lsc.save(m, buf)
    dense = lsc.load(buf.getvalue())
    lazy = lsc.load(buf.getvalue(), nn.Linear(16, 16), lazy="packed")
    assert torch.equal(lazy.state_dict()["weight"], dense["weight"])


@pytest.mark.parametrize("mode", MODES)
def test_first_decode_of_a_chunked_weight_holds_no_second_copy(mode):
    """The chunking check runs at load, so the first forward decodes like every later one (before, it decoded
    the whole weight and the chunks side by side); a decode on another device checks it there."""
    make = lambda: nn.Sequential(nn.Linear(64, 4000), nn.ReLU())  # noqa: E731
    torch.manual_seed(0)
    data = _file(make())
    lazy = load_lazy(data, make(), mode=mode, chunk_numel=16384)
    store = lazy.__dict__["_lsc_lazy"].stores[0]
    assert len(store.chunks) > 4 and store.chunk_ok == {torch.device("cpu"): True}
    tracker = track_decode_memory(lazy)
    x = torch.randn(2, 64)
    peaks = []
    for _ in range(2):
        tracker.reset_peak()
        with torch.inference_mode():
            lazy(x)
        peaks.append(tracker.peak)
    assert peaks[0] == peaks[1] < 4000 * 64 * 4 * 2
    store.chunk_ok.clear()  # as on a device not checked yet: the first decode there checks
    with torch.inference_mode():
        assert torch.equal(lazy(x), lsc.load(data, make())(x))
    assert store.chunk_ok == {torch.device("cpu"): True}


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_of_a_lazy_model_with_a_chunked_embedding(mode):
    """The embedding's row lookup decodes eagerly (a graph break), as every lazy weight does."""
    dense, lazy = _chunked_embedding(mode)
    lazy = nn.Sequential(lazy, nn.Linear(64, 3))
    dense = nn.Sequential(dense, lazy[1])
    idx = torch.tensor([[3, 3999, 17], [17, 0, 5]])
    with torch.no_grad():
        lazy(idx)  # eagerly first, as a server warming up
    compiled = torch.compile(lazy, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(idx), dense(idx))


def test_weights_cached_under_inference_mode_serve_a_forward_with_a_graph():
    """``cache=N``: a weight decoded under ``torch.inference_mode()`` is an ordinary tensor, so a later
    forward that records a graph (an input gradient) can use it."""
    make = lambda: nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))  # noqa: E731
    torch.manual_seed(0)
    data = _file(make())
    lazy, dense = load_lazy(data, make(), cache=4), lsc.load(data, make())
    x = torch.randn(3, 16)
    with torch.inference_mode():
        lazy(x)
    grads = []
    for m in (lazy, dense):
        xi = x.clone().requires_grad_(True)
        m(xi).pow(2).sum().backward()
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])


def test_training_a_lazy_model_is_refused_with_a_clear_error():
    make = lambda: nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 4))  # noqa: E731
    lazy = load_lazy(_file(make()), make()).train()
    lazy.requires_grad_(True)
    with pytest.raises(lsc.LscError, match="inference only"):
        lazy(torch.tensor([1, 2]))
    lazy.requires_grad_(False)
    with torch.no_grad():
        lazy(torch.tensor([1, 2]))


def test_lazy_info_counts_the_row_class_arrays_of_an_entropy_store():
    make = lambda: nn.Sequential(nn.Embedding(30000, 64), nn.Linear(64, 8))  # noqa: E731
    torch.manual_seed(0)
    m = make()
    with torch.no_grad():
        m[0].weight.mul_(torch.where(torch.rand(30000) < 0.5, 1.0, 1e-3)[:, None])  # rows of two scales
    buf = io.BytesIO()
    lsc.compress_posttraining(m, max_error=0.05, path=buf)
    lazy = load_lazy(buf.getvalue(), make(), mode="entropy")
    store = lazy.__dict__["_lsc_lazy"].stores[0]
    gs = store.__dict__["_groups"]
    assert gs.classes > 1
    held = (gs.words, gs.counts, gs.los, gs.ks, gs.modes, gs.cols[0].base, gs.inverse, gs.table_start, gs.class_starts)
    assert store.compact_nbytes >= sum(a.nbytes for a in held) + sum(b.numel() * b.element_size() for b in store.buffers())


@pytest.mark.parametrize("mode,bound", [("packed", 4.0), ("entropy", 3.5)])
def test_lazy_loading_holds_no_wide_copies_of_a_tensor(mode, bound):
    """Loading decodes the integers in their narrowest dtype and packs them a few rows at a time: the transient
    NumPy memory stays a small multiple of the dense table (most of it the int64 check against the codec's
    decoder); it was ~11x (packed) and ~4x (entropy) with int64 and uint64 copies of the whole tensor."""
    import tracemalloc
    make = lambda: nn.Sequential(nn.Embedding(40_000, 64), nn.Linear(64, 8))  # noqa: E731
    torch.manual_seed(0)
    data = _file(make())
    target = make()
    tracemalloc.start()
    try:
        lazy = load_lazy(data, target, mode=mode)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < bound * 40_000 * 64 * 4
    x = torch.tensor([[0, 39_999, 7]])
    assert torch.equal(lazy(x), lsc.load(data, make())(x))


@pytest.mark.parametrize("mode", MODES)
def test_lazy_loading_into_a_cast_model_gives_its_dtype(mode):
    """As dense loading: weights decoded at the file's precision, then cast to the model's dtype."""
    make = lambda: nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 4))  # noqa: E731
    torch.manual_seed(0)
    data = _file(make())
    lazy = load_lazy(data, make().to(torch.bfloat16), mode=mode)
    dense = lsc.load(data, make().to(torch.bfloat16))
    assert lazy[1].weight.dtype == torch.bfloat16
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(lazy(x), dense(x))
