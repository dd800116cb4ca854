"""The user's model inside the wrappers PyTorch puts around it (``torch.compile``, DDP, FSDP, ...).

lsc names every tensor as the user's model names it, so that a file loads into any fresh
instance of the architecture. A wrapper's own state dict prefixes every key
(``_orig_mod.``, ``module.``), so lsc reads the module inside instead.
"""
from __future__ import annotations

from torch import nn

from .errors import LscError

__all__ = ["inner_module", "parameter_wrapper", "require_module", "unwrap", "unwrap_for_conversion"]

# children only wrappers name so: torch.compile, FSDP1, activation checkpointing
WRAPPED_NAMES = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _data_parallel(module: nn.Module) -> bool:
    return isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel))


def inner_module(module: nn.Module) -> nn.Module | None:
    """The module a PyTorch wrapper holds, or None when ``module`` is no wrapper.

    A child named ``module`` counts only in DDP / DataParallel: an ordinary model may call
    its backbone that, and taking the backbone for the whole would drop the model's own layers.
    """
    children = module.__dict__.get("_modules", {})
    if _data_parallel(module):
        return children.get("module")
    for name in WRAPPED_NAMES:
        if isinstance(children.get(name), nn.Module):
            return children[name]
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside any wrappers (``model`` itself if none)."""
    inner = inner_module(model)
    while inner is not None:
        model, inner = inner, inner_module(inner)
    return model


def require_module(model, what: str) -> None:
    """Refuse anything but a model object by name (a path, a state dict, the class itself)."""
    if isinstance(model, nn.Module):
        return
    hint = ""
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        hint = "; for a checkpoint file use lsc.compress_posttraining(lsc.load_checkpoint(path)), for a .lsc file lsc.load"
    elif isinstance(model, dict):
        hint = "; for a state dict use lsc.compress_posttraining(state_dict)"
    elif isinstance(model, type):
        hint = "; pass an instance, e.g. MyModel()"
    raise LscError(f"{what} takes the model (an nn.Module), got {type(model).__name__}{hint}")


def unwrap_for_conversion(model: nn.Module, what: str) -> nn.Module:
    """The module ``what`` (``"lsc.spectral"``, ...) should convert: through ``torch.compile``, never through
    a wrapper that has registered the parameters (DDP, DataParallel, FSDP), which would go on synchronizing
    tensors the model no longer uses."""
    require_module(model, what)
    holder = parameter_wrapper(model)
    if holder is not None:
        raise LscError(f"{what}: the model is wrapped in {type(holder).__name__}, which has already registered its "
                       f"parameters; call {what} on the bare model first, then wrap it (see docs/DISTRIBUTED.md)")
    return unwrap(model)


def parameter_wrapper(model: nn.Module) -> nn.Module | None:
    """The outermost wrapper around ``model`` that has registered its parameters (DDP, DataParallel, FSDP),
    or None: replacing parameters under one leaves it synchronizing tensors the model no longer uses."""
    m = model
    while (inner := inner_module(m)) is not None:
        if _data_parallel(m) or "_fsdp_wrapped_module" in m.__dict__.get("_modules", {}):
            return m
        m = inner
    return None
