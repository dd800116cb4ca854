"""Data-parallel training of a spectral model.

``lsc.spectral`` keeps the shared quantization network (q_net) *outside* the
model's module tree (``model._lsc`` is a plain attribute), so that
``model.parameters()`` never yields q_net's parameters twice. DistributedDataParallel,
however, only broadcasts and all-reduces the parameters of the module it wraps,
and it needs every parameter that takes part in the step to receive its gradient
in the same backward pass. Both are met by wrapping the model and its q_net in
one module whose forward also computes the rate term::

    q_net = lsc.spectral(model)
    train = lsc.SpectralTrainingModule(model, q_net)        # q_net is now a registered submodule
    ddp = DDP(train)                                         # gloo on CPU, NCCL on GPU
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)      # model's and q_net's parameters, once each
    out, rate = ddp(x)                                       # rate = lsc.quantization_loss(model)
    (task_loss(out, y) + rate).backward()
    opt.step()
    lsc.distributed.save_on_rank0(ddp, "model.lsc")         # rank 0 writes, everyone waits

Computing ``lsc.quantization_loss(model)`` *outside* the DDP forward also runs,
but DDP then sees q_net's gradient arrive outside its reducer (q_net would not
be synchronized at all, and the model's coefficients would get their rate
gradient un-averaged); use the wrapper.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from .errors import LscError
from .loss import quantization_loss
from .qnet import QuantizationNetwork
from .state import LscState, get_state, spectral_root

__all__ = ["SpectralTrainingModule", "unwrap_spectral", "save_on_rank0"]


class SpectralTrainingModule(nn.Module):
    """A spectral model plus its shared q_net as one module: ``forward(*a, **kw) -> (output, rate)``.

    ``output`` is ``model(*a, **kw)``; ``rate`` is ``lsc.quantization_loss(model, rate_weight)``
    (a scalar tensor, already multiplied by the model's ``rate_weight`` unless
    ``rate_weight`` is given here), or ``None`` when ``compute_rate=False``.
    Wrap this module, not the bare model, in ``DistributedDataParallel``: q_net is a
    registered submodule here, so DDP broadcasts it at construction and all-reduces
    its gradients, and the rate term's gradient flows in the same backward as the
    task loss (no ``find_unused_parameters`` needed).

    ``parameters()`` yields every trainable parameter exactly once (the model's,
    including the spectral coefficients, then q_net's). ``state_dict()`` carries
    q_net twice (``model._lsc_qnet.*`` through the model's own hook and ``q_net.*``);
    both load back consistently. For saving the compressed model use
    :func:`save_on_rank0` or ``lsc.save(unwrap_spectral(ddp), path)``.
    """

    def __init__(self, model: nn.Module, q_net: QuantizationNetwork | None = None, *,
                 rate_weight: float | None = None, compute_rate: bool = True):
        super().__init__()
        st = get_state(model)
        if q_net is None:
            q_net = st.q_net
        elif q_net is not st.q_net:
            raise LscError("q_net is not the quantization network of this model: pass the object lsc.spectral(model) returned")
        self.model = model
        self.q_net = q_net
        self.rate_weight = rate_weight
        self.compute_rate = bool(compute_rate)

    @property
    def lsc_state(self) -> LscState:
        return get_state(self.model)

    def forward(self, *args: Any, **kwargs: Any):
        out = self.model(*args, **kwargs)
        rate = quantization_loss(self.model, self.rate_weight) if self.compute_rate else None
        return out, rate


def unwrap_spectral(module: nn.Module) -> nn.Module:
    """The spectral model inside DDP / FSDP / ``torch.compile`` / :class:`SpectralTrainingModule` wrappers."""
    return spectral_root(module)


@contextlib.contextmanager
def _full_params(module: nn.Module):
    """Unshard FSDP parameters for the duration (FSDP1: summon_full_params; FSDP2: unshard/reshard)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # pragma: no cover
        FSDP1 = None
    try:
        from torch.distributed.fsdp import FSDPModule as FSDP2
    except ImportError:  # pragma: no cover
        FSDP2 = None
    if FSDP1 is not None and any(isinstance(m, FSDP1) for m in module.modules()):
        with FSDP1.summon_full_params(module, writeback=False):
            yield
        return
    fsdp2 = [m for m in module.modules() if FSDP2 is not None and isinstance(m, FSDP2)]
    for m in fsdp2:
        m.unshard()
    try:
        yield
    finally:
        for m in fsdp2:
            m.reshard()


def save_on_rank0(module: nn.Module, path, *, group=None, **save_kwargs) -> None:
    """Write the ``.lsc`` file from rank 0 only, then wait on a barrier so every rank can read it.

    Call it on every rank. ``module`` may be the spectral model, a
    :class:`SpectralTrainingModule`, or a DDP / FSDP (one unit around a
    SpectralTrainingModule) / compiled wrapper of either; FSDP parameters are
    gathered first (a collective, hence every rank).

    Works unchanged without ``torch.distributed`` initialized (a single process saves).
    The model must be in the same state on every rank (it is, under DDP), since
    only rank 0's copy is written.
    """
    from . import save  # the codec's public entry point

    model = unwrap_spectral(module)
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    err: BaseException | None = None
    with _full_params(module):  # FSDP: gather the sharded parameters on every rank (a collective)
        if not distributed or dist.get_rank(group) == 0:
            try:
                save(model, path, **save_kwargs)
            except BaseException as e:  # noqa: BLE001 - re-raised below after the barrier
                err = e
    if distributed:
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
        ok = torch.tensor([0 if err is not None else 1], dtype=torch.int64, device=dev)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)  # doubles as the barrier
        if err is None and int(ok) == 0:
            raise LscError("rank 0 failed to save the .lsc file")
    if err is not None:
        raise err
