"""docs/FORMAT.md is complete: an independent reader written from it alone (tests/spec_reader.py)
decodes every kind of file lsc writes to exactly the integers lsc stored."""
import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import lsc
import lsc.codec.entropy
from lsc.codec import compress_weights, to_bytes
from lsc.codec.elias import BitWriter, zigzag
from lsc.state import get_state
from lsc.zoo import DigitsCNN

import spec_reader
from spec_reader import SpecFormatError


class Mixed(nn.Module):
    """Every tensor kind of the spec in one small model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)                      # 4-D weight, 1-D bias
        self.bn = nn.BatchNorm2d(5)                         # float buffers + int64 num_batches_tracked
        self.vol = nn.Conv3d(2, 3, (3, 2, 3))               # 5-D weight
        self.lin = nn.Linear(13, 21)                        # ragged: (21, 13) in (5, 3) blocks
        self.emb = nn.Embedding(11, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight                  # tied
        self.deep = nn.Parameter(torch.randn(2, 3, 1, 4, 2, 5))  # 6-D
        self.scale = nn.Parameter(torch.tensor(0.7))        # 0-D
        self.counter = nn.Parameter(torch.arange(7, dtype=torch.int32), requires_grad=False)  # integer, raw
        self.register_buffer("flags", torch.tensor([True, False, True]))
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.num_batches_tracked.fill_(42)


def _mixed(dtype=torch.float32, init_bits=8.0):
    model = Mixed().to(dtype)
    lsc.spectral(model, init_bits=init_bits, min_group_symbols=64, block_size={"lin.weight": (5, 3), "default": 8})
    return model


class RowScaled(nn.Module):
    """Tensors whose block rows differ strongly in scale, so that lsc's writer picks row classes (§2.2)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(2001, 60)                    # ragged (8, 8) blocks: 251 block rows
        self.vol = nn.Parameter(torch.randn(64, 8, 8))      # (4, 4, 4) blocks: 16 block rows of 4 blocks, k > 1
        self.proj = nn.Linear(512, 24)                      # 3 block rows: may carry at most 3 classes
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            _scale_rows(self.emb.weight, g)
            self.vol.mul_((10.0 ** -torch.randint(0, 3, (16,), generator=g)).repeat_interleave(4)[:, None, None])


def _scale_rows(w, g):
    """Most rows shrunk by 100 or zeroed, some kept: a lookup table quantized for its frequent tokens."""
    u = torch.rand(w.shape[0], 1, generator=g)
    w.mul_(torch.where(u < 0.25, 0.0, torch.where(u < 0.85, 0.01, 1.0)))


def _files(tmp_path_factory):
    """{name: (file bytes, spectral model that wrote it)}."""
    torch.manual_seed(0)
    out = {}
    m = _mixed()
    out["mixed"] = (to_bytes(compress_weights(m)), m)
    out["mixed_rowmajor_buffers"] = (to_bytes(compress_weights(m, scan="rowmajor", buffer_tolerance=2 ** -8)), m)
    for dtype in (torch.float16, torch.bfloat16):
        m = _mixed(dtype, init_bits=10)
        out[f"mixed_{str(dtype)[6:]}"] = (to_bytes(compress_weights(m)), m)
    m = _mixed(torch.float64, init_bits=24)  # ranges above 2^23: the uniform code's base-4096 digits
    out["mixed_float64_24bits"] = (to_bytes(compress_weights(m)), m)
    m = _mixed(init_bits=-4)                 # every coefficient 0: groups with K = 1, no ANS data
    out["mixed_zero"] = (to_bytes(compress_weights(m)), m)
    m = DigitsCNN()
    lsc.spectral(m, init_bits=6)
    mp = pytest.MonkeyPatch()
    mp.setattr(lsc.codec.entropy, "SEGMENT_SYMBOLS", 1 << 14)  # several ANS segments without a big model
    try:
        path = tmp_path_factory.mktemp("lsc") / "digits.lsc"
        lsc.save(m, path)
    finally:
        mp.undo()
    out["digits_segments"] = (path.read_bytes(), m)
    m = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.LayerNorm(40), nn.Linear(40, 7))
    res = lsc.compress_posttraining(m, bits=3, progress=False)
    out["posttraining"] = (to_bytes(compress_weights(res.model)), res.model)
    # version 3: row classes; subgroups of several positions (vol: k = 4) and ragged blocks (emb)
    m = RowScaled()
    lsc.spectral(m, init_bits=6, min_group_symbols=256, block_size={"vol": (4, 4, 4), "default": 8})
    out["classes"] = (to_bytes(compress_weights(m)), m)
    out["classes_rowmajor"] = (to_bytes(compress_weights(m, scan="rowmajor")), m)
    # an embedding of 36000 x 64 = 2.3M symbols (> 2^21): row classes and several ANS segments at once
    m = nn.Sequential(nn.Embedding(36000, 64), nn.Linear(64, 10))
    with torch.no_grad():
        _scale_rows(m[0].weight, torch.Generator().manual_seed(2))
    lsc.spectral(m, init_bits=6)
    path = tmp_path_factory.mktemp("lsc") / "embedding.lsc"
    lsc.save(m, path)
    out["classes_segments"] = (path.read_bytes(), m)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _files(tmp_path_factory)


NAMES = ["mixed", "mixed_rowmajor_buffers", "mixed_float16", "mixed_bfloat16", "mixed_float64_24bits", "mixed_zero",
         "digits_segments", "posttraining", "classes", "classes_rowmajor", "classes_segments"]
# tensors where lsc's writer must choose row classes (§2.2), per file
CLASSES = {"classes": ["vol", "emb.weight"], "classes_rowmajor": ["vol", "emb.weight"],
           "classes_segments": ["0.weight"]}


@pytest.mark.parametrize("name", NAMES)
def test_spec_reader_matches_lsc(files, name):
    data, model = files[name]
    spec = spec_reader.read(data)
    plain = lsc.load(data)
    assert set(spec) == set(plain)  # ties, raw tensors and decoded buffers under every name
    version, header = _parse(data)
    with_classes = {m["name"]: m["classes"] for m in header["tensors"] if "classes" in m}
    assert set(with_classes) == set(CLASSES.get(name, []))  # lsc's writer chose row classes where expected
    assert version == (3 if with_classes else 2)              # §1: version 3 only for files with classes
    for n, C in with_classes.items():
        assert 2 <= C <= 16 and spec[n]["classes"] == C and len(set(spec[n]["labels"])) == C

    # (a) integers: exactly what the spectral model stores (SpectralParametrization.integer_state)
    entries = get_state(model).entries
    assert entries
    for entry in entries:
        par = entry.parametrization
        q, e = par.integer_state(entry.coefficients.detach())
        for n in [entry.name, *entry.tied_names]:
            t = spec[n]
            assert t["kind"] == "spectral" and t["shape"] == par.layout.shape and t["block"] == par.layout.block_shape
            assert np.array_equal(t["q"], q.reshape(par.layout.num_blocks, par.layout.block_numel).numpy()), n
            assert np.array_equal(t["e"], e.reshape(-1).numpy()), n
            assert t["dtype"] == str(par.orig_dtype)[6:]
            assert (t["mean"], t["std"]) == (float(par.mean), float(par.std))

    for n, t in spec.items():
        w = plain[n]
        assert tuple(w.shape) == t["shape"] and str(w.dtype)[6:] == t["dtype"], n
        if t["kind"] == "raw":  # (b) bit-identical
            assert w.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() == t["bytes"], n
        elif t["kind"] == "buffer":  # §2.1b: float64 values cast to the dtype, bit-identical
            assert torch.equal(torch.from_numpy(t["values"]).to(w.dtype), w), n
        else:
            # (c) The bit-exact weight is defined by lsc.reconstruct.reconstruct's operation order in
            # float32 (float64 for float64 tensors), which FORMAT.md names; the spec reader computes the
            # same real number in float64, so they differ by the compute dtype's rounding (a few ulps
            # of the weights' scale) plus the final cast to the tensor's dtype (half an ulp).
            ref = torch.from_numpy(spec_reader.reconstruct(t))
            scale = float(ref.abs().max()) + abs(t["mean"]) + t["std"]
            eps_compute = torch.finfo(torch.float64 if t["dtype"] == "float64" else torch.float32).eps
            torch.testing.assert_close(w.double(), ref, rtol=torch.finfo(w.dtype).eps,
                                       atol=16 * eps_compute * scale, msg=n)


def test_files_cover_the_spec(files):
    """The files above exercise every branch of FORMAT.md the reader implements."""
    seen = {"ndim": set(), "scan": set(), "kinds": set(), "dtypes": set()}
    segments = max_k = ragged = tied = 0
    modes = set()
    classes = set()  # (C > 1, several segments, several positions per group)
    for data, _ in files.values():
        decoded = spec_reader.read(data)
        for n, t in decoded.items():
            seen["kinds"].add(t["kind"])
            seen["dtypes"].add(t["dtype"])
            if t["kind"] == "spectral":
                seen["ndim"].add(len(t["shape"]))
                segments = max(segments, t["segments"])
                max_k = max(max_k, max(K for _, _, K in t["groups"]))
                modes.update((mode, K == 1) for mode, _, K in t["groups"])
                ragged |= any(s % b for s, b in zip(t["shape"], t["block"]))
                k = spec_reader.geometry(_meta(data, n))["k"]
                classes.add((t["classes"] > 1, t["segments"] > 1, k > 1))
            seen["scan"].add(t.get("scan"))
            tied |= n != "emb.weight" and t is decoded.get("emb.weight")
    assert {0, 1, 2, 4, 5, 6} <= seen["ndim"]
    assert seen["kinds"] == {"spectral", "raw", "buffer"}
    assert {"float16", "bfloat16", "float32", "float64", "int32", "int64", "bool"} <= seen["dtypes"]
    assert segments > 1 and max_k > 1 << 23 and ragged and tied
    assert {(1, False), (0, False), (0, True)} <= modes  # categorical, uniform, constant groups
    assert {"morton", "rowmajor"} <= seen["scan"]
    # row classes with several ANS segments, with several positions per group, and tensors without classes
    assert {(True, True, False), (True, False, True)} <= classes and any(not c[0] for c in classes)


def _parse(data: bytes) -> tuple[int, dict]:
    """(version, header JSON) of a file."""
    version, hlen, _, _ = struct.unpack_from("<IIII", data, 8)
    return version, json.loads(zlib.decompress(data[24:24 + hlen]))


def _meta(data: bytes, name: str) -> dict:
    return next(m for m in _parse(data)[1]["tensors"] if name in [m["name"], *m.get("tied", [])])


def _streams(data: bytes) -> dict:
    """{name: stream bytes} of a file."""
    off, out = 24 + struct.unpack_from("<I", data, 12)[0], {}
    for m in _parse(data)[1]["tensors"]:
        out[m["name"]] = data[off:off + m["len"]]
        off += m["len"]
    return out


def _rebuild(data: bytes, header: dict, streams: dict | None = None, version: int | None = None) -> bytes:
    """A file from an edited header and, per name, replacement streams (their len and crc fixed up)."""
    body = {**_streams(data), **(streams or {})}
    for m in header["tensors"]:
        m["len"], m["crc"] = len(body[m["name"]]), zlib.crc32(body[m["name"]])
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("ascii")
    comp = zlib.compress(raw, 9)
    version = _parse(data)[0] if version is None else version
    prefix = struct.pack("<8sIIII", spec_reader.MAGIC, version, len(comp), len(raw), zlib.crc32(comp))
    return prefix + comp + b"".join(body[m["name"]] for m in header["tensors"])


def _side_bytes(info: dict) -> bytes:
    """§2.2 side information items 1-5 from the fields spec_reader.read_side parsed (lsc's bit writer)."""
    w = BitWriter()
    w.gamma(zigzag(np.diff(np.asarray(info["exponents"], dtype=np.int64), prepend=0)) + np.uint64(1))
    if info["labels"] is not None:
        w.gamma(np.asarray(info["labels"], dtype=np.uint64) + np.uint64(1))
    w.bits(np.asarray(info["modes"], dtype=np.uint8))
    w.gamma(np.array([v for lo, K in info["ranges"] for v in (int(zigzag(np.array([lo]))[0]) + 1, K)], dtype=np.uint64))
    tables = [c for t in info["tables"] if t is not None for c in t]
    if tables:
        w.gamma(np.asarray(tables, dtype=np.uint64) + np.uint64(1))
    return w.getvalue()


def _with_labels(data: bytes, name: str, edit) -> bytes:
    """The file with ``edit(labels)`` applied to tensor ``name``'s row labels, its side information re-encoded
    (the ANS data is kept)."""
    header = _parse(data)[1]
    m = next(t for t in header["tensors"] if t["name"] == name)
    stream = _streams(data)[name]
    side, ans = stream[:m["side"]], stream[m["side"]:]
    info = spec_reader.read_side(m, side)
    assert _side_bytes(info) == side                    # the re-encoder reproduces lsc's side information
    info["labels"] = edit(list(info["labels"]))
    side = _side_bytes(info)
    m["side"] = len(side)
    return _rebuild(data, header, {name: side + ans})


def _reject(data, match, lsc_match=None):
    with pytest.raises(SpecFormatError, match=match):
        spec_reader.read(data)
    with pytest.raises(lsc.LscFormatError, match=lsc_match):  # lsc agrees the file is bad
        lsc.load(data)


def test_spec_reader_validates(files):
    data = files["mixed"][0]
    spec_reader.read(data)
    bad = bytearray(data)
    bad[-3] ^= 0x40  # inside the last stream
    _reject(bytes(bad), "crc")
    _reject(data + b"\0", "trailing")
    _reject(data[:-1], "truncated")
    bad = bytearray(data)
    bad[30] ^= 1     # inside the compressed header
    _reject(bytes(bad), "header crc")
    _reject(b"\x89LSD" + data[4:], "magic")
    _reject(data[:8] + (4).to_bytes(4, "little") + data[12:], "version")
    _reject(data[:8] + (0).to_bytes(4, "little") + data[12:], "version")
    for version in (1, 2, 3):                                 # §1: older versions read unchanged
        old = spec_reader.read(data[:8] + version.to_bytes(4, "little") + data[12:])
        assert old.keys() == spec_reader.read(data).keys()


def _with_classes(data: bytes, name: str, classes) -> bytes:
    header = _parse(data)[1]
    next(m for m in header["tensors"] if m["name"] == name)["classes"] = classes
    return _rebuild(data, header)


def test_spec_reader_validates_row_classes(files):
    """§2.2 Row classes: both readers reject class data the spec rules out."""
    data = files["classes"][0]
    assert spec_reader.read(_rebuild(data, _parse(data)[1])).keys() == spec_reader.read(data).keys()  # helper is exact
    # header: proj.weight has 3 block rows (12288 coefficients), proj.bias 64 block rows but 512 coefficients
    assert spec_reader.geometry(_meta(data, "proj.weight"))["grid"][0] == 3
    _reject(_with_classes(data, "proj.weight", 4), "more classes than block rows", "class")
    _reject(_with_classes(data, "proj.bias", 2), "too small", "class")
    _reject(_with_classes(data, "vol", 17), "classes must be", "class")
    _reject(_with_classes(data, "vol", 1), "classes must be", "class")
    _reject(_with_classes(data, "vol", 3.0), "classes must be", "class")
    # side information: labels re-encoded, stream crc and header fixed
    C = _meta(data, "vol")["classes"]
    _reject(_with_labels(data, "vol", lambda labels: [C] + labels[1:]), "label out of range", "class")
    _reject(_with_labels(data, "vol", lambda labels: [0 if v == C - 1 else v for v in labels]), "unused", "class")


def test_unused_row_class_is_the_only_defect(files, monkeypatch):
    """A file whose streams are consistent but whose class 0 labels no block row (lsc's own coder, labels
    shifted by one): the spec requires every class to be used, so both readers reject it."""
    data = files["classes"][0]
    header = _parse(data)[1]
    m = next(t for t in header["tensors"] if t["name"] == "vol")
    t = spec_reader.read(data)["vol"]
    geo = spec_reader.geometry(m)
    order = spec_reader.scan_order(t["block"], m["scan"])
    bounds = np.minimum(np.arange(geo["G"] + 1) * geo["k"], geo["P"])
    labels = np.asarray(t["labels"], dtype=np.int64) + 1
    side, ans, _, segments, classes = lsc.codec.entropy.encode_symbols(
        np.ascontiguousarray(t["q"][:, order].T), t["e"][order], bounds, units=geo["grid"][0], labels=labels)
    assert classes == m["classes"] + 1 and not segments     # class 0 is empty but coded (K = 1 subgroups)
    m["classes"], m["side"] = classes, len(side)
    bad = _rebuild(data, header, {"vol": side + ans})
    _reject(bad, "unused", "class")
    check = spec_reader._check                            # without that one rule the file decodes exactly
    monkeypatch.setattr(spec_reader, "_check", lambda cond, msg: "unused" in msg or check(cond, msg))
    decoded = spec_reader.read(bad)["vol"]
    assert np.array_equal(decoded["q"], t["q"]) and np.array_equal(decoded["e"], t["e"])
    assert decoded["labels"] == labels.tolist()


def _spec_order(t: dict) -> torch.Tensor:
    """FORMAT.md's Reconstruction pseudo-code step by step in T = float32, with torch.mm for a product
    over the leading block dim and torch.bmm otherwise (the BLAS calls lsc makes, so the summation
    order inside each product, which the spec leaves to the BLAS, is the same)."""
    T = torch.float32
    q, shape, block = torch.from_numpy(t["q"]), t["shape"], t["block"]
    grid = tuple(-(-s // b) for s, b in zip(shape, block))
    step = torch.from_numpy(np.exp2(-t["e"] / 4.0).astype(np.float32))
    mean, std = torch.tensor(t["mean"], dtype=T), torch.tensor(t["std"], dtype=T)
    if not shape:
        return ((q.to(T) * step) * std + mean).reshape(())
    N = q.shape[0]
    x = (q.T.to(T) * (step * std)[:, None]).reshape(-1)       # position-major P x N
    for d, b in enumerate(block):
        if b > 1:
            m = torch.from_numpy(spec_reader.dct_matrix(b).T.copy()).to(T)
            lead, cols = math.prod(block[:d]), math.prod(block[d + 1:]) * N
            x = (torch.mm(m, x.view(b, cols)) if lead == 1 else torch.bmm(m.expand(lead, b, b), x.view(lead, b, cols)))
            x = x.reshape(-1)
    k = len(block)
    w = x.view(*block, *grid).permute([v for i in range(k) for v in (k + i, i)])
    w = w.reshape([n * b for n, b in zip(grid, block)]) + mean
    return w[tuple(slice(0, s) for s in shape)]


@pytest.mark.parametrize("name", ["mixed", "mixed_float16", "mixed_bfloat16", "digits_segments", "classes",
                                  "classes_segments"])
def test_spec_operation_order_is_bit_exact(files, name):
    """The spec's operation order, run in float32, gives lsc's weights bit for bit."""
    plain = lsc.load(files[name][0])
    for n, t in spec_reader.read(files[name][0]).items():
        if t["kind"] == "spectral":
            assert torch.equal(_spec_order(t).to(plain[n].dtype), plain[n]), n


@pytest.mark.parametrize("tucker", [True, False])
def test_factorized_weights_fold_as_the_spec_says(tucker):
    """FORMAT.md §2.3: a reader with the spec alone turns a factorized file into the plain model's weights
    (two-factor products reshaped to the model's shape, Tucker-2 cores), as lsc.load(file, model) does."""
    torch.manual_seed(0)
    m = DigitsCNN()
    infos = lsc.factorize(m, rank=4, min_saving=0.0, tucker=tucker)
    assert {i.name for i in infos} >= {"conv2.weight", "fc1.weight"}
    lsc.spectral(m, init_bits=8)
    m.eval()
    data = to_bytes(compress_weights(m))
    spec = spec_reader.read(data)
    values = {n: (spectral_value(t) if t["kind"] == "spectral" else
                  t["values"] if t["kind"] == "buffer" else t["array"].astype(np.float64)) for n, t in spec.items()}
    plain = DigitsCNN()
    folded = spec_reader.fold_factors(values, {n: tuple(v.shape) for n, v in plain.state_dict().items()})
    loaded = lsc.load(data, plain).state_dict()
    assert set(folded) == set(loaded)
    for n, w in loaded.items():
        torch.testing.assert_close(w.double(), torch.from_numpy(np.asarray(folded[n], dtype=np.float64)),
                                   rtol=1e-5, atol=1e-6, msg=n)
    # the conv kernel really came from three factors (Tucker-2) or two (SVD of the flattened kernel)
    assert sum(n.startswith("conv2.parametrizations.weight.original") for n in spec) == (3 if tucker else 2)


def spectral_value(t: dict) -> np.ndarray:
    """A spectral tensor's weight per §2.2 (float64), cast to its dtype as the spec's last step does."""
    return spec_reader.reconstruct(t).astype(np.float32).astype(np.float64)
