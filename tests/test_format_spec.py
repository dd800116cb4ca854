"""docs/FORMAT.md is complete: an independent reader written from it alone (tests/spec_reader.py)
decodes every kind of file lsc writes to exactly the integers lsc stored."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import lsc
import lsc.codec.entropy
from lsc.codec import compress_weights, to_bytes
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
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _files(tmp_path_factory)


NAMES = ["mixed", "mixed_rowmajor_buffers", "mixed_float16", "mixed_bfloat16", "mixed_float64_24bits", "mixed_zero",
         "digits_segments", "posttraining"]


@pytest.mark.parametrize("name", NAMES)
def test_spec_reader_matches_lsc(files, name):
    data, model = files[name]
    spec = spec_reader.read(data)
    plain = lsc.load(data)
    assert set(spec) == set(plain)  # ties, raw tensors and decoded buffers under every name

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
            seen["scan"].add(t.get("scan"))
            tied |= n != "emb.weight" and t is decoded.get("emb.weight")
    assert {0, 1, 2, 4, 5, 6} <= seen["ndim"]
    assert seen["kinds"] == {"spectral", "raw", "buffer"}
    assert {"float16", "bfloat16", "float32", "float64", "int32", "int64", "bool"} <= seen["dtypes"]
    assert segments > 1 and max_k > 1 << 23 and ragged and tied
    assert {(1, False), (0, False), (0, True)} <= modes  # categorical, uniform, constant groups
    assert {"morton", "rowmajor"} <= seen["scan"]


def _reject(data, match):
    with pytest.raises(SpecFormatError, match=match):
        spec_reader.read(data)
    with pytest.raises(lsc.LscFormatError):  # lsc agrees the file is bad
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
    _reject(data[:8] + (3).to_bytes(4, "little") + data[12:], "version")


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


@pytest.mark.parametrize("name", ["mixed", "mixed_float16", "mixed_bfloat16", "digits_segments"])
def test_spec_operation_order_is_bit_exact(files, name):
    """The spec's operation order, run in float32, gives lsc's weights bit for bit."""
    plain = lsc.load(files[name][0])
    for n, t in spec_reader.read(files[name][0]).items():
        if t["kind"] == "spectral":
            assert torch.equal(_spec_order(t).to(plain[n].dtype), plain[n]), n
