"""Models and files at the edges of what lsc promises: other parametrizations, ties of raw tensors,
root-level tensors, format limits, dtypes across checkpoints, file permissions, caches that must not go stale."""
import copy
import io
import os
import stat
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import lsc
from lsc.blocking import BlockLayout
from lsc.codec.api import _encode_integers
from lsc.codec.format import pack_prefix_header
from lsc.loss import compressed_numel
from lsc.target import raw_bytes


def _file(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    lsc.save(model, buf)
    return buf.getvalue()


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _weight_norm_pair(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(8, 8), parametrizations.weight_norm(nn.Linear(8, 8)))
    with torch.no_grad():  # unlike a fresh model's, so a layer left at its initial values shows
        m[1].parametrizations.weight.original1.mul_(-1.5)
    return m


def test_a_weight_norm_layer_lsc_leaves_alone_is_in_the_file():
    model = _weight_norm_pair()
    lsc.spectral(model, include="0.*")
    model.eval()
    data, x = _file(model), torch.randn(3, 8)
    assert {"1.parametrizations.weight.original0", "1.parametrizations.weight.original1"} <= set(lsc.load(data))
    fresh = _weight_norm_pair(seed=2)
    lsc.spectral(fresh, include="0.*")
    lsc.load(data, fresh)
    assert torch.equal(_out(fresh.eval(), x), _out(model, x))
    plain = lsc.load(data, _weight_norm_pair(seed=3))  # the file's weights, decoded; the weight-norm layer exact
    assert torch.equal(_out(plain, x)[:, :0], _out(model, x)[:, :0])
    assert torch.equal(plain[1].parametrizations.weight.original1, model[1].parametrizations.weight.original1)


def test_spectral_norm_state_is_in_the_file():
    torch.manual_seed(0)
    model = parametrizations.spectral_norm(nn.Linear(6, 6))
    model(torch.randn(2, 6))  # a power-iteration step: _u and _v differ from a fresh model's
    lsc.spectral(model)
    saved = lsc.load(_file(model.eval()))
    for key in ("parametrizations.weight.0._u", "parametrizations.weight.0._v"):
        assert torch.equal(saved[key], model.state_dict()[key])


class _TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.fc(self.emb(ids)))


def test_a_tied_raw_tensor_is_written_once_and_loads_tied():
    torch.manual_seed(0)
    model = _TiedHead()
    lsc.spectral(model, include="fc.*")
    data = _file(model.eval())
    rows = {r["name"]: r for r in lsc.file_info(data)["rows"]}
    assert "head.weight" not in rows and rows["emb.weight"]["tied"] == ["head.weight"]
    assert raw_bytes(model) < 50 * 16 * 4 * 2  # counted once, as written
    fresh = lsc.load(data, _TiedHead())
    assert fresh.head.weight is fresh.emb.weight and torch.equal(fresh.emb.weight, model.emb.weight)


def test_root_level_spectral_tensors_are_not_counted_as_raw():
    model = nn.Linear(64, 64)
    lsc.spectral(model)
    assert raw_bytes(model) == 0
    assert all(r["kind"] == "spectral" for r in lsc.file_info(_file(model.eval()))["rows"])


def test_a_factored_bare_layer_loads_into_an_unfactored_one():
    torch.manual_seed(0)
    model = nn.Linear(32, 32)
    lsc.factorize(model, max_error=0.5)
    lsc.spectral(model)
    data = _file(model.eval())
    plain = lsc.load(data, nn.Linear(32, 32))
    assert torch.allclose(plain.weight, lsc.load(data)["parametrizations.weight.original0"]
                          @ lsc.load(data)["parametrizations.weight.original1"])


def test_blocks_beyond_the_format_limits_are_refused_when_converting():
    with pytest.raises(ValueError, match="at most 8192 per dim"):
        lsc.spectral(nn.Linear(10000, 2, bias=False), block_size=10000)
    with pytest.raises(ValueError, match="positions per block"):
        lsc.spectral(nn.Linear(2048, 1024, bias=False), block_size=(1024, 2048))


def _one_block_file(b: int) -> bytes:
    """A zero 1-D tensor of ``b`` values in one block: a few hundred bytes whatever ``b``."""
    meta = {"name": "w", "kind": "spectral", "shape": [b], "dtype": "float32", "block": [b], "transform": "dct",
            "mean": np.float32(0).tobytes().hex(), "std": np.float32(1).tobytes().hex(), "min_group": 1024,
            "scan": "rowmajor"}
    meta, stream = _encode_integers(meta, BlockLayout((b,), (b,)), torch.zeros(1, b, dtype=torch.int64),
                                    torch.zeros(b, dtype=torch.int64))
    import zlib
    meta.update(len=len(stream), crc=zlib.crc32(stream))
    return pack_prefix_header({"format": "lsc", "writer": "test", "tensors": [meta]}) + stream


def test_a_file_cannot_make_the_reader_build_huge_transform_matrices():
    with pytest.raises(lsc.LscFormatError, match="block size"):
        lsc.load(_one_block_file(1 << 15))  # a 2^15 x 2^15 DCT matrix would be 8 GiB
    assert torch.equal(lsc.load(_one_block_file(5000))["w"], torch.zeros(5000))  # old files' long blocks load


def test_transform_matrices_are_kept_within_a_byte_budget():
    from lsc.transforms import BudgetCache, dct_matrix
    cache = BudgetCache(1000)
    for k in range(11):
        cache.put(k, k, 100)
    assert cache.bytes == 1000 and cache.get(0) is None and cache.get(1) == 1
    cache.put(11, 11, 100)  # 1 was just used: 2 is now the least recently used
    assert cache.get(2) is None and cache.get(1) == 1 and cache.get(11) == 11
    assert cache.put("big", "value", 1001) == "value" and cache.get("big") is None
    assert dct_matrix(1024) is dct_matrix(1024)  # a long block's matrix is built once, not at every use


def test_per_tensor_option_dicts_match_like_include():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    lsc.spectral(model, block_size={"weight": 4}, transform={"0.bias": "wavelet"})
    got = {e.name: (e.parametrization.layout.block_shape, e.parametrization.transform) for e in model._lsc.entries}
    assert got["0.weight"] == ((4, 4), "dct") and got["1.weight"] == ((4, 4), "dct")
    assert got["0.bias"] == ((8,), "wavelet") and got["1.bias"] == ((8,), "dct")


def test_a_float32_checkpoint_loads_into_the_model_built_in_bfloat16():
    torch.manual_seed(0)
    a = nn.Linear(8, 8)
    lsc.spectral(a)
    b = nn.Linear(8, 8).to(torch.bfloat16)
    lsc.spectral(b)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.parametrizations.weight.original0, a.parametrizations.weight.original)
    a.load_state_dict(b.state_dict())  # and back


def test_a_file_of_another_dtype_is_refused_by_a_spectral_model(tmp_path):
    torch.manual_seed(0)
    src = nn.Linear(16, 16).half()
    lsc.spectral(src)
    data = _file(src.eval())
    spec = nn.Linear(16, 16)
    lsc.spectral(spec)
    before = spec.parametrizations.weight.original.clone()
    with pytest.raises(lsc.LscError, match=r"weight: file holds it as torch.float16, the model as torch.float32"):
        lsc.load(data, spec)
    assert torch.equal(spec.parametrizations.weight.original, before)
    assert torch.equal(lsc.load(data, nn.Linear(16, 16)).weight, lsc.load(data)["weight"].float())


def test_saved_files_get_the_usual_permissions_and_long_names_work(tmp_path):
    model = nn.Linear(4, 4)
    lsc.spectral(model)
    model.eval()
    old = os.umask(0o022)
    try:
        lsc.save(model, tmp_path / "a.lsc")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.lsc").st_mode) == 0o644
    os.chmod(tmp_path / "a.lsc", 0o640)
    lsc.save(model, tmp_path / "a.lsc")  # replacing a file keeps its mode
    assert stat.S_IMODE(os.stat(tmp_path / "a.lsc").st_mode) == 0o640
    long = tmp_path / ("m" * 251 + ".lsc")  # 255 bytes: the longest name a Linux file system takes
    lsc.save(model, long)
    assert set(lsc.load(long)) == {"weight", "bias"} and len(os.listdir(tmp_path)) == 2


def test_lazy_conjugate_and_negative_views_are_saved_as_their_values():
    model = nn.Linear(4, 4)
    z = torch.randn(3, dtype=torch.complex64)
    model.register_buffer("conj", z.conj())
    model.register_buffer("neg", z.conj().imag)
    lsc.spectral(model)
    saved = lsc.load(_file(model.eval()))
    assert torch.equal(saved["conj"], z.conj().resolve_conj()) and torch.equal(saved["neg"], -z.imag)


def test_eval_weights_follow_a_fused_optimizer():
    torch.manual_seed(0)
    model = nn.Linear(16, 16)
    q_net = lsc.spectral(model)
    model.eval()  # fine-tuning in eval mode: the forward keeps decoded weights between steps
    opt = torch.optim.Adam(list(model.parameters()) + list(q_net.parameters()), lr=1e-2, fused=True)
    x = torch.randn(4, 16)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        with torch.no_grad():
            par = model.parametrizations.weight[0]
            assert torch.equal(model.weight, par.decoded_weight(model.parametrizations.weight.original))
    model.train()
    with torch.no_grad():  # q_net's shared steps follow it too
        par = model.parametrizations.weight[0]
        assert torch.equal(par._training_step(), lsc.quantizer.step_size(par.exponent()).reshape(-1))


def test_a_cast_drops_the_kept_weight():
    model = nn.Linear(64, 64)
    lsc.spectral(model)
    model.eval()
    with torch.no_grad():
        kept = weakref.ref(model.weight)
    assert kept() is not None
    model.half()
    assert kept() is None


def test_to_dense_of_a_copy_leaves_the_original_spectral():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    lsc.spectral(model)
    model.eval()
    x = torch.randn(3, 8)
    y = _out(model, x)
    dense = lsc.to_dense(copy.deepcopy(model))
    assert torch.equal(_out(dense, x), y) and torch.equal(_out(model, x), y)
    assert type(dense[0]) is nn.Linear and hasattr(model[0], "parametrizations")


def _bn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))


def test_a_file_with_lossy_buffers_loads_lazily():
    model = _bn_model(0)
    model(torch.randn(16, 8))  # running statistics unlike a fresh model's
    lsc.spectral(model)
    buf = io.BytesIO()
    lsc.save(model.eval(), buf, buffer_tolerance=0.01)
    x = torch.randn(3, 8)
    plain = lsc.load(buf.getvalue(), _bn_model(1).eval())
    lazy = lsc.load(buf.getvalue(), _bn_model(2).eval(), lazy=True)
    assert torch.equal(_out(lazy, x), _out(plain, x))
    assert torch.equal(lazy[1].running_var, plain[1].running_var)


def test_a_buffer_may_not_shadow_a_tensor_of_the_header():
    import zlib
    from lsc.buffers import encode_buffers
    from lsc.codec.api import BUFFERS_KEY, _encode_raw
    raw_meta, raw = _encode_raw("w", torch.ones(2))
    blob = encode_buffers({"w": torch.full((2,), 7.0)}, 0.01)
    metas = [raw_meta, {"name": BUFFERS_KEY, "kind": "buffers", "shape": [len(blob)], "dtype": "uint8"}]
    for meta, data in zip(metas, (raw, blob)):
        meta.update(len=len(data), crc=zlib.crc32(data))
    data = pack_prefix_header({"format": "lsc", "writer": "test", "tensors": metas}) + raw + blob
    with pytest.raises(lsc.LscFormatError, match=r"buffer names \['w'\] are also tensor names"):
        lsc.load(data)
    with pytest.raises(lsc.LscFormatError, match=r"buffer names \['w'\] are also tensor names"):
        lsc.load(data, _WithW(), lazy=True)


class _WithW(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.zeros(2))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)

    def forward(self, x):
        return torch.relu(self.a(x))


def _blocks() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(_Block(), _Block(), nn.Linear(32, 4))


def test_activation_checkpoint_wrappers_change_nothing_in_the_file():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    model = _blocks()
    lsc.spectral(model)
    model.eval()
    before = _file(model)
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, _Block))  # renames state-dict keys
    assert _file(model) == before and raw_bytes(model) == 0
    x = torch.randn(3, 32)
    assert torch.equal(_out(lsc.load(before, _blocks()), x), _out(model, x))


def test_casting_a_model_with_tied_spectral_weights_keeps_lsc_state_at_full_precision():
    torch.manual_seed(0)
    model = _TiedHead()
    lsc.spectral(model)
    model.eval().half()  # the tied table's parametrization belongs to two modules: it sees the cast twice
    par = model.emb.parametrizations.weight[0]
    assert par.features.dtype == torch.float32 and par.mean.dtype == torch.float32
    assert torch.equal(model.head.weight, model.emb.weight) and _out(model, torch.tensor([[1, 2]])).dtype == torch.float16


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")  # deprecated, not gone, in recent PyTorch
def test_tracing_in_train_mode_is_refused():
    model = nn.Linear(8, 8)
    lsc.spectral(model)
    with pytest.raises(lsc.LscError, match=r"torch.jit.trace of a spectral model in train mode .* model.eval\(\)"):
        torch.jit.trace(model, torch.randn(2, 8))
    traced = torch.jit.trace(model.eval(), torch.randn(2, 8))
    x = torch.randn(3, 8)
    assert torch.equal(traced(x), _out(model, x))


def test_to_dense_refuses_a_data_parallel_wrapper():
    model = nn.Linear(8, 8)
    lsc.spectral(model)
    with pytest.raises(lsc.LscError, match=r"lsc.to_dense\(wrapper.module\)"):
        lsc.to_dense(nn.DataParallel(model))
    assert type(lsc.to_dense(model)) is nn.Linear


def test_the_exact_rate_counts_occupied_bins_when_steps_are_fine(monkeypatch):
    import lsc.rate as rate
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    lsc.spectral(model, init_bits=14)
    model.eval()
    with torch.no_grad():
        monkeypatch.setattr(rate, "_SPARSE_BINS_PER_SYMBOL", 0)
        sparse = lsc.bits_per_weight(model)
        monkeypatch.setattr(rate, "_SPARSE_BINS_PER_SYMBOL", float("inf"))
        dense = lsc.bits_per_weight(model)
    assert torch.equal(sparse, dense)


def test_the_rate_of_a_finely_quantized_model_costs_what_its_file_does():
    torch.manual_seed(0)
    model = nn.Linear(256, 512)
    lsc.spectral(model, init_bits=24)  # a dense histogram over 2^24-wide alphabets would need ~100 GB
    model.eval()
    with torch.no_grad():
        predicted = float(lsc.bits_per_weight(model)) * compressed_numel(model) / 8
    assert abs(predicted / len(_file(model)) - 1) < 0.05


def test_the_rate_of_a_model_loaded_from_a_file_uses_the_file_exponents():
    torch.manual_seed(0)
    src = nn.Linear(128, 128)
    lsc.spectral(src, init_bits=4)
    data = _file(src.eval())
    model = nn.Linear(128, 128)
    lsc.spectral(model, init_bits=10)  # q_net's allocation is no longer what quantizes this model
    lsc.load(data, model)
    with torch.no_grad():
        predicted = float(lsc.bits_per_weight(model)) * compressed_numel(model) / 8
    assert _file(model.eval()) == data and abs(predicted / len(data) - 1) < 0.05
    with pytest.raises(lsc.LscError, match="exponents loaded from a file"):
        lsc.RateController(model, target_bytes=2 * len(data)).finalize()


@pytest.mark.parametrize("transform", ["dct", "wavelet53", "wavelet"])
def test_a_weight_with_a_size_one_dim_has_the_strides_of_the_files_tensor(transform):
    """A 1x1 convolution's eval weight computes what the plain model loaded from its file computes."""
    torch.manual_seed(0)
    m = nn.Conv1d(9, 9, 1)
    lsc.spectral(m, block_size={"weight": (9, 9, 1), "default": 1}, transform=transform)
    m.eval()
    plain = lsc.load(_file(m), nn.Conv1d(9, 9, 1)).requires_grad_(False)
    x = torch.randn(3, 9, 7)
    with torch.no_grad():
        assert m.weight.stride() == plain.weight.stride() == (9, 1, 1)
        assert torch.equal(m(x), plain(x))


def test_finite_weights_whose_float32_sums_overflow_are_standardized_in_float64():
    torch.manual_seed(0)
    m = nn.Linear(100, 100, bias=False)
    with torch.no_grad():
        m.weight.copy_(1e35 * (1 + 0.01 * torch.randn(100, 100)))
    ref = m.weight.detach().clone()
    lsc.spectral(m, init_bits=16)
    m.eval()
    with torch.no_grad():
        w = m.weight.clone()
    assert torch.isfinite(w).all()
    w64, ref64 = w.double(), ref.double()
    assert float((w64 - ref64).norm() / (ref64 - ref64.mean()).norm()) < 1e-3
    assert torch.equal(lsc.load(_file(m))["weight"], w)


@pytest.mark.parametrize("dtype,make,message", [
    # a finite checkerboard at 2e38: its coefficients times the std overflow float32 in the decoder
    (torch.float32, lambda: 2e38 * (torch.arange(256) % 2 * 2 - 1).float().reshape(16, 16), "too close to the largest"),
    (torch.bfloat16, lambda: torch.tensor([3e38, -3e38, 2.9e38, 2.8e38]).repeat(16), "too close to the largest"),
    (torch.float64, lambda: 1e200 * torch.randn(64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
     "too large to standardize"),
])
def test_finite_weights_at_the_edge_of_their_float_range_are_refused_by_name(dtype, make, message):
    """Finite weights that lsc's transforms would overflow (decoding to Inf/NaN silently) raise LscError at conversion."""
    w = make().to(dtype)
    m = nn.Module()
    m.p = nn.Parameter(w.clone())
    with pytest.raises(lsc.LscError, match=rf"p: .*{message}"):
        lsc.spectral(m)
    with pytest.raises(lsc.LscError, match=message):
        lsc.compress_posttraining({"p": w.clone()}, max_error=0.01)
