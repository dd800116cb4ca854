"""The ``lsc`` command line: demo, compress, info, decompress, plot.

    lsc demo                                   # fine-tune + compress a digits CNN end to end
    lsc compress model.safetensors -o m.lsc --max-error 0.05
    lsc info m.lsc
    lsc decompress m.lsc -o m.safetensors
    lsc plot m.lsc -o bits.png

Errors a person can act on (missing file, not a checkpoint, unsupported dtype,
corrupt .lsc) print one line, ``lsc: error: <what and where>``, and exit 1;
``--verbose`` adds the traceback. Progress bars go to stderr and only on a
terminal; ``--quiet`` turns them (and the chatter) off.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

from .atomic import atomic_path

__all__ = ["main", "build_parser"]

EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing error raised by the CLI itself (bad option combination, bad output path)."""


# ----------------------------------------------------------------- formatting

def fmt_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"  # pragma: no cover


def fmt_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape) if len(shape) else "scalar"


def _out(args, *a, **k):
    if not getattr(args, "quiet", False):
        print(*a, **k)


def _progress_flag(args):
    """None: tqdm decides (bars only on a TTY); False: no bars."""
    return False if getattr(args, "quiet", False) else None


def _check_input(path: str, what: str = "file") -> Path:
    p = Path(path)
    if not p.exists():
        raise CliError(f"{p}: no such {what}")
    if p.is_dir():
        raise CliError(f"{p}: is a directory, expected a {what}")
    return p


def _check_output(path: str, inputs=()) -> Path:
    """``path`` as the output, refused (before any work) when its directory is missing, it is a directory, or it
    is one of the files the command reads (``inputs``): written first, an input would be lost."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise CliError(f"{p}: output directory {parent} does not exist")
    if p.is_dir():
        raise CliError(f"{p}: is a directory; give an output file name")
    for i in inputs:
        if _same_file(p, Path(i)):
            raise CliError(f"{p}: output would overwrite the input" + ("" if str(i) == str(p) else f" {i}"))
    return p


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one existing file, however spelled (``..``, links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: nothing to overwrite
        return False


def _int_at_least(low: int, high: int | None = None):
    """An argparse ``type=``: an integer in [low, high], so that a bad value is a usage error (status 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: expected an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text}: must be " + (f">= {low}" if high is None else f"in [{low}, {high}]"))
        return value
    parse.__name__ = "integer"
    return parse


def _number(low: float = -math.inf, high: float = math.inf, *, above: bool = False):
    """An argparse ``type=``: a finite number in [low, high] (``above``: > low), so that a bad value is a usage
    error (status 2) before anything is read."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: expected a number") from None
        ok = math.isfinite(value) and (value > low if above else value >= low) and value <= high
        if not ok:
            rng = (f"> {low:g}" if above else f">= {low:g}") if high == math.inf else f"in [{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{text}: must be a finite number {rng}")
        return value
    parse.__name__ = "number"
    return parse


def _max_error_item(text: str) -> str:
    """``--max-error E`` or ``GLOB=E``, checked as a usage error (the value is parsed by :func:`_parse_max_error`)."""
    _number(0.0)(text.rpartition("=")[2])
    return text


# ----------------------------------------------------------------- commands

def cmd_demo(args) -> int:
    from .demo import run_demo
    _check_output(args.output)  # before the training, not after it
    run_demo(out=args.output, steps=args.steps, rate_weight=args.rate_weight, epochs=args.epochs,
             seed=args.seed, progress=_progress_flag(args), quiet=args.quiet, target_bytes=args.target_bytes)
    return 0


def cmd_compress(args) -> int:
    from .posttraining import _check_dtypes, checkpoint_files, compress_posttraining, load_checkpoint
    src = Path(args.checkpoint)  # a file, or a Hugging Face model directory (load_checkpoint names what is missing)
    if not src.exists():
        raise CliError(f"{src}: no such checkpoint file or directory")
    if args.bits is not None and args.max_error:
        raise CliError("give either --bits or --max-error, not both")
    if args.bits is not None:  # they shape the --max-error search, which --bits replaces: a silent no-op otherwise
        given = [f for f, v in (("--max-error-1d", args.max_error_1d), ("--min-bits", args.min_bits),
                                ("--max-bits", args.max_bits)) if v is not None]
        if given:
            args.usage_error(f"argument {given[0]}: not allowed with argument --bits (it shapes the --max-error search)")
    args.min_bits = -4.0 if args.min_bits is None else args.min_bits
    args.max_bits = 16.0 if args.max_bits is None else args.max_bits
    _check_bits_range(args)
    bounds_file = _check_input(args.bounds, "bounds file") if args.bounds else None
    hessians_file = _check_input(args.hessians, "Hessians file") if args.hessians else None
    reads = [*checkpoint_files(src), *(p for p in (bounds_file, hessians_file) if p is not None)]
    out = _check_output(args.output or str(_default_lsc_name(src)), reads)  # every file read, before any is
    if bounds_file is not None:
        max_error = _read_bounds(bounds_file)
    else:
        max_error = None if args.bits is not None else _parse_max_error(args.max_error or [])
    hessians = _read_hessians(hessians_file) if hessians_file is not None else None
    t0 = time.perf_counter()
    sd = load_checkpoint(src)
    _check_dtypes(sd)
    unique = _unique_tensors(sd)  # tied tensors (one storage under several names) count once, as the file stores them
    n_float = sum(t.numel() for t in unique if t.is_floating_point())
    fp32 = sum(4 * t.numel() if t.is_floating_point() else t.numel() * t.element_size() for t in unique)
    tied = f" ({len(sd) - len(unique)} more names tied to them)" if len(unique) < len(sd) else ""
    _out(args, f"{src}: {len(unique)} tensors{tied}, {n_float:,} float weights ({fmt_bytes(fp32)} as fp32)")
    if args.bits is not None:
        rule = f"--bits {args.bits:g}"
    elif args.bounds:
        rule = f"--bounds {args.bounds} ({len(max_error) - 1} tensors)"
    else:
        rule = "--max-error " + _describe(max_error)
    res = compress_posttraining(sd, bits=args.bits, max_error=max_error, path=out, block_size=args.block_size,
                                exclude=args.exclude or None, min_bits=args.min_bits, max_bits=args.max_bits,
                                max_error_1d=args.max_error_1d, hessians=hessians, row_prior=args.row_prior,
                                progress=_progress_flag(args))
    secs = time.perf_counter() - t0
    size = res.file_bytes
    worst = max(res.tensors, key=lambda t: t["rel_error"]) if res.tensors else None
    data = f"error feedback from --hessians {args.hessians}" if hessians is not None else "no data"
    _out(args, f"compressed {len(res.tensors)} tensors post-training ({rule}, {data}, no fine-tuning)")
    ratios = sorted(t["output_error_ratio"] for t in res.tensors if t.get("feedback") and not t.get("row_weighted"))
    if ratios:
        _out(args, f"  error feedback on {len(ratios)} tensors: output error x{ratios[len(ratios) // 2]:.2f} "
                   f"of plain rounding's (median; {ratios[0]:.2f}-{ratios[-1]:.2f})")
    for t in (t for t in res.tensors if t.get("row_weighted")):
        _out(args, f"  {t['name']}: rows weighted by their lookup counts (count-weighted error "
                   f"x{t['output_error_ratio']:.2f} of plain rounding's, for a smaller file)")
    _out(args, f"  bits/frequency: mean {res.mean_bits:.2f}, min {min(t['bits'] for t in res.tensors):.2f}, "
               f"max {max(t['bits'] for t in res.tensors):.2f}")
    if worst is not None:
        _out(args, f"  largest relative error ||W-W^||/||W||: {worst['rel_error']:.4f} ({worst['name']})")
    # with error feedback the bound chose the step (on plain rounding's error); the weight error then grows by design
    unmet = [t for t in res.tensors if t.get("bound") is not None and not t.get("feedback") and t["rel_error"] > t["bound"]]
    if unmet:
        _out(args, f"  note: {len(unmet)} tensor(s) cannot meet their bound within --max-bits {args.max_bits:g}: "
                   + ", ".join(t["name"] for t in unmet[:3]))
    _out(args, f"wrote {out}: {fmt_bytes(size)} ({8 * size / max(n_float, 1):.3f} bits/weight), "
               f"{fp32 / size:.1f}x smaller than fp32, in {secs:.1f} s")
    return 0


def _unique_tensors(sd: dict) -> list:
    """The tensors of a state dict, each storage view once (a tied embedding and LM head are one tensor)."""
    from .posttraining import view_key
    seen, out = set(), []
    for t in sd.values():
        key = view_key(t) or (id(t),)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _default_lsc_name(src: Path) -> Path:
    """model.pt -> model.lsc; a model directory my-model/ -> my-model.lsc beside it; model.safetensors.index.json -> model.lsc."""
    if src.is_dir():
        real = src.resolve()
        if not real.name:
            raise CliError(f"{src}: the root directory has no name to give the output; give -o")
        # "." and "..": beside the directory they name (as ../my-model.lsc), not inside it
        parent = src.parent if src.name not in ("", "..") else Path(os.path.relpath(real.parent))
        return parent / (real.name + ".lsc")
    name = src.name
    if name.lower().endswith(".index.json"):
        return src.with_name(name[: -len(".index.json")]).with_suffix(".lsc")
    return src.with_suffix(".lsc")


def _check_bits_range(args) -> None:
    """--min-bits/--max-bits, before the checkpoint is read (the same rules as compress_posttraining)."""
    from .errors import LscError
    from .posttraining import _exponent_range
    from .quantizer import MAX_BITS, MIN_BITS
    lo, hi = args.min_bits, args.max_bits
    if not (MIN_BITS <= lo <= hi <= MAX_BITS):
        raise CliError(f"--min-bits {lo:g} --max-bits {hi:g}: need {MIN_BITS:g} <= min <= max <= {MAX_BITS:g}")
    if args.bits is None:
        try:
            _exponent_range(lo, hi)
        except LscError:
            raise CliError(f"--min-bits {lo:g} --max-bits {hi:g}: no quarter-bit step lies in the range "
                           "(bits come in steps of 0.25); widen it") from None


def _parse_max_error(values: list[str]):
    """["0.05", "embeddings.*=0.08"] -> 0.05 or {"embeddings.*": 0.08, "default": 0.05}."""
    default, overrides = DEFAULT_MAX_ERROR, {}
    for v in values:
        glob, sep, num = v.rpartition("=")
        try:
            e = float(num)
        except ValueError:
            raise CliError(f"--max-error {v!r}: expected a number or GLOB=NUMBER") from None
        if not (e >= 0 and math.isfinite(e)):
            raise CliError(f"--max-error {v!r}: the bound must be a finite number >= 0")
        if sep:
            overrides[glob] = e
        else:
            default = e
    return {**overrides, "default": default} if overrides else default


def _read_bounds(path: Path) -> dict:
    """A JSON object ``{name: bound, ..., "default": bound}`` (``json.dump(lsc.allocate_error_bounds(...))``)."""
    import json
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CliError(f"--bounds {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or not data:
        raise CliError(f"--bounds {path}: expected a JSON object {{tensor name: bound}}")
    for name, e in data.items():
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not (e >= 0 and math.isfinite(e)):
            raise CliError(f"--bounds {path}: the bound of {name!r} must be a finite number >= 0, got {e!r}")
    return {**{k: float(v) for k, v in data.items()}, "default": float(data.get("default", DEFAULT_MAX_ERROR))}


def _read_hessians(path: Path) -> dict:
    """``{weight name: X^T X}`` from a .safetensors file (``safetensors.torch.save_file(lsc.collect_hessians(...))``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CliError(f"--hessians {path}: not a readable safetensors file ({e})") from None


def _describe(max_error) -> str:
    if isinstance(max_error, dict):
        parts = [f"{max_error['default']:g}"] + [f"{k}={v:g}" for k, v in max_error.items() if k != "default"]
        return " ".join(parts)
    return f"{max_error:g}"


def cmd_info(args) -> int:
    from .codec import file_info
    p = _check_input(args.file, ".lsc file")
    info = file_info(p)
    rows = info["rows"]
    total = os.path.getsize(p)
    if args.json:
        import json
        print(json.dumps(info, indent=1, default=_json_default))
        return 0
    w = max([len(n) for r in rows for n in (r["name"], *r.get("tied", ()))] + [4])
    aliases = sum(len(r.get("tied", ())) for r in rows)
    print(f"{p}: {len(rows)} tensors" + (f" ({aliases} more names tied to them)" if aliases else ""))
    print(f"{'name':<{w}}  {'kind':<8}  {'shape':<16}  {'dtype':<8}  {'bits/w':>7}  {'bytes':>11}  {'share':>6}")
    order = sorted(rows, key=lambda r: -r["bytes"]) if args.sort == "bytes" else rows
    for r in order:
        print(f"{r['name']:<{w}}  {r.get('kind', ''):<8}  {fmt_shape(r['shape']):<16}  {r.get('dtype', ''):<8}  "
              f"{r['bits_per_weight']:7.3f}  {r['bytes']:>11,}  {100 * r['bytes'] / total:5.1f}%")
        for alias in r.get("tied", ()):
            print(f"{alias:<{w}}  {'tied':<8}  = {r['name']}")
    numel = sum(math.prod(r["shape"]) for r in rows)
    fnumel = sum(math.prod(r["shape"]) for r in rows if _is_float(r.get("dtype", "float32")))
    fp32 = 4 * fnumel + sum(_raw_bytes(r) for r in rows if not _is_float(r.get("dtype", "float32")))
    fp16 = 2 * fnumel + sum(_raw_bytes(r) for r in rows if not _is_float(r.get("dtype", "float32")))
    tensor_bytes = sum(r["bytes"] for r in rows)
    print(f"total: {total:,} B file ({tensor_bytes:,} B tensors + {total - tensor_bytes:,} B header/container) "
          f"for {numel:,} values, {8 * total / max(fnumel, 1):.3f} bits/weight")
    print(f"ratio: {fp32 / total:.1f}x vs fp32 ({fmt_bytes(fp32)}), {fp16 / total:.1f}x vs fp16 ({fmt_bytes(fp16)})")
    return 0


def _is_float(dtype: str) -> bool:
    return "float" in dtype


_ITEMSIZE = {"int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "uint16": 2, "uint32": 4, "uint64": 8}


def _raw_bytes(r) -> int:
    return math.prod(r["shape"]) * _ITEMSIZE.get(r.get("dtype", ""), 4)


def _json_default(o):
    try:
        import numpy as np
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


def cmd_decompress(args) -> int:
    from . import load
    src = _check_input(args.file, ".lsc file")
    out = _check_output(args.output, [src])
    fmt = out.suffix.lower()
    if fmt not in (".safetensors", ".pt", ".pth", ".bin"):
        raise CliError(f"{out}: unknown output format {fmt or '(no suffix)'}; use .safetensors, .pt or .pth")
    t0 = time.perf_counter()
    sd = load(src)
    write_checkpoint(sd, out)
    n = sum(t.numel() for t in sd.values())
    _out(args, f"wrote {out}: {len(sd)} tensors, {n:,} values, {fmt_bytes(out.stat().st_size)} "
               f"(from {fmt_bytes(src.stat().st_size)}) in {time.perf_counter() - t0:.1f} s")
    return 0


def write_checkpoint(sd: dict, out: Path) -> None:
    """Dense state_dict -> .safetensors (shared tensors cloned, as safetensors requires) or torch.save."""
    import torch
    if out.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file
        seen, dense = set(), {}
        for k, t in sd.items():
            t = t.detach().cpu().contiguous()
            key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
            if key is not None and key in seen:
                t = t.clone()
            elif key is not None:
                seen.add(key)
            dense[k] = t
        with atomic_path(out) as tmp:
            save_file(dense, tmp, metadata={"format": "pt"})  # what Hugging Face loaders check for
    else:
        with atomic_path(out) as tmp:
            torch.save({k: t.detach().cpu() for k, t in sd.items()}, tmp)


def cmd_recode(args) -> int:
    from . import recode
    from .atomic import atomic_write_bytes
    from .codec.format import format_version
    src = _check_input(args.file, ".lsc file")
    out = _check_output(args.output, [src])
    t0 = time.perf_counter()
    data = recode(src)
    atomic_write_bytes(out, data)
    old = src.stat().st_size
    _out(args, f"wrote {out}: {fmt_bytes(len(data))} (from {fmt_bytes(old)}, {100 * (len(data) / old - 1):+.1f}%), "
               f"format version {format_version(data)}, same weights, in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_plot(args) -> int:
    from .plots import heatmap_rows, plot_bits, rows_from_file
    src = _check_input(args.file, ".lsc file")
    out = _check_output(args.output, [src])
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise CliError(f"{out}: unknown image format {out.suffix or '(no suffix)'}; use .png, .svg or .pdf")
    rows = rows_from_file(src)
    plot_bits(rows, out, title=args.title or f"{src.name}: bits per frequency and bytes per tensor",
              max_heatmaps=args.max_heatmaps)
    shown, spectral = len(heatmap_rows(rows, args.max_heatmaps)), len(heatmap_rows(rows, len(rows)))
    left = f" (the largest of {spectral} spectral tensors, --max-heatmaps {args.max_heatmaps})" if shown < spectral else ""
    _out(args, f"wrote {out}: {shown} heatmaps{left}, bytes of {len(rows)} tensors")
    return 0


DEFAULT_MAX_ERROR = 0.05


# ----------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from .quantizer import MAX_BITS, MIN_BITS
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars, print only errors (and the table for info)")
    from . import __version__
    common.add_argument("--version", action="version", version=f"lsc {__version__}")
    ap = argparse.ArgumentParser(prog="lsc", parents=[common],
                                 description="Learned Spectral Compression: make PyTorch models much smaller.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", parents=[common], help="fine-tune and compress a digits CNN end to end (~1 min)",
                       description="Train a small CNN on sklearn's digits, convert it with lsc.spectral, fine-tune "
                                   "with the rate loss, save the .lsc file, reload it into a fresh model and compare.")
    d.add_argument("-o", "--output", default="demo.lsc", help="file to write (default: demo.lsc)")
    d.add_argument("--steps", type=_int_at_least(1), default=None, help="fine-tuning steps (default: the demo's tuned value)")
    d.add_argument("--rate-weight", type=_number(0.0), default=None, help="fixed weight of the rate loss (instead of a size target)")
    d.add_argument("--target-bytes", type=float, default=None,
                   help="file size to hit within 5%% (default 8000): the rate weight is steered during fine-tuning")
    d.add_argument("--epochs", type=_int_at_least(1), default=None, help="epochs of plain training before compression")
    d.add_argument("--seed", type=_int_at_least(0, 2 ** 32 - 1), default=0, help="seed of the data split, the "
                   "initialization and the batch order (0 to 2**32-1; default 0)")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("compress", parents=[common], help="post-training (data-free) compression of a checkpoint",
                       description="Compress a .pt/.pth state_dict, a .safetensors file or a Hugging Face model directory "
                                   "without data or fine-tuning: "
                                   "block DCT, per-tensor quantization step, entropy coding.")
    c.add_argument("checkpoint", help=".pt / .pth (torch.save'd state_dict), .safetensors, or a Hugging Face model directory (or the .index.json of a sharded checkpoint)")
    c.add_argument("-o", "--output", help="output .lsc file (default: CHECKPOINT with suffix .lsc)")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--bits", type=_number(MIN_BITS, MAX_BITS), help="bits per frequency for every tensor (quarter-bit steps)")
    g.add_argument("--max-error", action="append", metavar="E|GLOB=E", type=_max_error_item,
                   help="per-tensor bound on ||W-W^||/||W||, bits found by binary search (default "
                        f"{DEFAULT_MAX_ERROR}); repeat as GLOB=E to give matching tensors their own bound")
    g.add_argument("--bounds", metavar="JSON",
                   help="per-tensor bounds from a JSON object {name: E, ..., \"default\": E}, e.g. saved from "
                        "lsc.allocate_error_bounds (calibrated on your data in Python)")
    c.add_argument("--hessians", metavar="SAFETENSORS",
                   help="X^T X of each layer's inputs, {weight name: tensor} saved from lsc.collect_hessians: "
                        "quantize those layers with error feedback (smaller output error, same size); a vector "
                        "of row lookup counts for an embedding table spends its bits on the rows that are read")
    c.add_argument("--row-prior", type=_number(0.0, above=True), default=1.0, metavar="N",
                   help="lookups credited to every row of an embedding table given as counts in --hessians "
                        "(default 1); larger keeps rarely read rows closer, for a larger file")
    c.add_argument("--max-error-1d", type=_number(0.0), default=None, metavar="E1",
                   help="bound for biases and norm scales (1-D tensors; default: their --max-error bound / 20); "
                        "a bound --bounds gives a tensor by its exact name is used as given")
    c.add_argument("--block-size", type=_int_at_least(1), default=8, help="DCT block edge per dimension (default 8)")
    c.add_argument("--exclude", action="append", metavar="GLOB", help="keep matching tensors uncompressed (repeatable)")
    c.add_argument("--min-bits", type=_number(MIN_BITS, MAX_BITS), default=None,
                   help="search range low end of --max-error (default -4)")
    c.add_argument("--max-bits", type=_number(MIN_BITS, MAX_BITS), default=None,
                   help="search range high end of --max-error (default 16)")
    c.set_defaults(func=cmd_compress, usage_error=c.error)

    i = sub.add_parser("info", parents=[common], help="per-tensor table of a .lsc file",
                       description="Show every tensor of a .lsc file: shape, bits per weight, bytes, share of the file; "
                                   "totals and the ratio to fp32 and fp16.")
    i.add_argument("file")
    i.add_argument("--sort", choices=["file", "bytes"], default="file", help="row order (default: as in the file)")
    i.add_argument("--json", action="store_true", help="print the raw file_info as JSON")
    i.set_defaults(func=cmd_info)

    x = sub.add_parser("decompress", parents=[common], help="write a dense .safetensors / .pt checkpoint",
                       description="Decode a .lsc file to a dense state_dict for any runtime.")
    x.add_argument("file")
    x.add_argument("-o", "--output", required=True, help="out.safetensors or out.pt")
    x.set_defaults(func=cmd_decompress)

    r = sub.add_parser("recode", parents=[common], help="re-encode a .lsc file with this version's entropy coder",
                       description="Re-encode every spectral tensor of a .lsc file with this lsc's entropy coder (e.g. "
                                   "an lsc 0.2 file gets the row classes of format version 3 where they pay). The "
                                   "integers are kept: the new file decodes to bit-identical weights.")
    r.add_argument("file")
    r.add_argument("-o", "--output", required=True, help="output .lsc file")
    r.set_defaults(func=cmd_recode)

    p = sub.add_parser("plot", parents=[common], help="bits-per-frequency heatmaps and bytes per layer",
                       description="Plot the bit allocation of every tensor (one heatmap per tensor, low frequencies "
                                   "top left) and the bytes each tensor takes.")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True, help="image file (.png, .svg, .pdf)")
    p.add_argument("--title", default=None)
    p.add_argument("--max-heatmaps", type=_int_at_least(0), default=24,
                   help="heatmaps for at most this many (largest) tensors (default 24; 0: only the bytes chart)")
    p.set_defaults(func=cmd_plot)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    args.quiet = getattr(args, "quiet", False)
    if not getattr(args, "command", None):
        ap.print_help(sys.stderr)
        return EXIT_USAGE
    from .errors import LscError
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("lsc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`lsc info f.lsc | head`): stop quietly, as Unix tools do; point stdout at
        # /dev/null so the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (CliError, LscError) as e:
        msg = str(e)
        where = getattr(args, "file", None) or getattr(args, "checkpoint", None)
        if where and not isinstance(e, CliError) and not msg.startswith(str(where)):
            msg = f"{where}: {msg}"
        return _fail(args, e, msg)
    except OSError as e:  # a missing, unwritable or read-only output, named as the user gave it
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return _fail(args, e, f"{where}{e.strerror or e}")
    except MemoryError as e:
        return _fail(args, e, "out of memory")
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        msg = str(e).strip().splitlines()
        return _fail(args, e, f"unexpected {type(e).__name__}: {msg[0] if msg else ''} (run with --verbose for details)")
    finally:
        warnings.showwarning = shown


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line in the CLI's own voice (not a source location inside lsc or runpy)."""
    print(f"lsc: warning: {message}", file=sys.stderr if file is None else file)


def _fail(args, exc: BaseException, message: str) -> int:
    if args.verbose:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"lsc: error: {message}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
