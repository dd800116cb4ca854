"""The user's model inside the wrappers PyTorch puts around it (``torch.compile``, DDP, DataParallel).

lsc names every tensor as the user's model names it, so that a file loads into any fresh
instance of the architecture. A wrapper's own state dict prefixes every key
(``_orig_mod.``, ``module.``), so lsc reads the module inside instead.
"""
from __future__ import annotations

import sys

from torch import nn

from .errors import LscError

__all__ = ["unwrap", "unwrap_for_conversion"]


def _compiled_class():
    """``torch.compile``'s wrapper class, if dynamo was ever imported (a model cannot be compiled otherwise)."""
    return getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)


def _data_parallel(model: nn.Module) -> bool:
    return isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside any ``torch.compile`` / DDP / DataParallel wrappers (``model`` itself if none)."""
    compiled = _compiled_class()
    while True:
        if compiled is not None and isinstance(model, compiled):
            model = model._orig_mod
        elif _data_parallel(model):
            model = model.module
        else:
            return model


def unwrap_for_conversion(model: nn.Module, what: str) -> nn.Module:
    """The module ``what`` (``"lsc.spectral"``, ...) should convert: through ``torch.compile``, never through DDP.

    DDP registers the parameters when it wraps a model, so replacing them underneath it would leave
    DDP synchronizing tensors the model no longer uses.
    """
    inner = unwrap(model)
    m = model
    while m is not inner:
        if _data_parallel(m):
            raise LscError(f"{what}: the model is wrapped in {type(m).__name__}, which has already registered its "
                           f"parameters; call {what} on the bare model first, then wrap it (see docs/DISTRIBUTED.md)")
        m = m._orig_mod
    return inner
