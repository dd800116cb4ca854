"""The ``lsc`` command line, end to end through the real entry points (subprocesses).

All commands are independent (the .lsc inputs are written in-process by the
fixture), so they run concurrently to keep this file fast.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import lsc
from lsc.posttraining import compress_posttraining
from lsc.zoo import DigitsCNN

LSC_SCRIPT = shutil.which("lsc", path=str(Path(sys.executable).parent)) or shutil.which("lsc")


def _cmd(*args, script=False):
    if script and LSC_SCRIPT:
        return [LSC_SCRIPT, *args]
    return [sys.executable, "-m", "lsc", *args]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    sd = DigitsCNN().state_dict()
    torch.save(sd, d / "cnn.pt")
    from safetensors.torch import save_file
    save_file(sd, str(d / "cnn.safetensors"))
    (d / "empty-dir").mkdir()
    (d / "hf-model").mkdir()
    save_file(sd, str(d / "hf-model" / "model.safetensors"))  # a Hugging Face model directory
    compress_posttraining(sd, max_error=0.05, path=d / "cnn.lsc", progress=False)
    data = (d / "cnn.lsc").read_bytes()
    (d / "corrupt.lsc").write_bytes(data[:-40] + bytes(b ^ 0x5A for b in data[-40:]))
    (d / "truncated.lsc").write_bytes(data[: len(data) // 2])
    (d / "notes.pt").write_text("not a checkpoint\n")
    if hasattr(torch, "float8_e4m3fn"):
        torch.save({"w": torch.zeros(4, 4).to(torch.float8_e4m3fn)}, d / "fp8.pt")
    else:  # pragma: no cover
        torch.save({"w": torch.zeros(4, 4, dtype=torch.complex64)}, d / "fp8.pt")
    return d, sd


RUNS = {
    # name: (args, uses console script)
    "compress_pt": (["compress", "{d}/cnn.pt", "-o", "{d}/out_pt.lsc", "--max-error", "0.05"], True),
    "compress_st": (["compress", "{d}/cnn.safetensors", "-o", "{d}/out_st.lsc", "--bits", "4", "-q"], False),
    "compress_dir": (["compress", "{d}/hf-model", "--bits", "4", "-q"], False),
    "info": (["info", "{d}/cnn.lsc"], True),
    "decompress_st": (["decompress", "{d}/cnn.lsc", "-o", "{d}/dense.safetensors"], False),
    "decompress_pt": (["decompress", "{d}/cnn.lsc", "-o", "{d}/dense.pt"], True),
    "recode": (["recode", "{d}/cnn.lsc", "-o", "{d}/recoded.lsc"], False),
    "err_recode_onto_input": (["recode", "{d}/cnn.lsc", "-o", "{d}/cnn.lsc"], False),
    "plot": (["plot", "{d}/cnn.lsc", "-o", "{d}/bits.png"], False),
    "demo": (["demo", "-o", "{d}/demo.lsc", "--epochs", "1", "--steps", "4"], False),
    "demo_target": (["demo", "-q", "-o", "{d}/target.lsc", "--epochs", "2", "--steps", "30", "--target-bytes", "30000"], True),
    # error paths
    "err_missing": (["compress", "{d}/nope.pt", "-o", "{d}/x.lsc"], False),
    "err_not_ckpt": (["compress", "{d}/notes.pt", "-o", "{d}/x.lsc"], True),
    "err_empty_dir": (["compress", "{d}/empty-dir", "-o", "{d}/x.lsc"], False),
    "err_demo_target": (["demo", "--target-bytes", "-5", "-o", "{d}/never.lsc"], False),
    "err_dtype": (["compress", "{d}/fp8.pt", "-o", "{d}/x.lsc"], False),
    "err_corrupt": (["info", "{d}/corrupt.lsc"], False),
    "err_truncated": (["decompress", "{d}/truncated.lsc", "-o", "{d}/y.pt"], True),
    "err_not_lsc": (["info", "{d}/cnn.pt"], False),
    "err_bad_suffix": (["decompress", "{d}/cnn.lsc", "-o", "{d}/dense.npz"], False),
    "err_verbose": (["-v", "info", "{d}/corrupt.lsc"], False),
    "err_both_rules": (["compress", "{d}/cnn.pt", "--bits", "4", "--max-error", "0.1"], False),
    "err_no_command": ([], True),
}


@pytest.fixture(scope="module")
def runs(files):
    d, _ = files
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    def go(item):
        name, (args, script) = item
        argv = _cmd(*[a.format(d=d) for a in args], script=script)
        p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=d)
        return name, p

    with ThreadPoolExecutor(max_workers=4) as ex:
        return dict(ex.map(go, RUNS.items()))


def _ok(p):
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_compress_checkpoint(runs, files):
    d, sd = files
    out = _ok(runs["compress_pt"])
    assert "wrote" in out and "smaller than fp32" in out and "--max-error 0.05" in out
    dec = lsc.load(d / "out_pt.lsc")
    assert set(dec) == set(sd)
    for k, v in sd.items():
        assert torch.linalg.vector_norm(dec[k] - v) <= 0.05 * torch.linalg.vector_norm(v) + 1e-12
    assert _ok(runs["compress_st"]) == ""  # --quiet
    assert set(lsc.load(d / "out_st.lsc")) == set(sd)
    _ok(runs["compress_dir"])  # a model directory: its model.safetensors, written beside it as hf-model.lsc
    from_dir, from_file = lsc.load(d / "hf-model.lsc"), lsc.load(d / "out_st.lsc")
    assert set(from_dir) == set(sd) and all(torch.equal(from_dir[k], from_file[k]) for k in sd)


def test_a_warning_is_one_line_in_the_cli_voice(files):
    d, _ = files
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    p = subprocess.run(_cmd("compress", str(d / "cnn.pt"), "-o", str(d / "typo.lsc"), "--bits", "4",
                            "--exclude", "fc9.*", "-q"), capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "lsc: warning: lsc.spectral: no parameter name matches exclude='fc9.*'" in p.stderr.splitlines()
    assert "runpy" not in p.stderr and "UserWarning" not in p.stderr


def test_info_table(runs, files, capsys):
    d, sd = files
    out = _ok(runs["info"])
    for k in sd:
        assert k in out
    assert "vs fp32" in out and "vs fp16" in out and "share" in out
    size = (d / "cnn.lsc").stat().st_size
    assert f"{size:,} B file" in out
    import json
    from lsc.cli import main
    assert main(["info", str(d / "cnn.lsc"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["file_bytes"] == size


def test_recode(runs, files):
    d, _ = files
    out = _ok(runs["recode"])
    assert "wrote" in out and "same weights" in out
    assert (d / "recoded.lsc").read_bytes() == lsc.recode(d / "cnn.lsc")
    a, b = lsc.load(d / "cnn.lsc"), lsc.load(d / "recoded.lsc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    p = runs["err_recode_onto_input"]
    assert p.returncode != 0 and "overwrite the input" in p.stderr


def test_decompress_both_formats(runs, files):
    d, sd = files
    _ok(runs["decompress_st"])
    _ok(runs["decompress_pt"])
    ref = lsc.load(d / "cnn.lsc")
    from safetensors.torch import load_file
    for got in (load_file(str(d / "dense.safetensors")), torch.load(d / "dense.pt", weights_only=True)):
        assert set(got) == set(sd)
        for k in sd:
            assert got[k].dtype == sd[k].dtype and torch.equal(got[k], ref[k])
    DigitsCNN().load_state_dict(torch.load(d / "dense.pt", weights_only=True))
    from safetensors import safe_open
    with safe_open(str(d / "dense.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # as save_pretrained writes it, for Hugging Face loaders


def test_plot_png(runs, files):
    d, _ = files
    assert "heatmaps" in _ok(runs["plot"])
    assert (d / "bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_end_to_end(runs, files):
    d, _ = files
    out = _ok(runs["demo"])
    for word in ("fp32 size", "file size", "ratio", "accuracy before", "accuracy after"):
        assert word in out
    fresh = lsc.load(d / "demo.lsc", model=DigitsCNN())
    assert isinstance(fresh, DigitsCNN)


def test_demo_hits_a_size_target(runs, files):
    d, _ = files
    _ok(runs["demo_target"])
    size = os.path.getsize(d / "target.lsc")
    assert abs(size - 30000) <= 0.05 * 30000, size


def test_help_lists_every_subcommand(capsys):
    from lsc.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for sub in ("demo", "compress", "info", "decompress", "plot"):
        assert sub in out


@pytest.mark.parametrize("argv", [
    ["--version"],
    ["demo", "--version"],                 # after the subcommand too, as the other global options
    ["info", "--version"],                 # before the required positional is checked
    ["compress", "x.pt", "--version"],
    ["-q", "recode", "--version"],
])
def test_version_before_or_after_the_subcommand(argv, capsys):
    from lsc.cli import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"lsc {lsc.__version__}" and not err


@pytest.mark.parametrize("name, needle", [
    ("err_missing", "nope.pt: no such"),
    ("err_not_ckpt", "notes.pt: not a PyTorch checkpoint"),
    ("err_empty_dir", "empty-dir: is a directory without a checkpoint (looked for model.safetensors"),
    ("err_demo_target", "--target-bytes -5: must be a number of bytes > 0"),
    ("err_dtype", "w: unsupported dtype"),
    ("err_corrupt", "corrupt.lsc"),
    ("err_truncated", "truncated.lsc: truncated"),
    ("err_not_lsc", "cnn.pt: not an lsc file"),
    ("err_bad_suffix", "unknown output format .npz"),
])
def test_errors_are_one_actionable_line(runs, name, needle):
    p = runs[name]
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("lsc: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in p.stderr


def test_verbose_shows_traceback(runs):
    p = runs["err_verbose"]
    assert p.returncode == 1
    assert "Traceback" in p.stderr and p.stderr.strip().splitlines()[-1].startswith("lsc: error: ")


def test_usage_errors(runs):
    assert runs["err_both_rules"].returncode == 2 and "not allowed with" in runs["err_both_rules"].stderr
    p = runs["err_no_command"]
    assert p.returncode == 2
    for sub in ("demo", "compress", "info", "decompress", "plot"):
        assert sub in p.stderr


def test_interrupted_decompress_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """Dense checkpoints are written atomically too: a crash mid-write leaves the old file as it was."""
    from lsc.cli import write_checkpoint
    out = tmp_path / "dense.safetensors"
    write_checkpoint({"w": torch.ones(3)}, out)
    old = out.read_bytes()

    def interrupted(*a, **k):
        raise KeyboardInterrupt("power cut")
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint({"w": torch.zeros(5)}, out)
    assert out.read_bytes() == old
    assert os.listdir(tmp_path) == ["dense.safetensors"]


def test_compress_with_a_bounds_file(files, tmp_path, capsys):
    import json

    from lsc.cli import main
    d, sd = files
    names = [k for k, v in sd.items() if v.dim() >= 2]
    bounds = {names[0]: 0.01, names[1]: 0.3, "default": 0.05}
    path = tmp_path / "bounds.json"
    path.write_text(json.dumps(bounds))
    assert main(["compress", str(d / "cnn.pt"), "-o", str(tmp_path / "b.lsc"), "--bounds", str(path)]) == 0
    assert f"--bounds {path} (2 tensors)" in capsys.readouterr().out
    dec = lsc.load(tmp_path / "b.lsc")
    for k, v in sd.items():
        err = float(torch.linalg.vector_norm(dec[k] - v) / torch.linalg.vector_norm(v))
        assert err <= (bounds[k] if k in bounds else 0.05) + 1e-9
    assert float(torch.linalg.vector_norm(dec[names[1]] - sd[names[1]]) / torch.linalg.vector_norm(sd[names[1]])) > 0.05
    # bad files: one clear line, nothing written
    for text, needle in (("[1, 2]", "JSON object"), ("{", "not a readable JSON"), ('{"a": -1}', "finite number >= 0"),
                         ('{"a": true}', "finite number >= 0")):
        path.write_text(text)
        assert main(["compress", str(d / "cnn.pt"), "-o", str(tmp_path / "bad.lsc"), "--bounds", str(path)]) != 0
        assert needle in capsys.readouterr().err
        assert not (tmp_path / "bad.lsc").exists()


def test_compress_with_a_hessians_file(files, tmp_path, capsys):
    from safetensors.torch import save_file

    from lsc.cli import main
    d, sd = files
    model = DigitsCNN()
    model.load_state_dict(sd)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 8, 8, generator=g)
    x = x + torch.randn(256, 1, 1, 1, generator=g)  # correlated pixels: feedback has something to cancel
    hess = lsc.collect_hessians(model, lambda m: m(x))
    path = tmp_path / "hess.safetensors"
    save_file(hess, str(path))
    args = ["compress", str(d / "cnn.pt"), "--max-error", "0.3"]
    assert main(args + ["-o", str(tmp_path / "plain.lsc")]) == 0
    capsys.readouterr()
    assert main(args + ["-o", str(tmp_path / "fed.lsc"), "--hessians", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"error feedback from --hessians {path}" in out and "error feedback on 4 tensors" in out
    assert "cannot meet their bound" not in out  # feedback raises the weight error on purpose

    def output_error(file):
        m = DigitsCNN()
        m.load_state_dict(lsc.load(file))
        with torch.no_grad():
            return float((m(x) - model(x)).pow(2).mean())
    assert output_error(tmp_path / "fed.lsc") < output_error(tmp_path / "plain.lsc")
    # a file that is not safetensors: one clear line, nothing written
    bad = tmp_path / "hess.txt"
    bad.write_text("not tensors")
    assert main(["compress", str(d / "cnn.pt"), "-o", str(tmp_path / "bad.lsc"), "--hessians", str(bad)]) != 0
    assert "--hessians" in capsys.readouterr().err and not (tmp_path / "bad.lsc").exists()


def test_compress_with_row_counts_for_an_embedding_table(tmp_path, capsys):
    from safetensors.torch import save_file

    from lsc.cli import main
    torch.manual_seed(0)
    sd = {"emb.weight": torch.randn(300, 32), "head.weight": torch.randn(4, 32)}
    torch.save(sd, tmp_path / "m.pt")
    counts = torch.zeros(300, dtype=torch.float64)
    counts[:30] = 1000.0  # a tenth of the vocabulary is ever read
    save_file({"emb.weight": counts}, str(tmp_path / "h.safetensors"))
    args = ["compress", str(tmp_path / "m.pt"), "--max-error", "0.2"]
    assert main(args + ["-o", str(tmp_path / "plain.lsc")]) == 0
    assert main(args + ["-o", str(tmp_path / "rows.lsc"), "--hessians", str(tmp_path / "h.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "emb.weight: rows weighted by their lookup counts" in out and "error feedback on" not in out
    assert (tmp_path / "rows.lsc").stat().st_size < 0.5 * (tmp_path / "plain.lsc").stat().st_size
    got = lsc.load(tmp_path / "rows.lsc")
    err = (got["emb.weight"] - sd["emb.weight"]).pow(2).sum(1) / sd["emb.weight"].pow(2).sum(1)
    assert float(err[:30].max()) < 0.1 and float(err[30:].mean()) > 0.5  # read rows kept, the rest nearly dropped
    # --row-prior credits every row with more lookups: the unread rows stay, in a larger file
    assert main(args + ["-o", str(tmp_path / "prior.lsc"), "--hessians", str(tmp_path / "h.safetensors"),
                        "--row-prior", "300"]) == 0
    assert (tmp_path / "prior.lsc").stat().st_size > (tmp_path / "rows.lsc").stat().st_size
    kept = lsc.load(tmp_path / "prior.lsc")["emb.weight"]
    assert float(((kept - sd["emb.weight"]).pow(2).sum(1) / sd["emb.weight"].pow(2).sum(1))[30:].mean()) < 0.5 * float(err[30:].mean())
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # a usage error, found before anything is read
        main(args + ["-o", str(tmp_path / "bad.lsc"), "--hessians", str(tmp_path / "h.safetensors"), "--row-prior", "0"])
    assert e.value.code == 2 and "--row-prior: 0: must be" in capsys.readouterr().err
    assert not (tmp_path / "bad.lsc").exists()


def test_closed_pipe_stops_quietly(files):
    """`lsc info big.lsc | head -1`: the reader leaves early; lsc stops without an error message."""
    d, _ = files
    p = subprocess.Popen(_cmd("info", str(d / "cnn.lsc")), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # nobody reads: every write fails with EPIPE
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "error" not in err, err


# ----------------------------------------------------------------- regressions

def _overwrite_cases(tmp_path):
    """(argv, the input file -o names) for every kind of file `lsc compress` reads besides its argument."""
    import json

    from safetensors.torch import save_file
    torch.manual_seed(0)
    (tmp_path / "hf").mkdir()
    save_file({"a.weight": torch.randn(16, 32)}, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "sh").mkdir()
    shards = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}
    for name, shard in shards.items():
        save_file({name: torch.randn(8, 16)}, str(tmp_path / "sh" / shard))
    (tmp_path / "sh" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    torch.save({"w": torch.randn(8, 8)}, tmp_path / "m.pt")
    (tmp_path / "bounds.json").write_text('{"default": 0.05}')
    save_file({"w": torch.eye(8, dtype=torch.float64)}, str(tmp_path / "h.safetensors"))
    t = str(tmp_path)
    return [
        (["compress", f"{t}/hf", "-o", f"{t}/hf/model.safetensors"], tmp_path / "hf" / "model.safetensors"),
        (["compress", f"{t}/hf", "-o", f"{t}/hf/../hf/./model.safetensors"], tmp_path / "hf" / "model.safetensors"),
        (["compress", f"{t}/sh", "-o", f"{t}/sh/model.safetensors.index.json"], tmp_path / "sh" / "model.safetensors.index.json"),
        (["compress", f"{t}/sh/model.safetensors.index.json", "-o", f"{t}/sh/{shards['b.weight']}"],
         tmp_path / "sh" / shards["b.weight"]),
        (["compress", f"{t}/m.pt", "-o", f"{t}/bounds.json", "--bounds", f"{t}/bounds.json"], tmp_path / "bounds.json"),
        (["compress", f"{t}/m.pt", "-o", f"{t}/h.safetensors", "--hessians", f"{t}/h.safetensors"], tmp_path / "h.safetensors"),
    ]


def test_compress_never_overwrites_a_file_it_reads(tmp_path, capsys):
    from lsc.cli import main
    for argv, victim in _overwrite_cases(tmp_path):
        before = victim.read_bytes()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lsc: error: ") and "overwrite the input" in err[0], err
        assert victim.read_bytes() == before, argv
    assert main(["compress", str(tmp_path / "sh"), "-o", str(tmp_path / "sh.lsc"), "-q"]) == 0  # still readable


def test_compress_dot_writes_beside_the_directory(tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    from lsc.cli import main
    (tmp_path / "my-model").mkdir()
    save_file({"a.weight": torch.randn(16, 32)}, str(tmp_path / "my-model" / "model.safetensors"))
    monkeypatch.chdir(tmp_path / "my-model")
    for arg in (".", "./"):
        assert main(["compress", arg, "--bits", "4", "-q"]) == 0
        assert sorted(os.listdir(tmp_path / "my-model")) == ["model.safetensors"]
        assert set(lsc.load(tmp_path / "my-model.lsc")) == {"a.weight"}
        (tmp_path / "my-model.lsc").unlink()


def test_plot_reports_the_heatmaps_it_draws(files, tmp_path, capsys):
    from lsc.cli import main
    from lsc.errors import LscError
    from lsc.plots import plot_bits, rows_from_file
    d, _ = files
    assert main(["plot", str(d / "cnn.lsc"), "-o", str(tmp_path / "two.png"), "--max-heatmaps", "2"]) == 0
    assert "two.png: 2 heatmaps (the largest of 8 spectral tensors, --max-heatmaps 2), bytes of 8 tensors" \
        in capsys.readouterr().out
    assert main(["plot", str(d / "cnn.lsc"), "-o", str(tmp_path / "all.png")]) == 0
    assert "all.png: 8 heatmaps, bytes of 8 tensors" in capsys.readouterr().out
    assert main(["plot", str(d / "cnn.lsc"), "-o", str(tmp_path / "bars.png"), "--max-heatmaps", "0"]) == 0
    assert "bars.png: 0 heatmaps" in capsys.readouterr().out and (tmp_path / "bars.png").stat().st_size > 0
    with pytest.raises(SystemExit) as e:  # a usage error, before anything is read or drawn
        main(["plot", str(d / "cnn.lsc"), "-o", str(tmp_path / "neg.png"), "--max-heatmaps", "-1"])
    assert e.value.code == 2 and "--max-heatmaps: -1" in capsys.readouterr().err
    with pytest.raises(LscError, match="max_heatmaps=-1"):
        plot_bits(rows_from_file(d / "cnn.lsc"), tmp_path / "neg.png", max_heatmaps=-1)
    assert not (tmp_path / "neg.png").exists()


@pytest.mark.parametrize("where, needle", [("missing/demo.lsc", "does not exist"), (".", "is a directory")])
def test_demo_checks_its_output_before_training(tmp_path, capsys, where, needle):
    from lsc.cli import main
    assert main(["demo", "-o", str(tmp_path / where), "--steps", "2", "--epochs", "1"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and needle in err  # nothing trained: the first line of a run names the data set


@pytest.mark.parametrize("argv, needle", [
    (["compress", "{d}/cnn.pt", "-o", "{d}/never.lsc", "--block-size", "0"], "--block-size: 0"),
    (["compress", "{d}/cnn.pt", "-o", "{d}/never.lsc", "--block-size", "-8"], "--block-size: -8"),
    (["demo", "-o", "{d}/never.lsc", "--seed", "-1"], "--seed: -1"),
    (["demo", "-o", "{d}/never.lsc", "--seed", str(2 ** 32)], f"--seed: {2 ** 32}"),
])
def test_usage_mistakes_exit_2_before_any_work(files, capsys, argv, needle):
    from lsc.cli import main
    d, _ = files
    with pytest.raises(SystemExit) as e:
        main([a.format(d=d) for a in argv])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and needle in err and "unexpected" not in err and out == ""
    assert not (d / "never.lsc").exists()


def test_a_bits_range_without_a_quarter_bit_step_is_refused_before_reading(files, capsys):
    from lsc.cli import main
    d, _ = files
    assert main(["compress", str(d / "cnn.pt"), "-o", str(d / "never.lsc"), "--min-bits", "2.1", "--max-bits", "2.2"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == ("lsc: error: --min-bits 2.1 --max-bits 2.2: no quarter-bit step lies in the "
                                         "range (bits come in steps of 0.25); widen it")
    assert not (d / "never.lsc").exists()


def test_an_upper_case_safetensors_suffix_is_read_as_safetensors(files, tmp_path, capsys):
    from safetensors.torch import save_file

    from lsc.cli import main
    _, sd = files
    save_file(sd, str(tmp_path / "CNN.SAFETENSORS"))
    assert main(["compress", str(tmp_path / "CNN.SAFETENSORS"), "--bits", "4", "-q"]) == 0
    assert set(lsc.load(tmp_path / "CNN.lsc")) == set(sd)


def test_every_plot_command_in_the_docs_names_its_output():
    root = Path(__file__).resolve().parents[1]
    import re
    for doc in (root / "README.md", root / "docs" / "CLI.md"):
        for cmd in re.findall(r"`(lsc plot [^`]*)`", doc.read_text()):
            assert " -o " in f" {cmd} ", f"{doc.name}: `{cmd}` lacks the required -o"


@pytest.mark.parametrize("argv", [
    ["--max-error", "-1"], ["--max-error", "emb.*=nan"], ["--row-prior", "nan"], ["--bits", "nan"], ["--bits", "100"],
    ["--max-error-1d", "-1"], ["--min-bits", "inf"], ["--bits", "4", "--max-error-1d", "0.001"],
    ["--bits", "4", "--max-bits", "2"],
])
def test_bad_numbers_and_ignored_flags_are_usage_errors_before_loading(tmp_path, capsys, monkeypatch, argv):
    from lsc import cli, posttraining
    torch.save({"w": torch.randn(8, 8)}, tmp_path / "m.pt")
    monkeypatch.setattr(posttraining, "load_checkpoint", lambda *a: pytest.fail("the checkpoint was read"))
    with pytest.raises(SystemExit) as e:
        cli.main(["compress", str(tmp_path / "m.pt"), "-o", str(tmp_path / "m.lsc"), *argv])
    assert e.value.code == 2 and "error: argument" in capsys.readouterr().err
    assert not (tmp_path / "m.lsc").exists()


def test_tied_tensors_count_once_in_compress_and_are_listed_by_info(tmp_path, capsys):
    from lsc.cli import main
    torch.manual_seed(0)
    emb = torch.randn(64, 32)
    torch.save({"embed.weight": emb, "lm_head.weight": emb, "fc.weight": torch.randn(32, 32)}, tmp_path / "t.pt")
    assert main(["compress", str(tmp_path / "t.pt"), "-o", str(tmp_path / "t.lsc")]) == 0
    out = capsys.readouterr().out
    assert "2 tensors (1 more names tied to them), 3,072 float weights" in out
    compress_ratio = re.search(r"([0-9.]+)x smaller than fp32", out).group(1)
    assert main(["info", str(tmp_path / "t.lsc")]) == 0
    info = capsys.readouterr().out
    assert re.search(r"^lm_head\.weight +tied += embed\.weight$", info, re.M)
    assert re.search(r"ratio: ([0-9.]+)x vs fp32", info).group(1) == compress_ratio


def test_bounds_that_name_no_tensor_are_refused_or_named(tmp_path, capsys):
    from lsc.cli import main
    torch.save({"bert.fc1.weight": torch.randn(32, 32), "bert.fc2.weight": torch.randn(32, 32)}, tmp_path / "m.pt")
    (tmp_path / "b.json").write_text(json.dumps({"fc1.weight": 0.001, "fc2.weight": 0.001, "default": 0.2}))
    assert main(["compress", str(tmp_path / "m.pt"), "--bounds", str(tmp_path / "b.json"),
                 "-o", str(tmp_path / "m.lsc")]) == 1
    assert "none of its 2 names matches a tensor" in capsys.readouterr().err and not (tmp_path / "m.lsc").exists()
    (tmp_path / "b.json").write_text(json.dumps({"bert.fc1.weight": 0.01, "fc2.weight": 0.001, "default": 0.2}))
    with pytest.warns(UserWarning, match=r"no tensor matches max_error\['fc2.weight'\]"):
        lsc.compress_posttraining(torch.load(tmp_path / "m.pt"), max_error=json.loads((tmp_path / "b.json").read_text()))
