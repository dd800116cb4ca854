"""``lsc.spectral``: reparameterize every selected tensor of a model in place."""
from __future__ import annotations

import math
import operator
import re
import warnings
from fnmatch import fnmatch
from typing import Callable, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from .blocking import choose_block_shape
from .checks import as_number, is_integer
from .errors import LscError, outside_stacklevel
from .grouping import DEFAULT_MIN_GROUP_SYMBOLS
from .parametrization import SpectralParametrization
from .precision import full_precision
from .qnet import QuantizationNetwork
from .quantizer import MAX_BITS, MIN_BITS
from .state import LscState, SpectralEntry, attach_state, get_state
from .wrappers import unwrap_for_conversion

__all__ = ["spectral", "selected_parameters"]

Selector = Union[str, type, Callable[[str, torch.Tensor], bool]]


def _matches(selector: Selector, name: str, module: nn.Module, tensor: torch.Tensor) -> bool:
    if isinstance(selector, str):  # an exact name first: names may hold characters special to fnmatch ("attn[0]")
        return name == selector or fnmatch(name, selector) or fnmatch(name.rsplit(".", 1)[-1], selector)
    if isinstance(selector, type):
        return isinstance(module, selector)
    return bool(selector(name, tensor))


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple, set)) else [x]


def selected_parameters(model: nn.Module, include=None, exclude=None):
    """(name, module, attr, param, [tied (name, module, attr)]) for every parameter lsc will compress.

    A parameter is taken when it is floating point, non-empty, matches ``include``
    (default: everything) and matches nothing in ``exclude``. Selectors are glob
    patterns on the parameter name (``"encoder.*.weight"``, ``"bias"``), module
    types (``nn.LayerNorm``), or callables ``(name, tensor) -> bool``. A tied parameter
    is one tensor under several names (and modules): it is taken when any of them is
    included and none is excluded, whichever name comes first in the model.
    """
    include, exclude = _as_list(include), _as_list(exclude)
    owners: dict[int, list] = {}
    order: list[int] = []
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in list(module._parameters.items()):
            if p is None:
                continue
            name = f"{mod_name}.{attr}" if mod_name else attr
            if id(p) not in owners:
                owners[id(p)] = []
                order.append(id(p))
            if all(o[1] is not module or o[2] != attr for o in owners[id(p)]):
                owners[id(p)].append((name, module, attr, p))
    every_name = names_by_tensor(model)
    chosen = []
    for pid in order:
        (name, module, attr, p), *ties = owners[pid]
        if not p.is_floating_point() or p.numel() == 0 or p.element_size() == 1:  # float8: stored raw
            continue
        names = every_name[pid]
        if include and not any(_matches(s, n, m, p) for s in include for n, m in names):
            continue
        if any(_matches(s, n, m, p) for s in exclude for n, m in names):
            continue
        chosen.append((name, module, attr, p, [(n, m, a) for n, m, a, _ in ties]))
    return chosen


def _owners(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module of its type) for every parameter name of the model, tied and repeated names included."""
    return [pair for pairs in names_by_tensor(model).values() for pair in pairs]


def names_by_tensor(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """Every name each parameter (by id) has in the model, with the module whose type a type selector tests:
    a tied tensor and a module reused at two places have several; a parameter that a parametrization (lsc.factorize,
    weight_norm) holds is tested as the parametrized module's (a factored Linear's factors are nn.Linear's)."""
    out: dict[int, list] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        kind = module
        if isinstance(module, parametrize.ParametrizationList) and ".parametrizations." in f".{mod_name}":
            owner = mod_name.rsplit("parametrizations.", 1)[0].rstrip(".")
            kind = model.get_submodule(owner) if owner else model
        for attr, p in module._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((f"{mod_name}.{attr}" if mod_name else attr, kind))
    return out


def _type_name(t: type) -> str:
    return f"nn.{t.__name__}" if getattr(nn, t.__name__, None) is t else t.__qualname__


def _key_name(key) -> str:
    return _type_name(key) if isinstance(key, type) else repr(key)


def _unmatched_patterns(model: nn.Module, include, exclude) -> list[str]:
    """The glob patterns of ``include`` / ``exclude`` that match no parameter name, as ``include='...'``."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    return [f"{kind}={s!r}" for kind, selectors in (("include", include), ("exclude", exclude))
            for s in _as_list(selectors)
            if isinstance(s, str) and not any(_matches(s, n, None, None) for n in names)]


def _unmatched_keys(model: nn.Module, **options) -> tuple[list[str], list[str]]:
    """Keys of the per-tensor option dicts (``block_size={...}``, ``transform={...}``; all but ``"default"``)
    that match no parameter: (names and globs that match no parameter name, as ``block_size['...']``; module
    types that hold no parameter, as ``block_size[nn.Embedding]``). A key of any other kind matches nothing."""
    owners = _owners(model)
    names = {n for n, _ in owners}
    by_name, by_type = [], []
    for kind, option in options.items():
        for key in option if isinstance(option, dict) else ():
            if isinstance(key, type):
                if not any(isinstance(m, key) for _, m in owners):
                    by_type.append(f"{kind}[{_type_name(key)}]")
            elif not isinstance(key, str) or (key != "default" and key not in names
                                              and not any(_matches(key, n, None, None) for n in names)):
                by_name.append(f"{kind}[{key!r}]")
    return by_name, by_type


def _with_default(option, default):
    """A per-tensor option dict without a ``"default"`` key applies the documented default elsewhere."""
    return {**option, "default": default} if isinstance(option, dict) and "default" not in option else option


def _block_for(name: str, shape: tuple[int, ...], block_size, owners=None) -> tuple[int, ...]:
    try:
        return choose_block_shape(shape, _per_tensor(_with_default(block_size, 8), name, shape, owners, "block_size"))
    except ValueError as e:
        hint = " (a tuple applies to every tensor: give per-tensor shapes as {pattern: size})" if isinstance(block_size, (tuple, list)) else ""
        raise LscError(f"{name}: {e}{hint}") from None


def _dict_lookup(option: dict, name: str, module) -> list[tuple[int, object, object]]:
    """(level, key, value) that decides ``name`` at each level of precedence, most specific first: the exact name,
    the first glob that matches it (full name or last part), the first module type ``module`` is an instance of."""
    found = []
    if name in option and name != "default":  # an exact name wins (names may hold characters special to fnmatch)
        found.append((0, name, option[name]))
    glob = next((k for k in option if isinstance(k, str) and k != "default" and _matches(k, name, None, None)), None)
    if glob is not None:
        found.append((1, glob, option[glob]))
    if module is not None:
        kind = next((k for k in option if isinstance(k, type) and isinstance(module, k)), None)
        if kind is not None:
            found.append((2, kind, option[kind]))
    return found


def _same(a, b) -> bool:
    """Whether two option values are one (a block shape as a tuple or a list alike)."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        a, b = tuple(a), tuple(b)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  (values whose == is not a truth value)
        return a is b


def _per_tensor(option, name: str, shape: tuple[int, ...], owners=None, what: str = "option"):
    """Resolve an option given globally, as ``{key: value, "default": value}``, or as ``callable(name, shape)``.

    A dict key is a parameter name, a glob on the full name or its last part (as include / exclude), or a module
    type (``nn.Embedding``) that the module holding the parameter is an instance of. An exact name wins over a
    glob, a glob over a module type, and any of them over ``"default"``; among several globs (or types) that
    match, the first in the dict wins. ``owners``: every ``(name, module)`` the tensor is held under (a tied
    weight has several; default ``[(name, None)]``, which matches no type): the most specific kind of key that
    matches any of them decides, and two names whose keys of that kind give different values raise
    :class:`LscError` naming both. A callable is asked with ``name`` (the tensor's first name) only.
    """
    if isinstance(option, dict):
        hits = [(level, n, key, value) for n, module in (owners or [(name, None)])
                for level, key, value in _dict_lookup(option, n, module)]
        if hits:
            best = min(h[0] for h in hits)
            hits = [h for h in hits if h[0] == best]
            _, n0, k0, v0 = hits[0]
            for _, n1, k1, v1 in hits[1:]:
                if not _same(v0, v1):
                    raise LscError(f"{what}: {n0!r} and {n1!r} are one tied tensor but get different values: {v0!r} "
                                   f"(key {_key_name(k0)}) and {v1!r} (key {_key_name(k1)}); give them one value")
            return v0
        return option.get("default")
    return option(name, shape) if callable(option) else option


def _check_options(*, init_bits, rate_weight, leak, min_group_symbols, q_net_hidden, bits_scale) -> None:
    """Reject option values that would train something else than asked, with the option's name."""
    def number(name, value):
        v = as_number(value)
        if not math.isfinite(v):
            raise LscError(f"{name} must be a finite number, got {value!r}")
        return v
    if not MIN_BITS <= number("init_bits", init_bits) <= MAX_BITS:
        raise LscError(f"init_bits must be in [{MIN_BITS:g}, {MAX_BITS:g}] (the range of step sizes lsc stores), got {init_bits!r}")
    if number("rate_weight", rate_weight) < 0:
        raise LscError(f"rate_weight must be >= 0 (a negative weight would reward larger files), got {rate_weight!r}")
    if not 0 <= number("leak", leak) < 1:
        raise LscError(f"leak must be in [0, 1) (the fraction of the rounding residual kept), got {leak!r}")
    if number("bits_scale", bits_scale) <= 0:
        raise LscError(f"bits_scale must be > 0, got {bits_scale!r}")
    for name, value in (("min_group_symbols", min_group_symbols), ("q_net_hidden", q_net_hidden)):
        if not is_integer(value) or value < 1:
            raise LscError(f"{name} must be a positive integer, got {value!r}")
    if min_group_symbols > 1 << 62:  # the file format's bound (docs/FORMAT.md: min_group)
        raise LscError(f"min_group_symbols must be at most 2**62 (what a file can hold), got {min_group_symbols!r}")


@full_precision
def spectral(model: nn.Module, *, block_size=8, init_bits: float = 10.0, include=None, exclude=None,
             rate_weight: float = 1.0, leak: float = 0.0, min_group_symbols: int = DEFAULT_MIN_GROUP_SYMBOLS,
             q_net_hidden: int = 32, bits_scale: float = 4.0, transform="dct") -> QuantizationNetwork:
    """Reparameterize ``model`` in place and return the shared quantization network.

    Every selected tensor becomes standardized block-DCT coefficients (the new
    trainable parameter, reachable as ``module.parametrizations.<attr>.original``).
    Pass ``q_net.parameters()`` to the optimizer together with the model's, and add
    :func:`lsc.quantization_loss` to the task loss.

    Args:
        block_size: block edge per dimension (int), a per-dim tuple, a dict of
            ``{key: size, "default": size}``, or ``callable(name, shape) -> size``.
            Blocks never exceed a dimension's size. A dict key is a parameter name, a glob
            (on the full name or its last part, as in include / exclude) or a module type
            (``nn.Embedding``: every parameter of such modules). An exact name wins over a glob,
            a glob over a type, and any of them over ``"default"``; among several globs (or
            types) that match, the first in the dict wins. A tied weight is matched under all
            of its names (an LM head tied to the embedding: ``"head.weight"`` works as well as
            ``"emb.weight"``); two of its names that get different values at the same
            precedence raise :class:`lsc.LscError`. A key (but ``"default"``) that matches no
            parameter is named in a warning, as an unmatched include / exclude pattern is. A
            callable is asked with the tensor's first name only.
        init_bits: starting bits per frequency (the step is 2^-bits in units of the
            tensor's standard deviation).
        include / exclude: glob patterns on parameter names, module types, or
            ``callable(name, tensor) -> bool``. Non-float and empty tensors are never compressed.
        rate_weight: multiplier of the rate term returned by ``quantization_loss``.
        leak: fraction of the rounding residual kept in the training forward (0 = exact rounding).
        min_group_symbols: smallest number of symbols that share one probability table.
        transform: block transform name (``"dct"``), a dict ``{key: name, "default": name}``
            (keys as for ``block_size``) or ``callable(name, shape) -> name``.
    """
    _check_options(init_bits=init_bits, rate_weight=rate_weight, leak=leak, min_group_symbols=min_group_symbols,
                   q_net_hidden=q_net_hidden, bits_scale=bits_scale)
    init_bits, rate_weight, leak, bits_scale = (float(v) for v in (init_bits, rate_weight, leak, bits_scale))
    min_group_symbols, q_net_hidden = operator.index(min_group_symbols), operator.index(q_net_hidden)
    model = unwrap_for_conversion(model, "lsc.spectral")  # a compiled model: convert the user's module inside
    if getattr(model, "_lsc", None) is not None or any(isinstance(m, SpectralParametrization) for m in model.modules()):
        raise LscError("model is already a spectral model: lsc.spectral was called on it before")
    from .lazy import LazyParametrization  # lazy imports the codec, which imports this module
    if any(isinstance(m, LazyParametrization) for m in model.modules()):
        raise LscError("model was loaded lazily (inference only, its weights are not parameters); to fine-tune a "
                       "file, call lsc.spectral on a fresh model and then lsc.load(path, model)")
    chosen = selected_parameters(model, include, exclude)
    unmatched = _unmatched_patterns(model, include, exclude)
    if not chosen:
        raise LscError("no floating-point parameters selected: nothing to compress (check include/exclude"
                       + (f"; no parameter name matches {', '.join(unmatched)})" if unmatched else ")"))
    # a key of a per-tensor option dict that matches nothing (a typo) would silently leave its tensors at the default
    by_name, by_type = _unmatched_keys(model, block_size=block_size, transform=transform)
    unmatched += by_name
    if unmatched or by_type:  # a typo would otherwise silently compress what was meant to stay, or the reverse
        warnings.warn("lsc.spectral: " + "; ".join(
            ([f"no parameter name matches {', '.join(unmatched)}"] if unmatched else [])
            + ([f"no module holding a parameter is an instance of {', '.join(by_type)}"] if by_type else [])),
            stacklevel=outside_stacklevel())
    for name, _, _, p, _ in chosen:
        if p.is_meta:
            raise LscError(f"{name}: is on the meta device; materialize the model (e.g. to_empty + load weights) before lsc.spectral")
        if not bool(torch.isfinite(p.detach()).all()):
            raise LscError(f"{name}: contains NaN or Inf; lsc cannot compress non-finite weights")
    q_net = QuantizationNetwork(len(chosen), init_bits=init_bits, hidden=q_net_hidden, bits_scale=bits_scale)
    q_net.to(chosen[0][3].device)
    # every parametrization is built (and every per-tensor option checked) before the model is touched:
    # a bad option for the last tensor must not leave the first ones converted
    every_name = names_by_tensor(model)
    owners = [every_name[id(p)] for _, _, _, p, _ in chosen]  # every name of each tensor, for its options
    pars = [SpectralParametrization(name, tuple(p.shape), p.dtype, _block_for(name, tuple(p.shape), block_size, own),
                                    tid, len(chosen), q_net, leak=leak, min_group_symbols=min_group_symbols,
                                    transform=_per_tensor(_with_default(transform, "dct"), name, tuple(p.shape), own,
                                                          "transform")).to(p.device)
            for tid, ((name, _, _, p, _), own) in enumerate(zip(chosen, owners))]
    entries = []
    for par, (name, module, attr, p, ties) in zip(pars, chosen):
        dense = p.detach().clone() if ties else None
        parametrize.register_parametrization(module, attr, par, unsafe=True)
        plist = module.parametrizations[attr]
        for _, tmod, tattr in ties:
            # parametrize rewrote the shared Parameter in place to hold coefficients, so the
            # tie is registered on a dense copy and then pointed at the one shared original.
            tmod._parameters[tattr] = nn.Parameter(dense.clone(), requires_grad=p.requires_grad)
            parametrize.register_parametrization(tmod, tattr, par, unsafe=True)
            for key in [k for k in tmod.parametrizations[tattr]._parameters if k.startswith("original")]:
                setattr(tmod.parametrizations[tattr], key, getattr(plist, key))
        par.edited_in_place = any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
                                  for m in (module, *(tmod for _, tmod, _ in ties)))
        entries.append(SpectralEntry(name, module, attr, [n for n, _, _ in ties]))
    config = dict(block_size=block_size if isinstance(block_size, (int, tuple, list)) else repr(block_size),
                  init_bits=init_bits, leak=leak, min_group_symbols=min_group_symbols,
                  transform=transform if isinstance(transform, str) else repr(transform))
    attach_state(model, LscState(q_net, entries, config, float(rate_weight)))
    _declare_tied_state_to_hugging_face(model, entries)
    return q_net


def _declare_tied_state_to_hugging_face(model: nn.Module, entries: list) -> None:
    """Name the tied copies of lsc's state in Hugging Face's ``_tied_weights_keys``, where a module declares some.

    A tied weight (an LM head sharing the input embedding) becomes one set of coefficients and statistics
    under both modules' ``parametrizations`` keys. ``save_pretrained`` (and so every ``Trainer`` checkpoint)
    refuses shared tensors its declared patterns do not name, and declared ones it writes once: so wherever
    a name of the tie matches a declared pattern (``lm_head.weight``), that name's parametrization keys are
    declared too, as copies of the first name's.
    """
    tied = [entry for entry in entries if entry.tied_names]
    if not tied:
        return
    for path, module in model.named_modules():
        keys = getattr(module, "_tied_weights_keys", None)
        if not isinstance(keys, dict) or not keys:
            continue
        added = {}
        for entry in tied:
            for name in entry.tied_names:
                rel = name if not path else (name[len(path) + 1:] if name.startswith(path + ".") else None)
                if rel is None or not any(isinstance(k, str) and re.search(k, rel) for k in keys):
                    continue
                owner, _, attr = rel.rpartition(".")
                src = entry.name[len(path) + 1:] if path and entry.name.startswith(path + ".") else entry.name
                src_owner, _, src_attr = src.rpartition(".")
                # unanchored: Hugging Face prefixes a submodule's keys with its path
                added[re.escape(f"{owner + '.' if owner else ''}parametrizations.{attr}.")] = \
                    f"{src_owner + '.' if src_owner else ''}parametrizations.{src_attr}"
        if added:
            # what to give back (None: the class's declaration); a plain value, so that copies keep it
            module.__dict__.setdefault("_lsc_tied_weights_keys", module.__dict__.get("_tied_weights_keys"))
            module._tied_weights_keys = {**keys, **added}


def undeclare_tied_state(model: nn.Module) -> None:
    """Undo :func:`_declare_tied_state_to_hugging_face` (``lsc.to_dense``): a plain model's ``tie_weights`` and
    ``resize_token_embeddings`` would find no parametrization keys to tie."""
    for module in model.modules():
        if "_lsc_tied_weights_keys" not in module.__dict__:
            continue
        before = module.__dict__.pop("_lsc_tied_weights_keys")
        if before is None:
            module.__dict__.pop("_tied_weights_keys", None)
        else:
            module._tied_weights_keys = before


def quantization_network(model: nn.Module) -> QuantizationNetwork:
    """The shared ``q_net`` of a spectral model: what :func:`spectral` returned, for code that did not keep it.

    A copy of the model (``copy.deepcopy``: an EMA or teacher copy, say) has its own, used by all
    of its tensors; build the copy's optimizer from this one. Looks through DDP / compile wrappers.
    """
    return get_state(model).q_net
