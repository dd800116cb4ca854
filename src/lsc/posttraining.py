"""Post-training, data-free compression: no fine-tuning, no training data.

A finished checkpoint goes through the same spectral transform, quantizer and
entropy coder as a fine-tuned model; only the bit allocation is chosen by a
rule instead of being learned:

* ``bits=B``: every frequency of every tensor gets ``B`` bits (a step of
  ``2^-B`` standard deviations of the tensor);
* ``max_error=E``: per tensor, the fewest bits (on the codec's quarter-bit
  grid) whose reconstruction keeps ``||W - W_hat|| / ||W|| <= E``, found by
  binary search as in the post-training SVD write-up (there the rank, here the
  bits: the error is monotone in both). Each candidate is measured through the
  exact decode path (:func:`lsc.reconstruct.reconstruct`), so the error
  reported is the error of the file. A single step for all frequencies of a
  tensor is also the allocation that minimizes the coded size for a given
  squared error (equal distortion per coefficient, high-rate theory).

The allocation is written into the shared quantization network through its
per-tensor offsets (the MLP's last layer is zero), so the result is an ordinary
spectral model: ``lsc.save``, ``lsc.report`` and fine-tuning all work on it.

A bare state_dict has no architecture, so it is wrapped in a container module
whose nested submodules reproduce the dotted key names; the file therefore
keeps the checkpoint's own keys and ``lsc.load(path)`` returns a state_dict
that loads into the original model.
"""
from __future__ import annotations

import functools
import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .atomic import check_writable
from .convert import _per_tensor, _unmatched_keys, names_by_tensor, selected_parameters, spectral
from .errors import LscError, outside_stacklevel
from .feedback import check_positive_definite, feedback_quantize, output_error, supports_feedback
from .precision import full_precision
from .quantizer import EXPONENT_RESOLUTION, MAX_BITS, MIN_BITS, integer_coefficients
from .reconstruct import reconstruct
from .state import get_state
from .wrappers import unwrap_for_conversion

__all__ = ["compress_posttraining", "PostTrainingResult", "load_checkpoint", "module_from_state_dict",
           "relative_error", "SUPPORTED_FLOAT_DTYPES"]

SUPPORTED_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights", "params")


# ----------------------------------------------------------------- checkpoints

def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_checkpoint(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``), or from a
    Hugging Face checkpoint: its directory, or the ``*.index.json`` of a sharded one.

    Common wrappers (``{"state_dict": {...}}``, ``{"model": {...}}``) are unwrapped.
    Raises :class:`LscError` with a one-line reason for a missing or unreadable
    file, or one that does not hold a dict of tensors.
    """
    p = Path(path)
    if not p.exists():
        raise LscError(f"{p}: no such file")
    if p.is_dir():
        p = _checkpoint_in_directory(p)
    if _is_index(p):
        return _load_sharded(p)
    return _load_one(p)


def _is_index(p: Path) -> bool:
    return p.name.lower().endswith(".index.json")


def checkpoint_files(path: Union[str, os.PathLike]) -> list[Path]:
    """Every file :func:`load_checkpoint` reads for ``path``: the file itself, a directory's checkpoint, an
    index and each of its shards; so that a writer can refuse to overwrite any of them before the work starts.

    A missing file or a bad index yields what can be named now; :func:`load_checkpoint` reports the problem.
    """
    p = Path(path)
    if p.is_dir():
        p = _checkpoint_in_directory(p)
    if not _is_index(p):
        return [p]
    try:
        shards = _shard_names(_weight_map(p))
    except LscError:
        return [p]
    return [p, *(p.parent / s for s in shards if _inside(s))]


# What Hugging Face's save_pretrained writes, in the order from_pretrained prefers them.
_HF_CHECKPOINT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                        "pytorch_model.bin.index.json")


def _checkpoint_in_directory(d: Path) -> Path:
    """The checkpoint file of a Hugging Face model directory."""
    for name in _HF_CHECKPOINT_NAMES:
        if (d / name).is_file():
            return d / name
    raise LscError(f"{d}: is a directory without a checkpoint (looked for {', '.join(_HF_CHECKPOINT_NAMES)}); "
                   "give the checkpoint file (.pt, .pth, .safetensors)")


def _weight_map(index: Path) -> dict[str, str]:
    """``{tensor name: shard file name}`` of a sharded checkpoint's index."""
    import json
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not an object of shard file names")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise LscError(f"{index}: not a sharded-checkpoint index ({_one_line(e)})") from None
    return weight_map


def _shard_names(weight_map: dict[str, str]) -> list[str]:
    """The shard files an index names, in file order of first appearance, each once."""
    return list(dict.fromkeys(weight_map.values()))


def _inside(shard: str) -> bool:
    """Whether a shard name stays in the index's directory (no absolute path, no ``..``)."""
    return not (Path(shard).is_absolute() or ".." in Path(shard).parts)


def _load_sharded(index: Path) -> dict[str, torch.Tensor]:
    """The tensors of a sharded checkpoint, merged: every shard its index names, each name found once."""
    weight_map = _weight_map(index)
    merged: dict[str, torch.Tensor] = {}
    for shard in _shard_names(weight_map):
        if not _inside(shard):
            raise LscError(f"{index}: shard {shard!r} lies outside the checkpoint's directory")
        for name, t in _load_one(index.parent / shard).items():
            if name in merged:
                raise LscError(f"{index}: tensor {name!r} is in more than one shard")
            merged[name] = t
    missing = [n for n in weight_map if n not in merged]
    if missing:
        raise LscError(f"{index}: {len(missing)} tensor(s) the index lists are in no shard: {', '.join(missing[:3])}")
    return merged


def _load_one(p: Path) -> dict[str, torch.Tensor]:
    """The state_dict in one checkpoint file."""
    if not p.exists():
        raise LscError(f"{p}: no such file")
    if p.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
            obj = load_file(str(p))
        except Exception as e:  # safetensors raises its own error types
            raise LscError(f"{p}: not a valid safetensors file ({_one_line(e)})") from e
    else:
        with open(p, "rb") as f:
            head = f.read(8)
        if head[:4] == b"\x89LSC":
            raise LscError(f"{p}: is an .lsc file, not a checkpoint (use `lsc decompress` or `lsc info`)")
        import zipfile
        if not (zipfile.is_zipfile(p) or head[:1] == b"\x80"):
            raise LscError(f"{p}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle; "
                           "expected .pt, .pth or .safetensors)")
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:
            if "Weights only load failed" in str(e):
                raise LscError(f"{p}: holds pickled Python objects, not only tensors (a whole model?); lsc reads "
                               "checkpoints with weights_only=True: re-save with torch.save(model.state_dict(), path)") from e
            raise LscError(f"{p}: not a PyTorch checkpoint that loads with weights_only=True ({_one_line(e)})") from e
    if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        for key in _WRAPPER_KEYS:
            if _is_tensor_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_tensor_dict(obj):
        kind = type(obj).__name__
        raise LscError(f"{p}: does not contain a state_dict (a dict of name -> tensor); found {kind}")
    return dict(obj)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200]}" if msg else type(e).__name__


def _check_dtypes(state_dict: Mapping[str, torch.Tensor]) -> None:
    for name, t in state_dict.items():
        if t.is_floating_point() and t.dtype not in SUPPORTED_FLOAT_DTYPES:
            raise LscError(f"{name}: unsupported dtype {str(t.dtype).replace('torch.', '')}; lsc compresses "
                           "float16, bfloat16, float32 and float64 tensors")
        if t.is_complex() or t.is_quantized or t.layout != torch.strided:
            raise LscError(f"{name}: unsupported tensor ({str(t.dtype).replace('torch.', '')}, {t.layout}); "
                           "lsc handles dense real floating-point, integer and bool tensors")


class CheckpointModule(nn.Module):
    """A module that only holds tensors at the dotted names of a state_dict (no forward)."""

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise LscError("a checkpoint container has no forward; load its state_dict into the real model")


# A state dict does not say which tensors were buffers; these last key components are buffers of
# PyTorch's and Hugging Face's modules, stored exactly rather than compressed as weights.
# (The old spectral_norm's weight_v is not among them: the old weight_norm's weight_v is a weight.)
CHECKPOINT_BUFFER_NAMES = frozenset({"running_mean", "running_var", "inv_freq", "masked_bias", "_u", "_v", "weight_u"})
CHECKPOINT_BUFFER_SUFFIXES = ("_mask",)  # torch.nn.utils.prune's weight_mask, bias_mask


def is_checkpoint_buffer(leaf: str) -> bool:
    """Whether a checkpoint key ending in ``leaf`` is a buffer by name (see :data:`CHECKPOINT_BUFFER_NAMES`)."""
    return leaf in CHECKPOINT_BUFFER_NAMES or leaf.endswith(CHECKPOINT_BUFFER_SUFFIXES)


def view_key(t: torch.Tensor) -> tuple | None:
    """What makes two checkpoint tensors one tied tensor: the same view of the same storage (``torch.load`` gives
    a tied embedding and LM head as two tensor objects over one storage); None for an empty tensor."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
        if t.numel() else None


def module_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Container whose ``state_dict()`` has exactly the keys of ``state_dict``.

    Floating-point tensors become parameters (so ``lsc.spectral`` compresses
    them), everything else buffers (stored as is), and so do the float tensors that
    are buffers by name (:data:`CHECKPOINT_BUFFER_NAMES`: BatchNorm statistics, whose
    lossy variance could decode below zero, rotary frequencies, pruning masks,
    spectral_norm's vectors). Keys that share storage (tied weights) become one
    shared parameter, compressed once.
    """
    _check_dtypes(state_dict)
    root = CheckpointModule()
    shared: dict[tuple, nn.Parameter] = {}
    for name, t in state_dict.items():
        parts = name.split(".")
        if any(not part for part in parts):
            raise LscError(f"{name!r}: checkpoint key has an empty path component; cannot be stored by name")
        mod = root
        try:
            for part in parts[:-1]:
                child = mod._modules.get(part)
                if child is None:
                    child = CheckpointModule()
                    mod.add_module(part, child)
                mod = child
            leaf = parts[-1]
            if t.is_floating_point() and not is_checkpoint_buffer(leaf):
                key = view_key(t)
                param = shared.get(key) if key is not None else None
                if param is None:
                    param = nn.Parameter(t.detach(), requires_grad=False)
                    if key is not None:
                        shared[key] = param
                mod.register_parameter(leaf, param)
            else:
                mod.register_buffer(leaf, t.detach())
        except (KeyError, TypeError, AttributeError) as e:
            raise LscError(f"{name!r}: checkpoint key cannot be represented as a module path ({_one_line(e)})") from e
    return root


# ----------------------------------------------------------------- the search

def _check_hessians(hessians, model: nn.Module, compressed: Mapping[str, torch.Tensor]) -> dict:
    """``hessians`` as a dict, every entry naming a tensor of the model and shaped (fan_in, fan_in), or, for a
    matrix whose rows are looked up (an embedding table), a vector of non-negative row counts (rows,)."""
    if hessians is None:
        return {}
    if not isinstance(hessians, Mapping):
        raise LscError(f"hessians must be a dict {{name: X^T X}} (from lsc.collect_hessians), got {type(hessians).__name__}")
    known = {n for n, _ in model.named_parameters()}
    for name, h in hessians.items():
        if name not in known:
            raise LscError(f"hessians: the model has no parameter named {name!r}")
        if not isinstance(h, torch.Tensor):
            raise LscError(f"hessians[{name!r}] must be a tensor, got {type(h).__name__}")
        w = compressed.get(name)
        if w is not None and h.dim() == 1:
            if w.dim() != 2 or tuple(h.shape) != (w.shape[0],):
                raise LscError(f"hessians[{name!r}] has shape {tuple(h.shape)}: a vector of row counts needs a matrix "
                               f"and one count per row, but the tensor has shape {tuple(w.shape)}")
            if not bool((torch.isfinite(h) & (h >= 0)).all()):
                raise LscError(f"hessians[{name!r}] must hold finite counts >= 0 (how often each row was looked up)")
        elif w is not None and w.dim() >= 2:
            fan_in = math.prod(w.shape[1:])
            if tuple(h.shape) != (fan_in, fan_in):
                raise LscError(f"hessians[{name!r}] has shape {tuple(h.shape)}; a {tuple(w.shape)} weight needs "
                               f"({fan_in}, {fan_in}) (X^T X of its inputs) or ({w.shape[0]},) (row counts)")
            if not bool(torch.isfinite(h).all()):
                raise LscError(f"hessians[{name!r}] contains NaN or Inf")
    return dict(hessians)


def _with_row_blocks(block_size, row_weighted: set):
    """Blocks of one row (``1 x block_size**2``) for the tensors weighted by rows, so that a block's rows all
    weigh the same; a ``block_size`` given per dim or per tensor is the user's choice and is kept."""
    if not row_weighted or not isinstance(block_size, int):
        return block_size
    return {**{name: (1, block_size ** 2) for name in row_weighted}, "default": block_size}  # exact names win


def _store_symbols(entry, par, q: torch.Tensor, exponent: torch.Tensor) -> None:
    """Make ``q`` (num_blocks, P) the stored symbols: coefficients = q * step, which round back to q exactly."""
    step = par.step(exponent)
    coeffs_param = entry.coefficients
    coeffs_param.copy_((q.to(step.dtype).reshape(par.layout.coeff_shape) * step).to(coeffs_param.dtype))
    q2, _ = par.integer_state(coeffs_param)
    if not torch.equal(q2.reshape(q.shape), q):  # pragma: no cover - guards the exactness argument
        raise LscError(f"{entry.name}: internal error storing the chosen coefficients")


def relative_error(w_hat: torch.Tensor, w: torch.Tensor) -> float:
    """``||w_hat - w|| / ||w||`` in float64 (0 for two zero tensors, inf for any change of a zero tensor)."""
    w = w.detach().to(torch.float64)
    diff = float(torch.linalg.vector_norm(w_hat.detach().to(torch.float64) - w))
    ref = float(torch.linalg.vector_norm(w))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


VECTOR_ERROR_SCALE = 1 / 20  # default bound of 0-D/1-D tensors relative to max_error
RDO_LAMBDA = 2 * math.log(2) / 12  # -dD/dR of an entropy-coded uniform quantizer, D in step^2 units


ROW_PRIOR = 1.0  # default add-one smoothing: a row never looked up in calibration still weighs one lookup


def _rdo_round(x: torch.Tensor, groups: torch.Tensor, rdo: float, iters: int = 2,
               weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rate-distortion optimized rounding of ``x`` (num_blocks, P), in units of the step.

    Starts from round-to-nearest; then, with code lengths from each coding group's
    histogram, moves a symbol one step toward zero when the bits saved times
    ``rdo * RDO_LAMBDA`` exceed the squared error it adds (a dead zone that adapts
    to the distribution, as RDOQ in video coders). ``rdo=0`` is plain rounding.
    ``weights`` (num_blocks,), mean about 1: each block's squared error counts that
    many times, and a symbol may also drop straight to zero, so blocks that hardly
    matter cost almost nothing.
    """
    q = torch.round(x)
    if rdo <= 0 or q.numel() == 0:
        return q.to(torch.int64)
    lam = rdo * RDO_LAMBDA
    g = groups.to(torch.int64).expand_as(q)
    w = None if weights is None else weights.to(x.dtype).reshape(-1, 1)
    for _ in range(iters):
        qi = q.to(torch.int64)
        lo = min(int(qi.min()), 0)
        k = max(int(qi.max()), 0) - lo + 1
        ng = int(groups.max()) + 1
        if k * ng > 1 << 26:  # huge alphabets: leave as is
            break
        counts = torch.bincount((g * k + (qi - lo)).reshape(-1), minlength=ng * k).to(torch.float64).reshape(ng, k)
        n = counts.sum(1, keepdim=True)
        length = -torch.log2((counts + 0.5) / (n + 0.5 * k))  # bits of each symbol in each group
        cand = qi - torch.sign(qi)
        if w is None:
            gain = length[g, qi - lo] - length[g, cand - lo]
            extra = (x - cand) ** 2 - (x - qi) ** 2
            move = (qi != 0) & (extra < lam * gain)
            q = torch.where(move, cand, qi).to(x.dtype)
            continue
        best, cost = qi, w * (x - qi) ** 2 + lam * length[g, qi - lo]
        for c in (cand, torch.zeros_like(qi)):
            c_cost = w * (x - c) ** 2 + lam * length[g, c - lo]
            better = c_cost < cost
            best, cost = torch.where(better, c, best), torch.where(better, c_cost, cost)
        q = best.to(x.dtype)
    return q.to(torch.int64)


def _row_block_weights(counts: torch.Tensor, layout, prior: float) -> torch.Tensor:
    """Distortion weight per block (num_blocks,) from per-row lookup counts: the mean of its rows'
    ``count + prior``, scaled so that an average row weighs 1 (padding rows weigh 0)."""
    w = counts.to(torch.float64) + prior
    w = w / w.mean()
    padded = torch.zeros(layout.grid[0] * layout.block_shape[0], dtype=torch.float64, device=w.device)
    padded[:w.numel()] = w
    per_block_row = padded.reshape(layout.grid[0], layout.block_shape[0]).mean(1)
    return per_block_row.repeat_interleave(math.prod(layout.grid[1:]))


def _row_output_error(delta: torch.Tensor, counts: torch.Tensor, prior: float) -> float:
    """``sum_r (count_r + prior) ||delta_r||^2``: the summed squared error of the rows as they are looked up."""
    d = delta.detach().to(torch.float64).reshape(delta.shape[0], -1)
    return float((d.pow(2).sum(1) * (counts.to(device=d.device, dtype=torch.float64) + prior)).sum())


def _quantize_at(par, coeffs: torch.Tensor, exponent: int, rdo: float,
                 weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer coefficients (num_blocks, P), exponent vector) of a tensor at one step exponent
    (``rdo``, ``weights``: as in :func:`_rdo_round`; weighted rounding takes a third pass)."""
    e = torch.full((par.layout.block_numel,), int(exponent), dtype=torch.int64, device=coeffs.device)
    step = par.step(e)
    c = coeffs.to(par.mean.dtype)
    if rdo > 0:
        x = (c / step).reshape(par.layout.num_blocks, par.layout.block_numel)
        q = _rdo_round(x, par.groups, rdo, iters=2 if weights is None else 3, weights=weights)
    else:
        q = integer_coefficients(c, step).reshape(par.layout.num_blocks, par.layout.block_numel)
    return q, e


def _error_at(par, coeffs: torch.Tensor, weight: torch.Tensor, exponent: int, rdo: float = 0.0) -> float:
    q, e = _quantize_at(par, coeffs, exponent, rdo)
    w_hat = reconstruct(q, e, par.layout, par.mean, par.std, par.orig_dtype, par.transform)
    return relative_error(w_hat, weight)


def _search_exponent(err, lo: int, hi: int, max_error: float, guess: Optional[int] = None) -> tuple[int, float]:
    """Smallest exponent in [lo, hi] with err(e) <= max_error (error assumed non-increasing in e).

    With a ``guess``, a bracket [guess - 2, guess + 2] is checked first and widened
    by doubling until it holds the answer, then bisected: about 4 evaluations
    instead of 8 when the guess is good, never fewer guarantees than plain bisection.
    """
    cache: dict[int, float] = {}

    def f(e):
        if e not in cache:
            cache[e] = err(e)
        return cache[e]

    if guess is not None and lo < guess < hi:
        a, b, w = max(lo, guess - 2), min(hi, guess + 2), 2
        while a > lo and f(a) <= max_error:
            w *= 2
            a = max(lo, guess - w)
        while b < hi and f(b) > max_error:
            w *= 2
            b = min(hi, guess + w)
        lo, hi = a, b
    if f(hi) > max_error:
        return hi, f(hi)  # the bound cannot be met: the finest allowed step
    if f(lo) <= max_error:
        return lo, f(lo)
    while hi - lo > 1:  # invariant: f(lo) > max_error >= f(hi)
        mid = (lo + hi) // 2
        if f(mid) <= max_error:
            hi = mid
        else:
            lo = mid
    return hi, f(hi)


def _fill_slack(err, err0: float, bound: float, hi: float = 8.0, iters: int = 5) -> float:
    """Largest RDO strength in [0, hi] (bisection, ``iters`` steps) with err(strength) <= bound; 0 if none."""
    if not (err0 < bound):
        return 0.0
    if err(hi) <= bound:
        return hi
    lo_r, hi_r = 0.0, hi
    for _ in range(iters):
        mid = 0.5 * (lo_r + hi_r)
        if err(mid) <= bound:
            lo_r = mid
        else:
            hi_r = mid
    return lo_r


def _guess_exponent(par, weight: torch.Tensor, max_error: float) -> Optional[int]:
    """High-rate guess: uniform rounding noise step^2/12 per coefficient, in units of the tensor's std."""
    n = weight.numel()
    ref = float(torch.linalg.vector_norm(weight.detach().to(torch.float64)))
    std = float(par.std)
    if n == 0 or ref == 0.0 or std <= 0 or max_error <= 0:
        return None
    step = max_error * ref * math.sqrt(12.0 / n) / std
    return int(round(-EXPONENT_RESOLUTION * math.log2(step)))


def _error_bound(max_error, name: str, shape: tuple[int, ...], owners=None) -> float:
    """Resolve ``max_error`` (number, ``{glob: E, "default": E}`` or ``callable(name, shape)``) for one tensor;
    ``owners``: its ``(name, module)`` pairs (a tied tensor has several), as ``lsc.spectral``'s options take them."""
    value = _per_tensor(max_error, name, shape, owners, "max_error")
    if value is None and isinstance(max_error, dict):
        raise LscError(f"{name}: max_error has no bound for it (no key matches and no 'default'); "
                       f"keys: {sorted(max_error)[:5]}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise LscError(f"{name}: max_error must be a number, got {value!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise LscError(f"{name}: max_error={value} must be a finite number >= 0")
    return value


def _check_bound_names(model: nn.Module, max_error) -> None:
    """A ``max_error`` dict whose keys name no tensor of the model (bounds calibrated under other names, e.g.
    a ``bert.`` prefix) would silently leave every tensor at the default: refused when no key matches, and
    the keys that match nothing are named in a warning otherwise."""
    if not isinstance(max_error, Mapping):
        return
    keys = [k for k in max_error if k != "default"]
    by_name, by_type = _unmatched_keys(model, max_error={k: max_error[k] for k in keys})
    unmatched = by_name + by_type
    if keys and len(unmatched) == len(keys):
        some = sorted(n for n, _ in model.named_parameters())[:3]
        raise LscError(f"max_error: none of its {len(keys)} names matches a tensor of the model (first: {keys[0]!r}; "
                       f"the model's names look like {some}); were the bounds made for a model with other names?")
    if unmatched:
        warnings.warn(f"lsc.compress_posttraining: no tensor matches {', '.join(unmatched[:5])}"
                      + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
                      + "; those bounds are not used", stacklevel=outside_stacklevel())


def _is_named(max_error, names) -> bool:
    """Whether a bound dict names the tensor (any of its ``names``) exactly (a ``--bounds`` file, a calibrated
    allocation). A glob is written for a group, matrices first: ``embeddings.*=0.08`` must not loosen the
    group's biases and norm scales 20-fold (MiniLM's held-out cosine fell from 0.990 to 0.928 when it did)."""
    return isinstance(max_error, Mapping) and any(n != "default" and n in max_error for n in names)


def _tensor_bound(max_error, name: str, shape: tuple[int, ...], max_error_1d: Optional[float], owners=None) -> float:
    """A tensor's bound; for 0-D/1-D tensors (biases, norm scales: a tiny share of the file, often sensitive)
    it is tightened (``/ 20``, or ``max_error_1d``) unless a bound dict names the tensor exactly."""
    bound = _error_bound(max_error, name, shape, owners)
    if len(shape) < 2 and not _is_named(max_error, [n for n, _ in owners or [(name, None)]]):
        bound = bound * VECTOR_ERROR_SCALE if max_error_1d is None else float(max_error_1d)
    return bound


def _exponent_range(min_bits: float, max_bits: float) -> tuple[int, int]:
    """The step exponents of the quarter-bit grid that lie in [min_bits, max_bits]: none is an error, not a
    search that would answer outside the range."""
    lo, hi = math.ceil(min_bits * EXPONENT_RESOLUTION), math.floor(max_bits * EXPONENT_RESOLUTION)
    if lo > hi:
        raise LscError(f"no quarter-bit step lies in [min_bits, max_bits] = [{min_bits:g}, {max_bits:g}]: bits come "
                       f"in steps of {1 / EXPONENT_RESOLUTION:g}; widen the range")
    return lo, hi


def _check_positive_definite(hessians: Mapping[str, torch.Tensor], chosen, damp: float) -> None:
    """Every (fan_in, fan_in) Hessian the feedback will factor, checked before the model is converted."""
    for name, _, _, _, ties in chosen:
        h = hessians.get(name)
        if h is not None and h.dim() == 2 and not ties:  # tied tensors are rounded plainly: their Hessian is unused
            check_positive_definite(name, h, damp)


class _Undo:
    """What :func:`lsc.spectral` changes in a model, recorded before it runs, so that a call that fails after the
    conversion can hand the caller's model back as it was: each parameter (the same object, its own storage) in
    its modules, no parametrization, no lsc state, no hooks, each module in its own train/eval mode."""

    def __init__(self, model: nn.Module, chosen):
        self.model, self.chosen = model, [(p, p.detach(), [(m, a), *((tm, ta) for _, tm, ta in ties)])
                                          for _, m, a, p, ties in chosen]
        self.hooks = (set(model._state_dict_hooks), set(model._load_state_dict_pre_hooks))
        self.attrs = set(vars(model))
        self.modes = [(m, m.training) for m in model.modules()]

    @torch.no_grad()
    def __call__(self) -> None:
        from torch.nn.utils import parametrize
        from .dense import unparametrize
        for p, storage, places in self.chosen:
            p.set_(storage)  # parametrize moved the coefficients into the Parameter object itself
            for module, attr in places:
                if parametrize.is_parametrized(module, attr):
                    unparametrize(module, attr, p)
        for hooks, before in zip((self.model._state_dict_hooks, self.model._load_state_dict_pre_hooks), self.hooks):
            for key in set(hooks) - before:
                del hooks[key]
        for attr in set(vars(self.model)) - self.attrs:
            del self.model.__dict__[attr]
        for module, training in self.modes:
            module.training = training


@dataclass
class PostTrainingResult:
    """What :func:`compress_posttraining` did: the spectral model and the chosen bits per tensor."""

    model: nn.Module
    # name, shape, numel, bits, rel_error, bound, tied; with hessians also feedback, row_weighted,
    # output_error_ratio (see feedback_ratios)
    tensors: list[dict] = field(default_factory=list)
    path: Optional[str] = None
    file_bytes: Optional[int] = None
    seconds: float = 0.0

    @property
    def numel(self) -> int:
        return sum(t["numel"] for t in self.tensors)

    @property
    def mean_bits(self) -> float:
        """Bits per frequency averaged over weights (before entropy coding)."""
        return sum(t["bits"] * t["numel"] for t in self.tensors) / max(self.numel, 1)

    @property
    def max_rel_error(self) -> float:
        return max((t["rel_error"] for t in self.tensors), default=0.0)

    @property
    def feedback_ratios(self) -> dict[str, float]:
        """``{name: output error with error feedback / with plain rounding}`` of the tensors quantized with
        feedback: pass to :func:`lsc.allocate_error_bounds` (``feedback=``) to re-allocate for it."""
        return {t["name"]: t["output_error_ratio"] for t in self.tensors if t.get("output_error_ratio") is not None}


def _progress(iterable, total, desc, progress, unit="tensor"):
    if progress is False:
        return iterable
    from tqdm.auto import tqdm
    disable = None if progress is None else False  # None: tqdm hides itself when not a TTY
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=False, dynamic_ncols=True)


@full_precision
def compress_posttraining(model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]], bits: Optional[float] = None,
                          max_error: Optional[float] = None, *, path: Union[str, os.PathLike, None] = None,
                          block_size=8, include=None, exclude=None, min_bits: float = -4.0,
                          max_bits: float = 16.0, rdo: Union[float, str] = 0.0,
                          max_error_1d: Optional[float] = None, hessians: Optional[Mapping[str, torch.Tensor]] = None,
                          damp: float = 0.01, row_prior: float = ROW_PRIOR,
                          progress: Optional[bool] = None) -> PostTrainingResult:
    """Compress a trained model or state_dict without data or fine-tuning.

    Args:
        model_or_state_dict: an ``nn.Module`` (reparameterized in place, as by
            :func:`lsc.spectral`; a call that raises leaves it as it was) or a state_dict
            (wrapped in a container module that keeps its keys; the input tensors are not modified).
        bits: bits per frequency for every tensor (quarter-bit grid), or
        max_error: largest relative reconstruction error ``||W - W_hat|| / ||W||``
            allowed per tensor; the bits of each tensor are found by binary search.
            A number, ``{glob: E, "default": E}`` or ``callable(name, shape) -> E``.
            Exactly one of ``bits`` and ``max_error`` must be given.
        path: if given, the result is written there with :func:`lsc.save` (a path or a binary file object).
        block_size, include, exclude: as in :func:`lsc.spectral` (excluded tensors are stored raw).
        max_error_1d: bound for 0-D and 1-D tensors (biases, norm scales, which
            cost little and shift every output); default: their bound (the default, a glob's,
            a callable's value) ``/ 20``. A bound a dict gives the tensor by its exact name
            is used as given.
        hessians: ``{name: X^T X}`` of each layer's inputs on calibration data (from
            :func:`lsc.collect_hessians`). Those tensors are quantized with error feedback
            (GPTQ-style, see :mod:`lsc.feedback`) at the step their bound or ``bits`` chose:
            about the same size, a smaller output error on inputs like the calibration
            data, a larger weight error (``rel_error`` reports it; the bound then holds
            for the plain rounding that chose the step). Rows record the ratio of the two
            output errors, which :func:`lsc.allocate_error_bounds` can use (``feedback=``).
            Tied tensors, and conv kernels larger than a block, are rounded as usual.
            An embedding table's entry is a vector of lookup counts per row (what
            ``collect_hessians`` records for ``nn.Embedding``): its blocks become single rows
            (``1 x block_size**2``, unless ``block_size`` is given per dim or per tensor) and
            its symbols are chosen by rate-distortion optimized rounding with each row's
            error weighted by ``count + row_prior``, so rows that are rarely or never read cost
            almost nothing; its ratio is that of the count-weighted errors.
        row_prior: lookups every row of such a table is credited with on top of its count
            (default 1, add-one smoothing). Larger values protect rows the calibration data
            rarely or never read (the worst held-out input) for a larger file. On MiniLM, 2 gave
            a passing file 4% larger, whose worst held-out cosine was 0.955 instead of 0.90.
        damp: ridge added to each Hessian, as a fraction of its mean diagonal (GPTQ's 1%). A Hessian
            that is not positive definite even then is refused before the model is touched.
        min_bits, max_bits: search range of ``max_error`` on the quarter-bit grid (a
            tensor that cannot meet the bound gets the highest step in range; a range
            that holds no quarter-bit step is an error).
        rdo: strength of rate-distortion optimized rounding (0: round to nearest;
            1: the high-rate Lagrangian). It lowers the coded size at equal error;
            the error bound always holds on the stored, rounded symbols. ``"auto"``:
            with ``max_error``, the strongest setting (up to 8) that keeps each
            tensor under its bound (turns the slack of the quarter-bit grid into a
            ~2% smaller file); with ``bits``, 1. Default 0: the dead zone shrinks
            weights toward zero, a biased error that measured worse on MiniLM's
            embeddings at equal size than plain rounding.
        progress: tqdm bar over tensors; ``None`` shows it only on a terminal.

    Returns:
        :class:`PostTrainingResult` with ``.model`` (the spectral model, eval mode),
        ``.tensors`` (name, shape, numel, bits, rel_error per compressed tensor) and,
        when ``path`` was given, ``.path`` and ``.file_bytes``.
    """
    t0 = time.perf_counter()
    if (bits is None) == (max_error is None):
        raise LscError("give exactly one of bits= (fixed bits per frequency) or max_error= (per-tensor error bound)")
    if bits is not None and not (MIN_BITS <= float(bits) <= MAX_BITS):
        raise LscError(f"bits={bits} is outside the supported range [{MIN_BITS:g}, {MAX_BITS:g}]")
    if max_error is not None and not (isinstance(max_error, Mapping) or callable(max_error)):
        _error_bound(max_error, "max_error", ())
    if max_error_1d is not None:
        _error_bound(max_error_1d, "max_error_1d", ())
    if not (rdo == "auto" or (isinstance(rdo, (int, float)) and 0 <= float(rdo) < math.inf)):
        raise LscError(f"rdo={rdo!r} must be 'auto' or a number >= 0")
    if hessians is not None and rdo != 0.0:
        raise LscError("rdo and hessians do not combine: error feedback already chooses each symbol; use one of them")
    if not (isinstance(damp, (int, float)) and 0 <= damp < math.inf):
        raise LscError(f"damp={damp!r} must be a number >= 0")
    if not (isinstance(row_prior, (int, float)) and 0 < row_prior < math.inf):
        raise LscError(f"row_prior={row_prior!r} must be a number > 0 (lookups credited to every row of an embedding table)")
    if not (MIN_BITS <= min_bits <= max_bits <= MAX_BITS):
        raise LscError(f"need {MIN_BITS:g} <= min_bits <= max_bits <= {MAX_BITS:g}, got {min_bits}, {max_bits}")
    lo_e, hi_e = _exponent_range(min_bits, max_bits) if max_error is not None else (None, None)
    if isinstance(path, (str, os.PathLike)):
        check_writable(path)  # before the model is converted in place, not after the work

    if isinstance(model_or_state_dict, nn.Module):
        model = unwrap_for_conversion(model_or_state_dict, "lsc.compress_posttraining")
        _check_dtypes(dict(model.state_dict()))
    elif isinstance(model_or_state_dict, Mapping):
        if not _is_tensor_dict(model_or_state_dict):
            raise LscError("expected a model or a state_dict (a non-empty dict of name -> tensor)")
        model = module_from_state_dict(model_or_state_dict)
    else:
        raise LscError(f"expected an nn.Module or a state_dict, got {type(model_or_state_dict).__name__}")

    # detach() keeps the original storage alive: parametrize rebinds the parameter itself to the coefficients
    chosen = selected_parameters(model, include, exclude)
    _check_bound_names(model, max_error)
    originals = {name: p.detach() for name, _, _, p, _ in chosen}
    hessians = _check_hessians(hessians, model, originals)
    # every name and module each chosen tensor is held under (a tied tensor has several): bounds may name any
    every_name = names_by_tensor(model)
    owners = {name: every_name[id(p)] for name, _, _, p, _ in chosen}
    if max_error is not None:  # every tensor's bound resolves, before lsc.spectral changes the model
        for name, w in originals.items():
            _error_bound(max_error, name, tuple(w.shape), owners[name])
    _check_positive_definite(hessians, chosen, damp)
    row_weighted = {name for name, h in hessians.items() if h.dim() == 1 and name in originals}
    undo = _Undo(model, chosen)
    try:  # all or nothing: a call that fails from here on hands the caller's model back as it was
        q_net = spectral(model, block_size=_with_row_blocks(block_size, row_weighted), init_bits=0.0,
                         include=include, exclude=exclude, bits_scale=4.0)
        model.eval()
        st = get_state(model)
        res = EXPONENT_RESOLUTION
        rows = []
        entries = st.entries
        total = len(entries)
        with torch.no_grad():
            for entry in _progress(entries, total, "choosing bits" if max_error is not None else "quantizing", progress):
                par = entry.parametrization
                coeffs = entry.coefficients.detach()
                weight = originals[entry.name].detach()
                if max_error is not None:
                    bound = _tensor_bound(max_error, entry.name, tuple(par.layout.shape), max_error_1d,
                                          owners.get(entry.name))
                    # a fixed rdo strength is part of the search (its dead zone adds error); "auto" fills the slack after
                    t_rdo = 0.0 if rdo == "auto" else float(rdo)
                    e, err = _search_exponent(lambda x: _error_at(par, coeffs, weight, x, t_rdo), lo_e, hi_e, bound,
                                              _guess_exponent(par, weight, bound))
                    if rdo == "auto":
                        t_rdo = _fill_slack(lambda r: _error_at(par, coeffs, weight, e, r), err, bound)
                        if t_rdo > 0:
                            err = _error_at(par, coeffs, weight, e, t_rdo)
                else:
                    bound = None
                    e = round(float(bits) * res)
                    t_rdo = 1.0 if rdo == "auto" else float(rdo)
                    err = _error_at(par, coeffs, weight, e, t_rdo)
                ratio = None
                use_rows = entry.name in row_weighted and not entry.tied_names
                use_feedback = entry.name in hessians and entry.name not in row_weighted \
                    and supports_feedback(par.layout) and not entry.tied_names
                # bits = init_bits (0) + bits_scale (4) * offset, and e / 16 is exact in float32
                q_net.tensor_offset[par.tensor_id] = e / (res * 4.0)
                got = par.exponent().to(torch.int64)
                if not bool((got == e).all()):  # pragma: no cover - guards the exactness argument above
                    raise LscError(f"{entry.name}: internal error setting the bit allocation ({got.unique().tolist()} != {e})")
                if t_rdo > 0:  # store the RD-optimized symbols
                    _store_symbols(entry, par, *_quantize_at(par, coeffs, e, t_rdo))
                elif use_feedback or use_rows:  # same step, symbols chosen for the output error; rows keep both errors' ratio
                    h, w64 = hessians[entry.name], weight.to(torch.float64)
                    q_plain, ev = _quantize_at(par, coeffs, e, 0.0)
                    if use_rows:  # an embedding table: rows weighted by how often they are looked up (see _rdo_round)
                        q, _ = _quantize_at(par, coeffs, e, 1.0, weights=_row_block_weights(h, par.layout, row_prior))
                        measure = functools.partial(_row_output_error, prior=row_prior)
                    else:
                        q = feedback_quantize(weight, h, par.layout, par.step(ev), float(par.mean), float(par.std),
                                              par.transform, damp).reshape(q_plain.shape)
                        measure = output_error
                    _store_symbols(entry, par, q, ev)
                    w_new, w_plain = (reconstruct(sym, ev, par.layout, par.mean, par.std, par.orig_dtype, par.transform)
                                      for sym in (q, q_plain))
                    plain = measure(w_plain.to(torch.float64) - w64, h)
                    ratio = measure(w_new.to(torch.float64) - w64, h) / plain if plain > 0 else 1.0
                    err = relative_error(w_new, weight)
                rows.append(dict(name=entry.name, shape=tuple(par.layout.shape), numel=par.layout.numel,
                                 bits=e / res, rel_error=err, bound=bound, tied=list(entry.tied_names),
                                 feedback=ratio is not None, row_weighted=use_rows, output_error_ratio=ratio))
        for p in q_net.parameters():
            p.requires_grad_(False)
        result = PostTrainingResult(model=model, tensors=rows)
        if path is not None:
            from . import save  # the codec, imported lazily
            result.file_bytes = save(model, path)
            result.path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else getattr(path, "name", None)
    except BaseException:
        undo()
        raise
    result.seconds = time.perf_counter() - t0
    return result
