"""What ``lsc.spectral`` leaves on a model: the shared q_net and the list of spectral tensors.

It is a plain attribute (``model._lsc``), not a submodule, so ``model.parameters()``
never yields q_net's parameters (no duplicate-parameter warning in the optimizer),
while ``model.state_dict()`` still carries q_net's state through hooks, so a
spectral model's state dict remains a resumable training checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import LscError
from .parametrization import SpectralParametrization
from .qnet import QuantizationNetwork
from .wrappers import WRAPPED_NAMES, inner_module, require_module

__all__ = ["SpectralEntry", "LscState", "spectral_root", "get_state", "check_attached", "resolve", "parametrization_key",
           "spectral_state_filter", "QNET_PREFIX"]

QNET_PREFIX = "_lsc_qnet."


def resolve(model: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    """(module holding the tensor ``name``, its attribute); the module is None when its path no longer exists."""
    path, _, attr = name.rpartition(".")
    try:
        return (model.get_submodule(path) if path else model), attr
    except AttributeError:
        return None, attr


def parametrization_key(prefix: str, name: str) -> str:
    """Where a parametrized tensor's state lives in a state dict: ``fc.weight`` -> ``fc.parametrizations.weight.``."""
    path, _, attr = name.rpartition(".")
    return f"{prefix}{path + '.' if path else ''}parametrizations.{attr}."


def spectral_state_filter(model: nn.Module):
    """A predicate ``(state-dict key, tensor) -> bool``: whether the entry is lsc's own state (coefficients,
    statistics), which a file stores as spectral entries. Other parametrizations' tensors (weight_norm's
    ``original0`` / ``original1``, spectral_norm's ``_u`` / ``_v``) are the model's own state, written like any
    other tensor. Matched by identity, and by name with the segments of per-layer wrappers left out
    (activation checkpointing and FSDP rename state-dict keys; FSDP2 hands out other tensor objects)."""
    ids, prefixes = set(), []
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, parametrize.ParametrizationList) and isinstance(m[0], SpectralParametrization):
            ids.update(id(t) for t in m._parameters.values() if t is not None)
            ids.update(id(t) for t in m[0].buffers())
            prefixes.append(_without_wrappers(name) + "." if name else "")
    prefixes = tuple(prefixes)
    return lambda key, t: id(t) in ids or _without_wrappers(key).startswith(prefixes)


def _without_wrappers(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in WRAPPED_NAMES)


@dataclass
class SpectralEntry:
    """One compressed tensor: its canonical name, where it lives, and the names of its ties."""

    name: str
    module: nn.Module
    attr: str
    tied_names: list[str] = field(default_factory=list)

    def _plist(self):
        """The tensor's ParametrizationList, or a clear error when someone removed it."""
        try:
            return self.module.parametrizations[self.attr]
        except (AttributeError, KeyError):
            raise LscError(f"{self.name}: its spectral parametrization was removed (parametrize.remove_parametrizations?), "
                           "so lsc can no longer read the model; to make a spectral model plain, with its decoded "
                           "weights, call lsc.to_dense(model) instead") from None

    @property
    def parametrization(self) -> SpectralParametrization:
        return self._plist()[0]

    def parts(self) -> tuple[SpectralParametrization, torch.Tensor]:
        """(parametrization, coefficients) with one module lookup (the rate loss runs every step)."""
        plist = self._plist()
        own = plist._parameters
        coeffs = own.get("original", own.get("original0"))
        return plist[0], (coeffs if coeffs is not None else self.coefficients)

    @property
    def original_attr(self) -> str:
        """``original``, or ``original0`` when the coefficients are wider than the weight (fp16 models)."""
        return next(k for k in self._plist()._parameters if k.startswith("original"))

    @property
    def coefficients(self) -> torch.Tensor:
        """The trainable coefficients (``original``, or ``original0`` when they are wider than the weight)."""
        plist = self._plist()
        return plist.original if hasattr(plist, "original") else plist.original0


@dataclass
class LscState:
    q_net: QuantizationNetwork
    entries: list[SpectralEntry]
    config: dict
    rate_weight: float = 1.0
    rate_refresh: int = 25          # training steps between exact (histogram) rate evaluations
    rate_calls: int = 0
    rate_cache: dict | None = None
    q_net_seen: torch.Tensor | None = None  # q_net's values at the last rate refresh (see loss._warn_if_q_net_is_not_trained)
    q_net_warned: bool = False

    def __deepcopy__(self, memo):
        import copy
        new = LscState(copy.deepcopy(self.q_net, memo), copy.deepcopy(self.entries, memo),
                       copy.deepcopy(self.config, memo), self.rate_weight, self.rate_refresh)
        new.q_net.link_model(new)  # its weak link was copied empty (see lsc.qnet.ModelLink)
        return new


def spectral_root(model: nn.Module) -> nn.Module:
    """The module ``lsc.spectral`` was called on, inside any DDP / FSDP / ``torch.compile`` /
    activation-checkpoint / :class:`lsc.SpectralTrainingModule` wrappers around it.

    Own attributes only: ``torch.compile``'s wrapper forwards attribute reads to the model inside,
    so ``getattr(wrapper, "_lsc")`` would find the state and take the wrapper for the model."""
    require_module(model, "lsc")
    seen, m = set(), model
    while m is not None and id(m) not in seen:
        seen.add(id(m))
        if isinstance(m.__dict__.get("_lsc"), LscState):
            return m
        m = _wrapped(m)
    raise LscError("model is not a spectral model (nor a DDP / FSDP / compile / SpectralTrainingModule wrapper of one): "
                   "call lsc.spectral(model) first")


def _wrapped(module: nn.Module) -> nn.Module | None:
    """The module a wrapper holds, or None. A SpectralTrainingModule is recognized by its q_net, so that
    the ``model`` attribute of an ordinary model (a task head around a backbone) is never entered."""
    children = module.__dict__.get("_modules", {})
    if isinstance(children.get("q_net"), QuantizationNetwork) and isinstance(children.get("model"), nn.Module):
        return children["model"]
    return inner_module(module)


def get_state(model: nn.Module) -> LscState:
    """The lsc state of a spectral model (looks through DDP/compile wrappers)."""
    return spectral_root(model)._lsc


def check_attached(model: nn.Module, *, alone: bool = False) -> LscState:
    """:func:`get_state`, after checking that every spectral tensor is still where ``lsc.spectral`` put it.

    A module replaced afterwards (a new classification head, say) leaves the old one's spectral
    tensor in lsc's list: the rate term would keep shrinking it and the file would hold it instead of
    the model's new weights. Run by the encoder, the report and every exact rate refresh.
    ``alone``: also refuse a parametrization stacked on lsc's (the encoder and ``to_dense``, which
    would otherwise write lsc's weight where the model uses another).
    """
    holder = spectral_root(model)
    st = holder._lsc
    for entry in st.entries:
        par = entry.parametrization
        for name in (entry.name, *entry.tied_names):
            module, attr = resolve(holder, name)
            plist = getattr(module, "parametrizations", {})
            if attr not in plist or not any(p is par for p in plist[attr]):
                now = "gone" if module is None else f"a {type(module).__name__} without it"
                raise LscError(f"{name}: the module holding this spectral tensor was replaced after lsc.spectral "
                               f"(it is now {now}), so lsc would go on training and saving the old tensor; change the "
                               "model first, then call lsc.spectral")
            if alone and len(plist[attr]) != 1:
                raise LscError(f"{name}: has other parametrizations stacked on lsc's "
                               f"({', '.join(type(p).__name__ for p in plist[attr])}), so the model's weight is not the "
                               "one lsc decodes and cannot be saved or made dense; apply them to the tensor before lsc.spectral instead")
            declared = _declared_shape(module, attr)
            if declared is not None and declared != par.layout.shape:
                kind = type(module).__bases__[0].__name__  # parametrize's subclass -> the user's class
                raise LscError(f"{name}: the {kind} was resized after lsc.spectral (it declares shape "
                               f"{declared}, its spectral tensor has {par.layout.shape}; the new size was lost): "
                               "resize first (e.g. resize_token_embeddings), then call lsc.spectral")
    return st


def _declared_shape(module: nn.Module, attr: str) -> tuple[int, ...] | None:
    """The shape an Embedding's or Linear's own size attributes give its ``attr``; resizing code (Hugging Face's
    ``resize_token_embeddings``) sets them and assigns ``.weight.data``, which a parametrized weight drops."""
    if isinstance(module, nn.Embedding) and attr == "weight":
        return (module.num_embeddings, module.embedding_dim)
    if isinstance(module, nn.Linear):
        return {"weight": (module.out_features, module.in_features), "bias": (module.out_features,)}.get(attr)
    return None


def _state_dict_hook(module, state_dict, prefix, local_metadata):
    st = module.__dict__.get("_lsc")
    if st is not None:
        for k, v in st.q_net.state_dict().items():
            state_dict[prefix + QNET_PREFIX + k] = v
    return state_dict


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    st = module.__dict__.get("_lsc")
    if st is None:
        return
    st.rate_cache = None  # a checkpoint of another size: the next quantization_loss measures it afresh
    plain = _analyze_dense_weights(module, st, state_dict, prefix)
    _rename_coefficient_keys(st, state_dict, prefix)
    _explain_layout_mismatches(module, st, state_dict, prefix, error_msgs)
    own = {k[len(prefix + QNET_PREFIX):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix + QNET_PREFIX)}
    if own:
        st.q_net.load_state_dict(own, strict=strict)
    elif strict and not plain:  # a plain checkpoint has no q_net: the current one stays
        missing_keys.extend(prefix + QNET_PREFIX + k for k in st.q_net.state_dict())


def _rename_coefficient_keys(st: LscState, state_dict, prefix: str) -> None:
    """Coefficients are ``original`` in a float32 model and ``original0`` in a half-precision one (they stay
    float32 there, beside the weight's dtype): a checkpoint of either loads into the other, as a plain one would."""
    for entry in st.entries:
        have = entry.original_attr
        other = "original0" if have == "original" else "original"
        for name in (entry.name, *entry.tied_names):
            base = parametrization_key(prefix, name)
            if base + have not in state_dict and base + other in state_dict:
                state_dict[base + have] = state_dict.pop(base + other)


def _explain_layout_mismatches(model: nn.Module, st: LscState, state_dict, prefix: str, error_msgs: list) -> None:
    """Say why coefficients do not fit (PyTorch's own message only gives the shapes): the checkpoint was
    written by a spectral model with other blocks, so ``lsc.spectral`` needs the options of that run."""
    for entry in st.entries:
        par, coeffs = entry.parts()
        saved = state_dict.get(parametrization_key(prefix, entry.name) + entry.original_attr)
        if saved is None or tuple(saved.shape) == tuple(coeffs.shape):
            continue
        rank = len(par.layout.shape)
        block = tuple(saved.shape[rank:])
        if saved.dim() != 2 * rank or block == par.layout.block_shape:
            continue  # another shape of weight: PyTorch's size-mismatch message says it
        error_msgs.append(f"{entry.name}: the checkpoint's coefficients are in blocks of {block}, this model's in "
                          f"blocks of {par.layout.block_shape}; call lsc.spectral with the block_size of the run "
                          "that saved the checkpoint")


def _analyze_dense_weights(model: nn.Module, st: LscState, state_dict, prefix: str) -> bool:
    """Turn the dense weights of a plain checkpoint (``fc.weight``) into the spectral keys that hold them
    (coefficients, mean, std: what ``lsc.spectral`` would compute), so that the model the user wrapped
    still loads its own checkpoints. Returns whether any was found."""
    found = False
    for entry in st.entries:
        for name in (entry.name, *entry.tied_names):
            if prefix + name not in state_dict:
                continue
            module, attr = resolve(model, name)
            plist = module.parametrizations[attr]
            base = parametrization_key(prefix, name)
            original = base + entry.original_attr
            if original in state_dict:
                continue  # the spectral keys are there too: leave the extra key to load_state_dict's own check
            index = next(i for i, p in enumerate(plist) if isinstance(p, SpectralParametrization))
            coeffs, mean, std = plist[index].analysis(state_dict.pop(prefix + name))
            state_dict[original] = coeffs
            state_dict[f"{base}{index}.mean"], state_dict[f"{base}{index}.std"] = mean, std
            found = True
    return found


def attach_state(model: nn.Module, state: LscState) -> None:
    model._lsc = state
    # q_net learns every tensor's features, so a training step can evaluate it once for all of them
    state.q_net.attach_members([(e.parametrization.tensor_id, e.parametrization.features) for e in state.entries],
                               state)
    # once per module: the hooks read ``_lsc`` and do nothing without it, so a model made plain by
    # lsc.to_dense and converted again must not get a second pair (the second load hook would find
    # q_net's keys already taken and report them missing)
    if not model.__dict__.get("_lsc_hooked"):
        model._register_state_dict_hook(_state_dict_hook)
        model._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True)
        model.__dict__["_lsc_hooked"] = True
