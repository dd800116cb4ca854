"""Robustness: bad models and inputs, bad files, determinism.

Every odd input either round-trips exactly (decoded weights == the spectral
model's eval-mode weights bit for bit, raw tensors == the originals bit for bit)
or raises an LscError that names the parameter. Bad files raise LscFormatError
(never another exception, never a giant allocation).
"""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib

import pytest
import torch
from torch import nn

import lsc
from lsc.codec.api import to_bytes
from lsc.codec.format import FORMAT_VERSION, MAGIC, PREFIX_SIZE, pack_prefix_header, parse_prefix_header


# --------------------------------------------------------------------------- helpers

def bits(t: torch.Tensor) -> bytes:
    """Exact bit pattern (NaN payloads and -0.0 included) plus dtype and shape."""
    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return repr((t.dtype, tuple(t.shape))).encode() + raw


def eval_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = {}
        for e in model._lsc.entries:
            w = getattr(e.module, e.attr).detach().clone()
            out[e.name] = w
            for t in e.tied_names:
                out[t] = w
    return out


def roundtrip(model: nn.Module, tmp_path, **options) -> tuple[dict, dict, dict]:
    """spectral(model) -> save -> load; asserts the exact round trip; returns (original sd, eval weights, decoded)."""
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lsc.spectral(model, **options)
    expected = eval_weights(model)
    path = tmp_path / "m.lsc"
    lsc.save(model, path)
    decoded = lsc.load(path)
    assert set(decoded) == set(original)
    for k, v in original.items():
        d = decoded[k]
        assert d.dtype == v.dtype and d.shape == v.shape, k
        if k in expected:
            assert bits(d) == bits(expected[k]), f"{k}: decoded weight differs from the eval-mode weight"
        else:
            assert bits(d) == bits(v), f"{k}: raw tensor not stored exactly"
    # the in-memory compressed dict decodes to the same bits as the file
    again = lsc.decompress_weights(lsc.compress_weights(model))
    assert all(bits(again[k]) == bits(decoded[k]) for k in decoded)
    return original, expected, decoded


def close_to_original(original, decoded, names, rtol=0.05):
    for k in names:
        o, d = original[k].double(), decoded[k].double()
        err = (o - d).norm() / o.norm().clamp_min(1e-12)
        assert err < rtol, f"{k}: relative error {float(err):.3g}"


class Params(nn.Module):
    """A module holding exactly the given parameters/buffers."""

    def __init__(self, params=None, buffers=None):
        super().__init__()
        for k, v in (params or {}).items():
            setattr(self, k, v if isinstance(v, nn.Parameter) else nn.Parameter(v, requires_grad=v.is_floating_point()))
        for k, v in (buffers or {}).items():
            self.register_buffer(k, v)


# --------------------------------------------------------------------------- bad models and inputs

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_rejected_by_name(bad):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight[1, 2] = bad
    with pytest.raises(lsc.LscError, match=r"^1\.weight: .*NaN or Inf"):
        lsc.spectral(model)
    assert getattr(model, "_lsc", None) is None and not hasattr(model[0], "parametrizations")  # left untouched


def test_non_finite_excluded_tensor_is_stored_exactly(tmp_path):
    model = Params({"w": torch.randn(8, 8), "b": torch.tensor([1.0, float("nan"), float("-inf"), -0.0])})
    roundtrip(model, tmp_path, include="w")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_state_after_training_never_decodes_silently(bad):
    model = nn.Linear(6, 4)
    q_net = lsc.spectral(model)
    with torch.no_grad():
        model.parametrizations.weight.original.view(-1)[3] = bad
    assert torch.isnan(model.eval().weight).all()  # NaN, not garbage integers
    assert torch.isfinite(model.bias).all()  # the other tensors decode as before
    with pytest.raises(lsc.LscError, match=r"^weight: .*NaN or Inf"):
        lsc.compress_weights(model)
    with torch.no_grad():
        model.parametrizations.weight.original.view(-1)[3] = 1e30
    with pytest.raises(lsc.LscError, match=r"^weight: .*too large"):
        lsc.compress_weights(model)
    model2 = nn.Linear(6, 4)
    q_net = lsc.spectral(model2)
    with torch.no_grad():
        q_net.tensor_offset.fill_(float("nan"))
    with pytest.raises(lsc.LscError, match=r"^weight: .*quantization network"):
        lsc.compress_weights(model2)
    assert not torch.isfinite(model2.eval().weight).any()


def _with_exponents(model: nn.Module, name: str, exponents: torch.Tensor):
    """The parametrization of ``name``, its steps fixed to 2^(-exponents / 4) (as a file loaded into it would)."""
    par = getattr(model.parametrizations, name)[0]
    par.frozen_exponent = exponents.to(torch.float32)
    return par


def test_out_of_range_check_is_per_position():
    """A coefficient the integers cannot hold at its own step is named; one far larger at a coarse step
    is stored (the check bounds |c| by the finest step first and only then looks per position)."""
    model = nn.Linear(8, 8)
    lsc.spectral(model, block_size=8)
    coeffs = model.parametrizations.weight.original
    P = coeffs[0, 0].numel()
    exponents = torch.full((P,), 96.0)  # step 2^-24
    exponents[0] = -48.0                # step 2^12 at the first position (the DC coefficient of each block)
    _with_exponents(model, "weight", exponents)
    with torch.no_grad():
        coeffs.zero_()
        coeffs.view(-1, P)[:, 0] = 2.0 ** 62  # 2^50 steps of 2^12: storable
    q = lsc.decompress_weights(lsc.compress_weights(model))["weight"]
    assert torch.equal(q, model.eval().weight)
    with torch.no_grad():
        coeffs.view(-1, P)[0, 1] = 2.0 ** 29  # 2^53 steps of 2^-24: not
    with pytest.raises(lsc.LscError, match=r"^weight: .*too large"):
        lsc.compress_weights(model)


def test_eval_weights_equal_the_file_beyond_float_integer_precision():
    """The eval forward holds the integers as floats, the file as int64: above 2^24, where float32 no
    longer holds every integer, both still decode to the same bits."""
    torch.manual_seed(0)
    model = nn.Linear(16, 8)
    lsc.spectral(model)
    coeffs = model.parametrizations.weight.original
    _with_exponents(model, "weight", torch.full((coeffs[0, 0].numel(),), 96.0))  # step 2^-24
    with torch.no_grad():
        coeffs.mul_(64.0)  # |c| up to ~200: integers up to ~2^31
    ints, _ = model.parametrizations.weight[0].integer_state(coeffs)
    assert int(ints.abs().max()) > 2 ** 28
    decoded = lsc.decompress_weights(lsc.compress_weights(model))["weight"]
    assert torch.equal(model.eval().weight, decoded)


def test_zero_size_tensors_are_stored_raw(tmp_path):
    model = Params({"w": torch.randn(5, 4), "empty": torch.zeros(0, 3), "empty2": torch.zeros(4, 0, 2)},
                   {"nothing": torch.zeros(0)})
    original, expected, decoded = roundtrip(model, tmp_path)
    assert set(expected) == {"w"}


def test_only_zero_size_tensors_is_a_clear_error():
    with pytest.raises(lsc.LscError, match="no floating-point parameters"):
        lsc.spectral(Params({"empty": torch.zeros(0, 3)}))


def test_integer_and_bool_parameters_are_stored_exactly(tmp_path):
    model = Params({"w": torch.randn(6, 6), "i": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
                    "i8": torch.tensor([-128, 0, 127], dtype=torch.int8), "flag": torch.tensor([True, False, True]),
                    "u": torch.tensor([0, 255], dtype=torch.uint8)})
    original, expected, _ = roundtrip(model, tmp_path)
    assert set(expected) == {"w"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_models(dtype, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.GELU(), nn.Linear(16, 5)).to(dtype)
    original, expected, decoded = roundtrip(model, tmp_path, init_bits=12.0)
    assert all(decoded[k].dtype == dtype for k in decoded)
    close_to_original(original, decoded, expected, rtol=0.02)
    fresh = nn.Sequential(nn.Linear(24, 16), nn.GELU(), nn.Linear(16, 5)).to(dtype)
    fresh.load_state_dict(decoded)
    x = torch.randn(3, 24, dtype=dtype)
    with torch.no_grad():
        assert bits(fresh(x)) == bits(model.eval()(x))  # same weights -> same outputs, bit for bit


def test_mixed_dtype_model(tmp_path):
    model = Params({"a": torch.randn(8, 8, dtype=torch.float16), "b": torch.randn(8, 8, dtype=torch.float64),
                    "c": torch.randn(8, 8, dtype=torch.bfloat16), "d": torch.randn(9)})
    original, expected, decoded = roundtrip(model, tmp_path, init_bits=12.0)
    close_to_original(original, decoded, expected, rtol=0.02)


def test_non_contiguous_and_channels_last(tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    lin = nn.Linear(6, 4)
    lin.weight = nn.Parameter(torch.randn(6, 4).t())  # a transposed view: non-contiguous
    assert not lin.weight.is_contiguous()
    model = nn.ModuleDict({"conv": conv, "lin": lin})
    model.register_buffer("strided", torch.arange(20.0).reshape(4, 5)[:, ::2])
    original, expected, decoded = roundtrip(model, tmp_path, init_bits=12.0)  # a buffer: never compressed, nothing to exclude
    close_to_original(original, decoded, expected, rtol=0.01)
    x = torch.randn(2, 3, 7, 7).to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = model["conv"](x)
    fresh = nn.Conv2d(3, 8, 3)
    fresh.load_state_dict({k[len("conv."):]: v for k, v in decoded.items() if k.startswith("conv.")})
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y)


def test_zero_dim_parameters(tmp_path):
    model = Params({"scale": torch.tensor(2.5), "neg": torch.tensor(-0.75, dtype=torch.float64),
                    "w": torch.randn(4, 4)})
    original, expected, decoded = roundtrip(model, tmp_path, init_bits=14.0)
    assert {"scale", "neg", "w"} <= set(expected)
    for k in ("scale", "neg"):
        assert decoded[k].shape == () and abs(float(decoded[k]) - float(original[k])) < 1e-3


def test_nine_dim_parameter(tmp_path):
    torch.manual_seed(0)
    model = Params({"w": torch.randn(2, 3, 2, 2, 3, 2, 2, 1, 2)})
    original, expected, decoded = roundtrip(model, tmp_path, block_size=2, init_bits=12.0)
    close_to_original(original, decoded, expected, rtol=0.01)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.head = nn.Linear(6, 12, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.emb(idx))


def test_tied_weights(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    original, expected, decoded = roundtrip(model, tmp_path, init_bits=12.0)
    assert model.emb.parametrizations.weight.original is model.head.parametrizations.weight.original  # still tied
    assert bits(decoded["emb.weight"]) == bits(decoded["head.weight"])
    fresh = Tied()
    fresh.load_state_dict(decoded)
    assert fresh.head.weight is fresh.emb.weight
    idx = torch.tensor([[1, 5, 11]])
    with torch.no_grad():
        assert bits(fresh(idx)) == bits(model.eval()(idx))


def test_spectral_twice_is_a_clear_error():
    model = nn.Linear(4, 3)
    lsc.spectral(model)
    with pytest.raises(lsc.LscError, match="already a spectral model"):
        lsc.spectral(model)
    with pytest.raises(lsc.LscError, match="already a spectral model"):
        lsc.spectral(nn.Sequential(model))  # also when the converted model is nested


def test_meta_device_model_is_rejected_by_name():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(lsc.LscError, match=r"^0\.weight: is on the meta device"):
        lsc.spectral(model)


def test_parameter_free_model_is_a_clear_error():
    with pytest.raises(lsc.LscError, match="no floating-point parameters"):
        lsc.spectral(nn.ReLU())


# --------------------------------------------------------------------------- files

def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    model.register_buffer("steps", torch.tensor([3], dtype=torch.int64))
    lsc.spectral(model, block_size=4, min_group_symbols=16)
    return model


@pytest.fixture(scope="module")
def valid_file() -> bytes:
    return to_bytes(lsc.compress_weights(small_model()))


def split_file(data: bytes):
    header, off = parse_prefix_header(data)
    return header, data[off:]


def repack(header: dict, body: bytes) -> bytes:
    return pack_prefix_header(header) + body


def load_ok_or_format_error(data: bytes):
    try:
        out = lsc.load(data)
    except lsc.LscFormatError:
        return None
    assert isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values())
    return out


def test_empty_file(tmp_path):
    p = tmp_path / "empty.lsc"
    p.write_bytes(b"")
    with pytest.raises(lsc.LscFormatError, match="not an lsc file"):
        lsc.load(p)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises((lsc.LscFormatError, IsADirectoryError, PermissionError)) as info:
        lsc.load(tmp_path)
    assert str(tmp_path) in str(info.value) or isinstance(info.value, lsc.LscFormatError)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.lsc"):
        lsc.load(tmp_path / "nope.lsc")


def test_newer_format_version(valid_file, tmp_path):
    data = bytearray(valid_file)
    struct.pack_into("<I", data, len(MAGIC), FORMAT_VERSION + 1)
    p = tmp_path / "future.lsc"
    p.write_bytes(bytes(data))
    with pytest.raises(lsc.LscFormatError, match="newer"):
        lsc.load(p)


def test_not_an_lsc_file(tmp_path):
    p = tmp_path / "model.pt"
    torch.save({"w": torch.randn(3)}, p)
    with pytest.raises(lsc.LscFormatError, match="not an lsc file"):
        lsc.load(p)


def _absurd_cases(valid: bytes):
    header, body = split_file(valid)
    hlen_off = len(MAGIC) + 4
    # prefix lengths
    d = bytearray(valid); struct.pack_into("<I", d, hlen_off, 0xFFFFFFFF); yield "header_len", bytes(d)
    d = bytearray(valid); struct.pack_into("<I", d, hlen_off + 4, 0xFFFFFFFF); yield "header_raw_len", bytes(d)
    # header entries (re-packed with a valid checksum, so the validator itself must refuse them)
    spectral = next(i for i, m in enumerate(header["tensors"]) if m["kind"] == "spectral")
    raw = next(i for i, m in enumerate(header["tensors"]) if m["kind"] == "raw")
    for idx, key, value in [(spectral, "shape", [1 << 40, 1 << 40]), (spectral, "shape", [1 << 62, 2]),
                            (spectral, "block", [1 << 30, 1 << 30]), (spectral, "len", 1 << 60),
                            (spectral, "side", 1 << 40), (raw, "shape", [1 << 33, 1 << 33]), (raw, "len", 1 << 62),
                            (raw, "shape", [10 ** 9]), (spectral, "shape", [-1, 5]), (spectral, "shape", [1] * 10000)]:
        h = json.loads(json.dumps(header))
        h["tensors"][idx][key] = value
        yield f"{key}={str(value)[:20]}", repack(h, body)
    h = json.loads(json.dumps(header))
    h["tensors"] = h["tensors"] * 5000  # a 25,000-entry tensor list (duplicate names)
    yield "many tensors", repack(h, body)


def test_absurd_sizes_fail_fast_without_giant_allocations(valid_file):
    for what, data in _absurd_cases(valid_file):
        tracemalloc.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(lsc.LscFormatError):
                lsc.load(data)
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert time.monotonic() - t0 < 5, what
        assert peak < 64 * len(data) + (64 << 20), f"{what}: peak Python allocation {peak} bytes"


def _mutations(valid: bytes, rng: random.Random):
    """Yield (kind, data): byte-level damage first, then damage behind intact checksums."""
    header, body = split_file(valid)
    n = len(valid)
    while True:
        kind = rng.randrange(8)
        d = bytearray(valid)
        if kind == 0:  # flip 1-8 random bits
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(n)
                d[i] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncate
            d = d[:rng.randrange(n)]
        elif kind == 2:  # overwrite a run with random bytes
            i = rng.randrange(n)
            d[i:i + rng.randint(1, 16)] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == 3:  # insert / delete / append
            i = rng.randrange(n)
            if rng.random() < 0.5:
                d[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            else:
                del d[i:i + rng.randint(1, 8)]
        elif kind in (4, 5):  # corrupt a stream but fix its CRC: reaches the entropy decoder
            h = json.loads(json.dumps(header))
            b = bytearray(body)
            m = rng.choice(h["tensors"])
            start = sum(t["len"] for t in h["tensors"][:h["tensors"].index(m)])
            if m["len"]:
                for _ in range(rng.randint(1, 4)):
                    j = start + rng.randrange(m["len"])
                    b[j] = rng.randrange(256) if rng.random() < 0.5 else b[j] ^ (1 << rng.randrange(8))
                m["crc"] = zlib.crc32(bytes(b[start:start + m["len"]]))
            d = bytearray(repack(h, bytes(b)))
        else:  # a plausible-but-wrong header field, validly packed
            h = json.loads(json.dumps(header))
            m = rng.choice(h["tensors"])
            key = rng.choice(sorted(m))
            v = m[key]
            choices = [None, -1, 0, 1, 2 ** 31, 2 ** 63, "x", [], {}, [0], [1, 2, 3], True, 1.5,
                       "float32", "int64", "morton", "rowmajor", "dct", "spectral", "raw", "0" * 8]
            if isinstance(v, int) and not isinstance(v, bool):
                choices += [v + 1, v - 1, v * 2, v // 2]
            if isinstance(v, list) and v:
                choices += [v[:-1], v + [1], [x + 1 if isinstance(x, int) else x for x in v]]
            m[key] = rng.choice(choices)
            if rng.random() < 0.3:
                h[rng.choice(["format", "tensors", "writer"])] = rng.choice([None, [], "lsc", 7])
            d = bytearray(repack(h, body))
        yield kind, bytes(d)


def test_corruption_fuzz_2000_cases(valid_file):
    """>= 2,000 mutated / truncated files: each decodes or raises LscFormatError, nothing else."""
    rng = random.Random(20240607)
    cases, decoded, kinds = 0, 0, [0] * 8
    deadline = time.monotonic() + 50
    for kind, data in _mutations(valid_file, rng):
        try:
            out = load_ok_or_format_error(data)
        except Exception as exc:  # pragma: no cover - the failure report
            pytest.fail(f"case {cases} (kind {kind}): {type(exc).__name__} escaped: {exc}")
        decoded += out is not None
        kinds[kind] += 1
        cases += 1
        if cases >= 2000:
            break
        assert time.monotonic() < deadline, f"fuzz too slow: {cases} cases in 50 s"
    assert cases == 2000 and min(kinds) > 100, kinds
    assert decoded < cases  # the validators did reject damaged files


# --------------------------------------------------------------------------- determinism

DETERMINISM_SNIPPET = textwrap.dedent("""
    import sys, torch, lsc
    from torch import nn
    torch.manual_seed(1234)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10), nn.LayerNorm(10))
    model.register_buffer("count", torch.tensor(7))
    lsc.spectral(model, block_size={"default": 8, "0.weight": 3}, init_bits=7.0, min_group_symbols=64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    lsc.save(model, sys.argv[1])
""")


def test_same_model_same_bytes_across_runs_and_processes(tmp_path):
    paths = [tmp_path / f"run{i}.lsc" for i in range(3)]
    for p in paths[:2]:
        ns = {"__name__": "snippet"}
        argv, sys.argv = sys.argv, ["snippet", str(p)]
        try:
            exec(DETERMINISM_SNIPPET, ns)
        finally:
            sys.argv = argv
    env = dict(os.environ, PYTHONHASHSEED="12345", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", DETERMINISM_SNIPPET, str(paths[2])], check=True, env=env, timeout=120)
    data = [p.read_bytes() for p in paths]
    assert data[0][:PREFIX_SIZE].startswith(MAGIC)
    assert data[0] == data[1] == data[2]


_WRONG_MODELS = [("model.pt", "lsc.load_checkpoint"), ({"w": torch.zeros(2)}, "state dict"),
                 (nn.Linear, "pass an instance"), (None, "NoneType")]


# every call with every wrong model, except lsc.load(path, None): no model is valid there (it returns the state dict)
@pytest.mark.parametrize("call,wrong,hint", [(c, w, h) for c in ("spectral", "factorize", "to_dense", "quantization_loss",
                                                                 "save", "load")
                                             for w, h in _WRONG_MODELS if not (c == "load" and w is None)])
def test_anything_but_a_model_is_refused_by_name(call, wrong, hint):
    """A path, a state dict or the class where the model belongs: one LscError saying what was passed."""
    import io
    run = {"spectral": lambda: lsc.spectral(wrong), "factorize": lambda: lsc.factorize(wrong),
           "to_dense": lambda: lsc.to_dense(wrong), "quantization_loss": lambda: lsc.quantization_loss(wrong),
           "save": lambda: lsc.save(wrong, io.BytesIO()), "load": lambda: lsc.load(b"LSC?", wrong)}[call]
    with pytest.raises(lsc.LscError, match=r"takes the model \(an nn\.Module\), got .*" + hint):
        run()
