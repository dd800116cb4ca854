"""``lsc.to_dense``: turn a spectral model back into a plain one, holding its decoded weights.

A spectral model's ``state_dict()`` is a training checkpoint (coefficients, statistics,
q_net), which is what resuming training needs but not what anything else reads:
``save_pretrained`` writes it without complaint and ``from_pretrained`` then initializes
every weight at random, ``torch.save(model)`` refuses parametrized modules, and export
tools trace the synthesis. ``to_dense`` removes lsc's parametrizations in place and leaves
each weight at its decoded value, bit for bit what the eval-mode forward used and what
``lsc.load(file, plain_model)`` rebuilds on the same device.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .convert import undeclare_tied_state
from .errors import LscError
from .lazy import LazyParametrization
from .lowrank import LowRankMatrix, Tucker2
from .precision import full_precision
from .state import check_attached, resolve, spectral_root
from .wrappers import parameter_wrapper, require_module

__all__ = ["to_dense"]


def unparametrize(module: nn.Module, attr: str, dense: nn.Parameter) -> None:
    """Remove ``attr``'s parametrization, leaving ``dense`` as the plain parameter.

    ``remove_parametrizations(leave_parametrized=True)`` cannot do it: it would evaluate the
    parametrization in the current mode (the training synthesis in train mode), keep the
    coefficients' Parameter object (so the optimizer's state would silently no longer fit it),
    and it refuses tensors parametrized through several originals (fp16 models' float32
    coefficients, low-rank factors). So the one original is swapped for ``dense`` first and
    then removed as is, which restores the module's own class once nothing else is parametrized.
    """
    _own_class(module)
    plist = module.parametrizations[attr]
    for key in [k for k in plist._parameters if k.startswith("original")]:
        del plist._parameters[key]
    plist.is_tensor = True
    plist.register_parameter("original", dense)
    parametrize.remove_parametrizations(module, attr, leave_parametrized=False)


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before its properties are removed from it: a deepcopy
    shares the injected ``Parametrized<Cls>`` class with the original, whose ``weight`` would vanish too."""
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__,
                            {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")})


@torch.no_grad()
@full_precision
def to_dense(model: nn.Module, *, keep_factors: bool = False) -> nn.Module:
    """Make a spectral model plain again, in place: every weight becomes its decoded value.

    Use it to hand a fine-tuned model to anything that expects ordinary parameters:
    ``save_pretrained``, ``torch.save(model)``, ONNX export, a dense fine-tune. The weights
    equal, bit for bit, the eval-mode weights of the spectral model and what
    ``lsc.load(lsc.compress_weights(model), plain_model)`` rebuilds on the same device; tied
    weights stay one shared parameter; each new parameter requires grad as its coefficients
    did; buffers are left as they are. q_net is detached from the model (the returned model
    no longer has a rate term, and ``lsc.save`` needs the spectral model: save first).

    Weights factored by :func:`lsc.factorize` are multiplied back into full weights, as
    ``lsc.load`` does for a plain model; ``keep_factors=True`` keeps them factored (plain
    factors under the low-rank parametrization). Nothing is changed if any weight fails
    to decode (NaN coefficients, say): the error names it.
    """
    require_module(model, "lsc.to_dense")
    if any(isinstance(m, LazyParametrization) for m in model.modules()):
        raise LscError("model was loaded lazily; for plain weights load the file without lazy=: "
                       "lsc.load(path, plain_model)")
    if parameter_wrapper(model) is not None:
        raise LscError("lsc.to_dense: the model is wrapped in DDP / DataParallel / FSDP, which would go on "
                       "synchronizing the coefficients it replaces; call lsc.to_dense(wrapper.module) and wrap "
                       "the dense model anew to keep training it")
    holder = spectral_root(model)
    st = check_attached(holder, alone=True)
    plan = []
    for entry in st.entries:  # decode everything first: an error must leave the model as it was
        locations = [resolve(holder, name) for name in (entry.name, *entry.tied_names)]  # all there: checked above
        par, coeffs = entry.parts()
        w = par.decoded_weight(coeffs, check=True)
        plan.append((locations, nn.Parameter(w, requires_grad=coeffs.requires_grad)))
    for locations, dense in plan:
        for module, attr in locations:
            unparametrize(module, attr, dense)
    del holder._lsc  # its state_dict hooks read this attribute and do nothing without it
    undeclare_tied_state(holder)
    if not keep_factors:
        _fold_factors(holder)
    return model


def _fold_factors(model: nn.Module) -> None:
    """Multiply lsc.factorize's factors back into full weights (the product lsc.load computes)."""
    for module in list(model.modules()):
        for attr, plist in list(getattr(module, "parametrizations", {}).items()):
            if len(plist) == 1 and isinstance(plist[0], (LowRankMatrix, Tucker2)):
                factors = [getattr(plist, k) for k in sorted(k for k in plist._parameters if k.startswith("original"))]
                w = plist[0](*factors)
                unparametrize(module, attr, nn.Parameter(w, requires_grad=any(f.requires_grad for f in factors)))
