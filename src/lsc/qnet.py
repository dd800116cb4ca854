"""The shared quantization network: (tensor id, frequency position) -> bits.

One small MLP serves every tensor, so the model learns a bit allocation that
generalizes across layers instead of one free number per coefficient. Unlike the
seed's network it cannot die: hidden units are SiLU, there is no output ReLU, the
last layer starts at zero so every frequency starts at exactly ``init_bits`` while
still receiving gradient, and bits pushed past the stored range still get the
gradient that leads back into it (:func:`lsc.quantizer.inward`).
"""
from __future__ import annotations

import math
import weakref

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .blocking import BlockLayout
from .precision import full_precision
from .quantizer import EXPONENT_RESOLUTION, MAX_BITS, MIN_BITS, bits_to_exponent, inward, step_size

__all__ = ["QuantizationNetwork", "position_features", "NUM_FEATURES"]

_TENSOR_FREQS = 4      # sin/cos octaves for the tensor id
_DIM_SLOTS = 4         # per-dimension frequency features for the last 4 block dims
NUM_FEATURES = 2 * _TENSOR_FREQS + 3 * _DIM_SLOTS + 4 + 4


def position_features(tensor_id: int, num_tensors: int, layout: BlockLayout) -> torch.Tensor:
    """Features (P x NUM_FEATURES) of every in-block position of one tensor, row-major."""
    bs = layout.block_shape
    p = layout.block_numel
    coords = torch.stack(torch.meshgrid(*[torch.arange(b, dtype=torch.float64) for b in bs], indexing="ij"), -1).reshape(p, len(bs)) if bs else torch.zeros(1, 0, dtype=torch.float64)
    u = coords / torch.tensor([max(b, 1) for b in bs], dtype=torch.float64) if bs else coords
    t = tensor_id / max(num_tensors, 1)
    octaves = torch.tensor([math.pi * 2**j for j in range(_TENSOR_FREQS)], dtype=torch.float64)
    tid = torch.cat([torch.sin(octaves * t), torch.cos(octaves * t)]).expand(p, -1)
    slots = torch.zeros(p, 3 * _DIM_SLOTS, dtype=torch.float64)
    last = list(range(len(bs)))[-_DIM_SLOTS:]
    for s, d in enumerate(last):
        slots[:, 3 * s] = torch.sin(math.pi * u[:, d])
        slots[:, 3 * s + 1] = torch.cos(math.pi * u[:, d])
        slots[:, 3 * s + 2] = 1.0
    r = (u.pow(2).mean(1).sqrt() if bs else torch.zeros(p, dtype=torch.float64)).unsqueeze(1)
    radial = torch.cat([torch.sin(math.pi * r), torch.cos(math.pi * r), torch.sin(2 * math.pi * r), torch.cos(2 * math.pi * r)], 1)
    size = torch.tensor([math.log2(max(layout.numel, 1)) / 24, len(bs) / 10,
                         math.log2(max(layout.block_numel, 1)) / 10, math.log2(max(layout.num_blocks, 1)) / 20],
                        dtype=torch.float64).expand(p, -1)
    return torch.cat([tid, slots, radial, size], 1).to(torch.float32)


class QuantizationNetwork(nn.Module):
    """MLP from position features to bits per frequency, plus a learned offset per tensor."""

    def __init__(self, num_tensors: int, init_bits: float = 10.0, hidden: int = 32, bits_scale: float = 4.0):
        super().__init__()
        self.init_bits = float(init_bits)
        self.bits_scale = float(bits_scale)
        self.mlp = nn.Sequential(
            nn.Linear(NUM_FEATURES, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 1),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.tensor_offset = nn.Parameter(torch.zeros(max(int(num_tensors), 1)))

    def forward(self, features: torch.Tensor, tensor_id: int) -> torch.Tensor:
        """Bits (continuous) for each row of ``features``."""
        out = self.mlp(features).squeeze(-1) + self.tensor_offset[tensor_id]
        return self.init_bits + self.bits_scale * out

    # -- init_bits and bits_scale set every step size, so a checkpoint carries them (one float64 tensor, not a
    # pickled object): a model rebuilt by lsc.spectral's defaults (10 bits) and resumed from the state dict of
    # compress_posttraining's model (0 bits) quantizes as the model that wrote it

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([self.init_bits, self.bits_scale], dtype=torch.float64)

    def set_extra_state(self, state) -> None:
        if not isinstance(state, torch.Tensor) or state.numel() != 2 or not bool(torch.isfinite(state).all()):
            raise ValueError(f"q_net's extra state must be 2 finite numbers (init_bits, bits_scale), got {state!r}")
        self.init_bits, self.bits_scale = (float(v) for v in state.detach().cpu().double().reshape(2))
        _SHARED.pop(self, None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        key = prefix + "_extra_state"
        if key in missing_keys:  # a checkpoint from before lsc saved it: this network keeps its own settings
            missing_keys.remove(key)

    # -- one batched call per training step, shared by every tensor's forward and the rate loss

    def attach_members(self, members: list[tuple[int, torch.Tensor]], owner=None) -> None:
        """Record ``(tensor_id, position features)`` of every tensor this network serves, and a weak link to
        ``owner`` (the model's :class:`lsc.state.LscState`), whose coefficients tell when the model's
        gradients were cleared."""
        feats = torch.cat([f for _, f in members])
        ids = torch.cat([torch.full((f.shape[0],), i, dtype=torch.int64, device=f.device) for i, f in members])
        # where forward() finds its weights: read as attributes on every call, because wrappers
        # such as FSDP replace the registered parameters with other tensors
        slots = [(self.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]) for name, _ in self.named_parameters()]
        self.__dict__["_members"] = dict(features=feats, ids=ids, sizes=[f.shape[0] for _, f in members],
                                         index={i: k for k, (i, _) in enumerate(members)}, slots=slots,
                                         entries=ModelLink(owner))

    def link_model(self, owner) -> None:
        """Point the weak link of :meth:`attach_members` at ``owner`` (a deep copy of the model's state)."""
        members = self.__dict__.get("_members")
        if members is not None:
            members["entries"] = ModelLink(owner)

    def mark_gradients(self, after_step: bool = True) -> None:
        """Record :meth:`coefficient_grad_marks` for the :meth:`_drop_stale_gradients` check of the next graphs:
        called after every optimizer step of this network, and at the end of every backward pass that reached
        it (``after_step=False``), whose marks replace all but a step's marks not yet checked by a forward."""
        marks = self.coefficient_grad_marks()
        held = self.__dict__.get("_marks")
        if marks is not None and (after_step or held is None or not held[0] or held[2]):
            self.__dict__["_marks"] = (after_step, marks, False)  # (after a step, marks, checked by a forward)

    def steps_coefficients(self, stepped: set) -> bool:
        """Whether an optimizer step over the parameters ``stepped`` (ids) stepped a coefficient this network serves."""
        members = self.__dict__.get("_members")
        return members is not None and any(id(e.coefficients) in stepped for e in members["entries"])

    def coefficient_grad_marks(self) -> list | None:
        """(id, version) of each served coefficient's gradient (None where it has none), or None when
        this network serves no model: what :meth:`_drop_stale_gradients` compares against after a step."""
        members = self.__dict__.get("_members")
        entries = list(members["entries"]) if members is not None else []
        if not entries:
            return None
        return [None if (g := e.coefficients.grad) is None else (id(g), g._version) for e in entries]

    def current_parameters(self) -> tuple[torch.Tensor, ...]:
        """The tensors :meth:`forward` reads now: the attached slots (see :meth:`attach_members`), else ``parameters()``."""
        members = self.__dict__.get("_members")
        if members is None:
            return tuple(self.parameters())
        return tuple(getattr(m, name) for m, name in members["slots"])

    @full_precision
    def shared_outputs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """(exponents, steps) of every member tensor (row-major positions), or None without members.

        Computed by one batched call and reused until a parameter of this network
        changes (its ``_version``: every optimizer step) or the autograd mode does, so
        a training step runs the MLP once instead of once per tensor plus once for the
        loss. The outputs may feed any number of forwards and backward passes (see
        :class:`_SharedBits`).
        """
        members = self.__dict__.get("_members")
        if members is None:
            return None
        params = self.current_parameters()
        if "_marks" in self.__dict__ and torch.is_grad_enabled():  # a graph since a backward or a step
            after_step, marks, _ = self.__dict__.pop("_marks")
            if self._drop_stale_gradients(params, list(members["entries"]), marks, after_step):
                # nothing cleared yet (a metric logged between optimizer.step() and model.zero_grad()): the
                # marks stay for the forward after the clearing
                self.__dict__["_marks"] = (after_step, marks, True)
        key = (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
               tuple((id(p), p._version, p.data_ptr(), p.requires_grad) for p in params))
        hit = _SHARED.get(self)
        if hit is not None and hit[0] == key:
            return hit[1]
        dev = params[0].device
        if members["features"].device != dev:
            if members["features"].is_meta:  # the model came back from the meta device: its tables were rebuilt
                entries = list(members["entries"])
                members["features"] = torch.cat([e.parametrization.features for e in entries]).to(dev)
                members["ids"] = torch.cat([torch.full((e.parametrization.features.shape[0],), e.parametrization.tensor_id,
                                                       dtype=torch.int64) for e in entries]).to(dev)
            else:
                members["features"], members["ids"] = members["features"].to(dev), members["ids"].to(dev)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            fn = _SharedBitsMLP if self._plain_mlp() else _SharedBits
            e, s = fn.apply(self, members["features"], members["ids"], *params)
        else:
            e = bits_to_exponent(self(members["features"], members["ids"]))
            s = step_size(e)
        out = (list(e.split(members["sizes"])), list(s.split(members["sizes"])))
        _SHARED[self] = (key, out)
        return out

    @staticmethod
    def _drop_stale_gradients(params, entries, marks, after_step: bool = True) -> bool:
        """Clear this network's gradients when the model's were cleared without them.

        ``model.zero_grad()`` (what Hugging Face's Trainer calls after every optimizer step) never
        reaches q_net, whose parameters ``model.parameters()`` leaves out, so its gradients would add up
        over all steps. Run once before the next graph, with ``marks`` (:meth:`coefficient_grad_marks`)
        taken after the last optimizer step that updated q_net: when no trainable coefficient still holds
        the gradient it had then, but one was cleared since (set to None, or zeroed in place by
        ``zero_grad(set_to_none=False)``, which bumps its version), q_net's are cleared the same way.
        Marks taken at the end of a backward pass instead (``after_step=False``: no step ran since, e.g.
        one a ``GradScaler`` skipped, whose inf gradients would otherwise stay and make it skip every
        later step) count only gradients set to None as cleared: between a backward and the next one,
        DDP's all-reduce or per-micro-batch clipping edit gradients in place without clearing them. Gradient accumulation, and layers a step does not use, leave some
        coefficient's gradient as it was, so they are untouched; an optimizer step of the model's
        coefficients without q_net drops the marks, so a loop that adds up q_net's gradients over
        several of the model's steps before stepping q_net is untouched too. Versions only: no host
        synchronization. Returns True when the model's gradients are still as marked (nothing decided yet).
        """
        if not entries or len(entries) != len(marks) or all(p.grad is None for p in params):
            return False
        cleared = None  # how the model's gradients were cleared: "none" or "zero"
        for entry, mark in zip(entries, marks):
            c = entry.coefficients
            if not c.requires_grad:
                continue
            g = c.grad
            if g is None:
                cleared = cleared or ("none" if mark is not None else None)
            elif mark is None or mark[0] != id(g):
                return False  # a gradient that was not there after the step: not a cleared model
            elif mark[1] == g._version:
                return True  # kept as marked: accumulating, or not cleared yet
            elif not after_step:
                return False  # edited in place since a backward (DDP's all-reduce copy, clipping): not cleared
            else:
                cleared = "zero"
        if cleared == "none":
            for p in params:
                p.grad = None
        elif cleared == "zero":
            for p in params:
                if p.grad is not None:
                    p.grad.zero_()
        return cleared is None and any(m is not None for m in marks)

    def _plain_mlp(self) -> bool:
        """Whether forward() is exactly Linear-SiLU-Linear-SiLU-Linear plus the offset (hand-differentiable)."""
        kinds = [type(m) for m in self.mlp]
        return (type(self).forward is QuantizationNetwork.forward and kinds == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
                and [n for _, n in self.__dict__["_members"]["slots"]] == ["tensor_offset"] + ["weight", "bias"] * 3)

    def shared_step(self, tensor_id: int) -> torch.Tensor | None:
        """Float32 steps (P,) of one member tensor from :meth:`shared_outputs`, or None."""
        members = self.__dict__.get("_members")
        if members is None or tensor_id not in members["index"]:
            return None
        return self.shared_outputs()[1][members["index"][tensor_id]]


class ModelLink:
    """q_net's weak link to the spectral entries of the model it serves (iterating gives them).

    Weak, so that q_net alone never keeps the model alive, nor drags the whole model into
    ``copy.deepcopy(q_net)`` or ``torch.save(q_net)``: a copy of q_net alone serves no model
    (:class:`lsc.state.LscState` links the q_net of a copied model to the copy's entries).
    """

    def __init__(self, owner=None):
        self._ref = None if owner is None else weakref.ref(owner)

    def __iter__(self):
        owner = None if self._ref is None else self._ref()
        return iter(() if owner is None else owner.entries)

    def __deepcopy__(self, memo):
        return ModelLink()

    def __reduce__(self):
        return (ModelLink, ())


# q_net -> (cache key, outputs); outside the module so deepcopy/pickle never see graph tensors
_SHARED: "weakref.WeakKeyDictionary[QuantizationNetwork, tuple]" = weakref.WeakKeyDictionary()


class _SharedBits(torch.autograd.Function):
    """features -> (exponents, steps) through q_net, as one node whose inner graph is kept.

    The MLP runs with autograd inside the forward and each backward differentiates that
    inner graph with ``retain_graph=True``, so the cached outputs can feed several
    graphs (gradient accumulation, repeated backward passes) exactly like separate q_net
    calls would, each backward adding its own gradient to q_net's parameters. Modifying
    a q_net parameter in place between forward and backward raises autograd's usual error.
    """

    @staticmethod
    def forward(ctx, q_net, features, ids, *params):
        with torch.enable_grad():
            e = bits_to_exponent(q_net(features, ids))
            s = step_size(e)
        ctx.inner, ctx.params, ctx.q_net = (e, s), params, weakref.ref(q_net)
        return e.detach(), s.detach()

    @staticmethod
    @once_differentiable
    @full_precision
    def backward(ctx, grad_e, grad_s):
        need = [i for i, p in enumerate(ctx.params) if ctx.needs_input_grad[3 + i]]
        grads = [None] * len(ctx.params)
        with torch.enable_grad():
            got = torch.autograd.grad(ctx.inner, [ctx.params[i] for i in need], (grad_e, grad_s),
                                      retain_graph=True, allow_unused=True)
        for i, g in zip(need, got):
            grads[i] = g
        _mark_after_backward(ctx.q_net)
        return (None, None, None, *grads)


class _SharedBitsMLP(torch.autograd.Function):
    """:class:`_SharedBits` for the standard network, differentiated by hand.

    Same values and gradients, without building and walking an autograd graph of
    about twenty small operations: q_net's fixed cost is a visible share of a small
    model's training step. Nothing full-size is freed by the backward either, so the
    outputs may again feed several backward passes.
    """

    @staticmethod
    def forward(ctx, q_net, features, ids, offset, w1, b1, w2, b2, w3, b3):
        z1 = torch.addmm(b1, features, w1.t())
        h1 = torch.nn.functional.silu(z1)
        z2 = torch.addmm(b2, h1, w2.t())
        h2 = torch.nn.functional.silu(z2)
        bits = torch.addmm(b3, h2, w3.t()).squeeze(-1).add_(offset[ids]).mul_(q_net.bits_scale).add_(q_net.init_bits)
        below, above = bits < MIN_BITS, bits > MAX_BITS  # the clamp's gradient: see quantizer.inward
        e = bits.clamp_(MIN_BITS, MAX_BITS).mul_(EXPONENT_RESOLUTION).round_()
        s = step_size(e)
        ctx.saved = (features, ids, offset.shape[0], w1, w2, w3, z1, h1, z2, h2, below, above, s, q_net.bits_scale)
        ctx.versions = [t._version for t in (offset, w1, b1, w2, b2, w3, b3)]
        ctx.inputs = (offset, w1, b1, w2, b2, w3, b3)
        ctx.q_net = weakref.ref(q_net)
        return e, s

    @staticmethod
    @once_differentiable
    @full_precision
    def backward(ctx, grad_e, grad_s):
        if [t._version for t in ctx.inputs] != ctx.versions:
            raise RuntimeError("one of the variables needed for gradient computation has been modified by an "
                               "inplace operation: a q_net parameter changed between the forward and this backward")
        features, ids, n_off, w1, w2, w3, z1, h1, z2, h2, below, above, s, scale = ctx.saved
        # e = round(4 * clamp(bits)) straight-through, s = 2^(-e/4); bits = init + scale * (mlp + offset)
        g_e = torch.addcmul(grad_e, grad_s, s, value=-0.6931471805599453 / EXPONENT_RESOLUTION)
        g_out = g_e.mul_(inward(below, above, g_e)).mul_(EXPONENT_RESOLUTION * scale)
        g_off = torch.zeros(n_off, dtype=g_out.dtype, device=g_out.device).index_add_(0, ids, g_out)
        g_out = g_out.unsqueeze(1)
        g_w3, g_b3 = g_out.t() @ h2, g_out.sum(0)
        g_z2 = _silu_backward(g_out * w3, z2)
        g_w2, g_b2 = g_z2.t() @ h1, g_z2.sum(0)
        g_z1 = _silu_backward(g_z2 @ w2, z1)
        g_w1, g_b1 = g_z1.t() @ features, g_z1.sum(0)
        _mark_after_backward(ctx.q_net)
        return None, None, None, g_off, g_w1, g_b1, g_w2, g_b2, g_w3, g_b3


def _mark_after_backward(q_net_ref) -> None:
    """Once this backward pass has accumulated every gradient, record the coefficients' marks
    (:meth:`QuantizationNetwork.mark_gradients`): the point a ``model.zero_grad()`` is measured from."""
    def mark():
        q_net = q_net_ref()
        if q_net is not None:
            q_net.mark_gradients(after_step=False)
    torch.autograd.Variable._execution_engine.queue_callback(mark)


def _silu_backward(grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """grad * silu'(z), silu'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z)))."""
    sig = torch.sigmoid(z)
    return grad.mul_(sig).mul_(torch.addcmul(torch.ones_like(z), z, 1 - sig))

