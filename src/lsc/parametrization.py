"""The spectral reparameterization of one tensor, as a ``torch.nn.utils.parametrize`` module.

``right_inverse`` turns a weight into standardized block-DCT coefficients (the new
trainable parameter); ``forward`` quantizes them with steps chosen by the shared
quantization network and transforms back. Because it is a parametrization, the
user's module keeps its class, forward, hooks and attribute access.
"""
from __future__ import annotations

import math
import warnings
import weakref

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.autograd.function import once_differentiable

from .blocking import BlockLayout, to_blocks
from .errors import LscError, outside_stacklevel
from .grouping import position_groups
from .morton import morton_order
from .precision import full_precision
from .qnet import _SHARED, QuantizationNetwork, position_features
from .quantizer import bits_to_exponent, integer_coefficients, step_size
from .reconstruct import compute_dtype_for, reconstruct
from .training import quantized_synthesis, synthesis_gradients
from .transforms import TRANSFORMS, block_transform, get_transform

__all__ = ["SpectralParametrization"]

# parametrization -> (tensors its weight was computed from, their versions, the weight, its version);
# outside the module so that deepcopy, pickling and state_dict never see it
_CONSTANT: "weakref.WeakKeyDictionary[SpectralParametrization, tuple]" = weakref.WeakKeyDictionary()


def _forget_computed(optimizer, args, kwargs) -> None:
    """After an optimizer step, drop the kept weights and q_net outputs computed from the tensors it stepped.
    Their cache keys are tensor versions, which fused optimizers (``Adam(fused=True)``) do not bump."""
    if not _CONSTANT and not _SHARED:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
    for par, hit in list(_CONSTANT.items()):
        if any(id(t) in stepped for t in hit[0]):
            _CONSTANT.pop(par, None)
    for q_net in list(_SHARED.keys()):  # see QuantizationNetwork._drop_stale_gradients for the marks
        if any(id(p) in stepped for p in q_net.current_parameters()):
            _SHARED.pop(q_net, None)
            q_net.mark_gradients()
        elif q_net.steps_coefficients(stepped):  # the model stepped without q_net: q_net adds up over several steps
            q_net.__dict__.pop("_marks", None)


register_optimizer_step_post_hook(_forget_computed)


class SpectralParametrization(nn.Module):
    """weight = std * IDCT(quantize(coefficients, 2^-bits)) + mean, blockwise."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, block_shape: tuple[int, ...],
                 tensor_id: int, num_tensors: int, q_net: QuantizationNetwork, *, leak: float = 0.0,
                 min_group_symbols: int = 1024, transform: str = "dct"):
        super().__init__()
        self.name = name
        self.layout = BlockLayout(tuple(shape), tuple(block_shape))
        self.orig_dtype = dtype
        self.tensor_id = int(tensor_id)
        self.leak = float(leak)
        try:  # an unknown name fails here, before the model is touched
            get_transform(transform)
        except ValueError as e:
            raise LscError(f"{name}: {e}") from None
        self.transform = transform
        cdtype = compute_dtype_for(dtype)
        self.register_buffer("mean", torch.zeros((), dtype=cdtype))
        self.register_buffer("std", torch.ones((), dtype=cdtype))
        self.num_tensors, self.min_group_symbols = int(num_tensors), int(min_group_symbols)  # to rebuild the tables
        self.register_buffer("features", position_features(tensor_id, num_tensors, self.layout), persistent=False)
        groups = position_groups(self.layout, min_group_symbols)
        self.num_groups = int(groups.max()) + 1
        self.register_buffer("groups", torch.from_numpy(groups), persistent=False)
        self.register_buffer("scan_order", torch.from_numpy(np.array(morton_order(self.layout.block_shape))), persistent=False)
        # Set by lsc.load(path, spectral_model): exponents read from a file override q_net's (None = use q_net).
        # In the state dict when set, so a checkpoint of a model fine-tuned at a file's steps resumes at them.
        self.register_buffer("frozen_exponent", None)
        self.edited_in_place = False  # set by lsc.spectral for a layer that edits its weight in place (see _own_copy)
        object.__setattr__(self, "q_net", q_net)  # shared by all tensors; deliberately not a submodule

    # -- model.to(device) carries the shared q_net along (device only, never dtype); a dtype cast
    # (model.half(), .to(torch.bfloat16), .double()) sets the weight's dtype, as it would for a plain model
    def _apply(self, fn, *args, **kwargs):
        _CONSTANT.pop(self, None)  # a kept weight of the old device or dtype must not outlive the move
        probe = fn(torch.zeros(0, device=self.features.device, dtype=self.orig_dtype))
        form = self.__dict__.get("_original_form")
        if form is not None:  # the coefficients are cast with the model: right_inverse must give their new dtype
            form[1] = fn(torch.zeros(0, device=self.features.device, dtype=form[1])).dtype
        # a tied tensor's parametrization belongs to two modules and sees every cast twice: all its own tensors,
        # index tables included, are put back after each (to_empty would otherwise re-empty them the second time)
        own = {name: getattr(self, name) for name in ("mean", "std", "features", "frozen_exponent", "groups", "scan_order")}
        result = super()._apply(fn, *args, **kwargs)
        if probe.is_floating_point():
            # lsc's own state stays at full precision: half-precision statistics would move every decoded
            # weight, and q_net reads its float32 features. (The coefficients, like any parameter, are cast.)
            # Restored on every floating cast, not only the first: a tied tensor's parametrization belongs to
            # two modules, so it sees the same cast twice.
            self.orig_dtype = probe.dtype
            cdtype = compute_dtype_for(probe.dtype)
            if any(t is not None and t.is_meta for t in own.values()) and not probe.is_meta:
                own = self._rebuilt(own, probe.device)  # to_empty after .to("meta"): the tables are built again
            for name, t in own.items():
                if t is not None:
                    setattr(self, name, t.to(device=probe.device, dtype=cdtype if name in ("mean", "std") else t.dtype))
        q_net = self.__dict__["q_net"]
        q_device = next(q_net.parameters()).device
        if q_device != probe.device:
            if q_device.type == "meta":  # its values come back with the model's state dict, as the model's do
                q_net.to_empty(device=probe.device)
            else:
                q_net.to(probe.device)
        return result

    def _rebuilt(self, own: dict, device) -> dict:
        """Own tensors and tables of a parametrization whose tensors were on the meta device: the position tables
        (features, groups, scan order) rebuilt from the layout, the statistics and frozen exponents as
        placeholders that ``load_state_dict`` fills, as ``to_empty`` leaves every parameter."""
        fe = own["frozen_exponent"]
        return dict(mean=torch.zeros((), dtype=own["mean"].dtype, device=device),
                    std=torch.ones((), dtype=own["std"].dtype, device=device),
                    features=position_features(self.tensor_id, self.num_tensors, self.layout).to(device),
                    frozen_exponent=None if fe is None else torch.zeros(fe.shape, dtype=fe.dtype, device=device),
                    groups=torch.from_numpy(position_groups(self.layout, self.min_group_symbols)).to(device),
                    scan_order=torch.from_numpy(np.array(morton_order(self.layout.block_shape))).to(device))

    # The transform is in the state dict: coefficients of another transform have the same shape, and loading
    # them would give silently wrong weights (a block-shape mismatch already fails on the shapes).
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(list(self.transform.encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        try:
            saved = bytes(state.detach().cpu().to(torch.uint8).tolist()).decode()
        except (AttributeError, TypeError, ValueError, RuntimeError):
            raise LscError(f"{self.name}: the checkpoint's transform entry is not one lsc wrote: {state!r}") from None
        if saved != self.transform and TRANSFORMS.get(saved) != TRANSFORMS[self.transform]:  # aliases are one transform
            raise LscError(f"{self.name}: the checkpoint's coefficients are of the {saved!r} transform, this model's of "
                           f"{self.transform!r}; call lsc.spectral with transform={saved!r} (the options of the run "
                           "that wrote it) before load_state_dict")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """A checkpoint's ``frozen_exponent`` is adopted even where this model has none (a fresh
        ``lsc.spectral`` model resuming a fine-tune at a file's steps); a checkpoint without one
        (written before it was saved, or by a model quantizing at q_net's steps) leaves it as it is.
        A checkpoint without the transform (written before it was saved) is taken to be of this one."""
        key = prefix + "frozen_exponent"
        saved = state_dict.pop(key, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for k in (key, prefix + "_extra_state"):
            if k in missing_keys:
                missing_keys.remove(k)
        if saved is None:
            return
        problem = self._exponent_problem(saved)
        if problem:
            error_msgs.append(f"{self.name}: {key} {problem}")
            return
        self.frozen_exponent = saved.detach().to(device=self.mean.device, dtype=torch.float32).clone()
        _CONSTANT.pop(self, None)

    def _exponent_problem(self, e) -> str | None:
        """Why ``e`` cannot be this tensor's frozen exponents (None when it can)."""
        from .codec.entropy import MAX_EXPONENT  # the file's bound (imported here: the codec imports this module)
        if not isinstance(e, torch.Tensor) or not (e.is_floating_point() or e.dtype == torch.int64):
            return "must be a float or int64 tensor"
        if tuple(e.shape) != (self.layout.block_numel,):
            return f"has shape {tuple(e.shape)}, expected ({self.layout.block_numel},) (one exponent per block position)"
        e = e.detach().double()
        if not bool((torch.isfinite(e) & (e == e.round()) & (e.abs() <= MAX_EXPONENT)).all()):
            return f"must hold integers in [-{MAX_EXPONENT}, {MAX_EXPONENT}]"
        return None

    def exponent(self) -> torch.Tensor:
        """Integer-valued float exponents per in-block position (row-major), straight-through to q_net."""
        if self.frozen_exponent is not None:
            return self.frozen_exponent
        return bits_to_exponent(self.q_net(self.features, self.tensor_id))

    def step(self, exponent: torch.Tensor) -> torch.Tensor:
        return step_size(exponent).to(self.mean.dtype).reshape(self.layout.block_shape)

    @full_precision
    def integer_state(self, coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer coefficients, int64 exponents): exactly what the file stores.

        Non-finite or out-of-range coefficients or exponents raise LscError naming the
        tensor instead of casting garbage to int64 (the eval forward, which must not
        synchronize with the device, NaN-fills instead: see :meth:`decoded_weight`).
        """
        c, ef = self._quantization_inputs(coeffs)
        self._check_storable(c, ef)
        e = ef.to(torch.int64)
        return integer_coefficients(c, self.step(e)), e

    def _quantization_inputs(self, coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(coefficients in the compute dtype, exponents as integer-valued floats), both without a graph."""
        # detached inputs rather than a no_grad region: torch.export records such a region as a
        # set-grad wrapper that torch.export.save cannot serialize (see _exported_weight)
        return coeffs.detach().to(self.mean.dtype), self.exponent().detach()

    def _check_storable(self, c: torch.Tensor, ef: torch.Tensor) -> None:
        """LscError naming this tensor unless every coefficient is finite and fits an integer at its step."""
        if not bool(torch.isfinite(ef).all()):
            raise LscError(f"{self.name}: the quantization network produced NaN/Inf step sizes (training diverged?)")
        if not c.numel():
            return
        lo, hi = torch.aminmax(c)  # one reduction pass (NaN propagates); isfinite(c).all() costs several
        largest = torch.maximum(-lo, hi)
        if not bool(torch.isfinite(largest)):
            raise LscError(f"{self.name}: spectral coefficients contain NaN or Inf (training diverged?)")
        step = self.step(ef.to(torch.int64))
        # a bound first (largest |c| over the finest step); the exact per-position test only when it trips
        if float(largest / step.min()) >= 2.0 ** 52 and float((c.abs() / step).max()) >= 2.0 ** 52:
            raise LscError(f"{self.name}: a spectral coefficient is too large to store as an integer at this step size")

    def _training_step(self) -> torch.Tensor:
        """Steps (P,) of the training forward: from q_net's one batched evaluation per step when it has one."""
        step = self.q_net.shared_step(self.tensor_id) if self.frozen_exponent is None else None
        if step is None:
            step = step_size(self.exponent())
        return step.to(self.mean.dtype).reshape(-1)

    def forward(self, *originals: torch.Tensor) -> torch.Tensor:
        """The weight (see :meth:`_weight`); traced by ``torch.export`` and ``torch.jit.trace`` as below.

        ``torch.export`` records the decoding itself (integer coefficients, inverse transform),
        so the exported program computes the same weights, bit for bit, from the same
        parameters; a program holding dense weights instead comes from :func:`lsc.to_dense`
        first. ``torch.jit.trace`` records the decoded weight as a constant.
        """
        if torch.compiler.is_exporting():
            return self._exported_weight(originals[0])
        if torch.jit.is_tracing():
            if self.training:
                raise LscError(f"{self.name}: torch.jit.trace of a spectral model in train mode is not supported; "
                               "call model.eval() first (the traced weights are then the decoded ones)")
            return _untraced(self._kept, originals[0])
        return self._weight(*originals)

    @full_precision
    def _exported_weight(self, coeffs: torch.Tensor) -> torch.Tensor:
        """The weight as ``torch.export`` records it: no cache (its tensors are fake), no custom kernels."""
        if torch.compiler.is_dynamo_compiling():  # strict mode: dynamo cannot follow q_net, which is no submodule
            raise LscError(f"{self.name}: torch.export(strict=True) cannot trace a spectral model; use strict=False "
                           "(the default), or export the dense model that lsc.to_dense(model) gives")
        if self.training:
            raise LscError(f"{self.name}: torch.export of a spectral model in train mode is not supported; "
                           "call model.eval() first (the exported weights are then the decoded ones)")
        return self.decoded_weight(coeffs)  # no no_grad region: export records one as a wrapper export.save cannot write

    # Under torch.compile the weight is computed eagerly (a graph break at each weight access): its
    # kernels write through out= views and reuse buffers, which tracing cannot follow, and the
    # cached q_net / rate state is Python-side. The user's layers around it still compile.
    @torch.compiler.disable
    @full_precision
    def _weight(self, *originals: torch.Tensor) -> torch.Tensor:
        """The weight: the training synthesis in train mode, the decoded (file) weight in eval mode.

        Gradients follow PyTorch's rules, not the mode: whenever autograd is on and the
        coefficients or the steps can learn, the weight is differentiable. In eval mode its value
        is still the decoded weight, bit for bit, and its gradient is the training forward's
        (:class:`_DecodedWithGradient`); otherwise a model fine-tuned in eval mode (Hugging
        Face's ``from_pretrained`` returns one) would silently learn nothing from its task loss.

        A weight with no graph to record (eval mode or ``no_grad`` or frozen coefficients and
        steps) is computed once and reused until something it reads changes: a validation
        loop would otherwise redo the whole synthesis per forward. The cache is keyed on the
        identity and ``_version`` of every tensor the weight reads (optimizer steps,
        ``load_state_dict`` and ``.to()`` all invalidate it) and on the weight's own version
        (an in-place edit of the returned tensor is not reused).
        """
        coeffs = originals[0]
        graph = torch.is_grad_enabled() and (coeffs.requires_grad or self._steps_learn())
        if graph and self.training:  # the training step: checked first, it is the hot path
            if _CONSTANT:  # a stale weight must not stay alive through training
                _CONSTANT.pop(self, None)
            return self._own_copy(self._compute(coeffs))
        w = self._kept(coeffs)
        if graph:
            return self._own_copy(_DecodedWithGradient.apply(w, coeffs, self._training_step(), self))
        return w

    def _own_copy(self, w: torch.Tensor) -> torch.Tensor:
        """``w``, copied for layers that edit their weight in place (an Embedding with ``max_norm``
        renormalizes the rows it looks up): autograd forbids in-place edits of a custom Function's
        output views, which is what the synthesis returns."""
        return w.clone() if self.edited_in_place else w

    def _steps_learn(self) -> bool:
        """Whether the steps this weight is quantized with carry gradients (to q_net)."""
        return self.frozen_exponent is None and any(t.requires_grad for t in self.q_net.current_parameters())

    def _kept(self, coeffs: torch.Tensor) -> torch.Tensor:
        """The weight of the current mode without a graph, from the cache when nothing it reads changed."""
        # Under torch.inference_mode (Lightning's validation loop, serving code) the weight is still computed
        # as an ordinary tensor, so it has a version counter and may be kept; only weights read from inference
        # tensors (a model created in inference mode) have nothing to key on and are recomputed.
        with torch.inference_mode(False), torch.no_grad():  # this order: leaving inference mode turns grad on
            source = (self.frozen_exponent,) if self.frozen_exponent is not None else self.q_net.current_parameters()
            inputs = (coeffs, self.mean, self.std) + tuple(source)
            if any(t.is_inference() for t in inputs):
                return self._compute(coeffs)
            versions = (self.training,) + tuple((t._version, t.data_ptr()) for t in inputs)
            hit = _CONSTANT.get(self)
            if hit is not None and hit[1] == versions and all(a is b for a, b in zip(hit[0], inputs)):
                if hit[2]._version == hit[3]:
                    return hit[2]
                self._warn_edit_lost()
            w = self._compute(coeffs)
            _CONSTANT[self] = (inputs, versions, w, w._version)
            return w

    def _warn_edit_lost(self) -> None:
        """Say (once per tensor) that an in-place edit of the computed weight was dropped: ``nn.init.*_``,
        ``reset_parameters()`` or ``weight.copy_(W)`` write into a tensor the coefficients are decoded into
        again, as with any parametrization. Layers that edit their own weight (``Embedding(max_norm)``) are
        expected to, and are not warned about."""
        if self.edited_in_place or self.__dict__.get("_edit_warned"):
            return
        self.__dict__["_edit_warned"] = True
        warnings.warn(f"lsc: {self.name} was edited in place (nn.init, reset_parameters, weight.copy_?), which a "
                      "spectral weight does not keep: it is decoded from its coefficients at each use. Assign it "
                      f"instead (module.{self.name.rpartition('.')[2]} = new_weight, which re-analyzes it), or "
                      "initialize before lsc.spectral", stacklevel=outside_stacklevel())

    def _training_weight(self, coeffs: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """The training forward: quantized at ``step`` (P,) through the leaky rounding, then synthesized."""
        return quantized_synthesis(coeffs.to(step.dtype), step, self.layout, self.mean, self.std,
                                   self.orig_dtype, self.transform, self.leak)

    def _compute(self, coeffs: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self._training_weight(coeffs, self._training_step())
        return self.decoded_weight(coeffs)

    def decoded_weight(self, coeffs: torch.Tensor, check: bool = False) -> torch.Tensor:
        """The eval weight: the file's integers through :func:`reconstruct` (no graph to the coefficients).

        ``check``: raise LscError naming the tensor on non-finite coefficients or steps (see
        :meth:`integer_state`) instead of giving NaN weights, as the eval forward does (no host sync).
        """
        c, ef = self._quantization_inputs(coeffs)
        mean = self.mean
        if check:
            self._check_storable(c, ef)
        elif c.numel():
            # NaN/Inf coefficients would round to garbage integers: a NaN mean makes every weight NaN, never
            # silently wrong (NaN exponents already yield infinite steps, hence NaN weights). A where() keeps the
            # mean's bits, and one reduction is far cheaper than isfinite() and a masked copy of the weight.
            lo, hi = torch.aminmax(c)  # NaN propagates
            mean = torch.where(torch.isfinite(lo) & torch.isfinite(hi), mean, float("nan"))
        # the file's integers, rounded chunk by chunk inside reconstruct (the same values as integer_state's,
        # held in floats), rather than an int64 copy of the whole tensor first
        return reconstruct(c, ef.to(torch.int64), self.layout, mean, self.std, self.orig_dtype, self.transform,
                           rounding=True)

    @torch.no_grad()
    @full_precision
    def right_inverse(self, weight: torch.Tensor):
        """Weight -> coefficients; a 1-tuple when the dtype changes (fp16/bf16 models keep fp32 coefficients).

        The first call (registration) fixes the form parametrize stores them in (``original`` or
        ``original0``); later assignments (``layer.weight = W``, ``functional_call`` with a dense key) keep
        that form and the coefficients' current dtype, also after the model was cast (``model.half()``)."""
        coeffs = self._analyze(weight)
        form = self.__dict__.get("_original_form")
        if form is None:
            form = self.__dict__["_original_form"] = [coeffs.dtype != weight.dtype, coeffs.dtype]
        coeffs = coeffs.to(form[1])
        return (coeffs,) if form[0] else coeffs

    def _analyze(self, weight: torch.Tensor) -> torch.Tensor:
        coeffs, mean, std = self.analysis(weight)
        self.mean.copy_(mean)
        self.std.copy_(std)
        return coeffs

    @torch.no_grad()
    @full_precision
    def analysis(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(coefficients, mean, std) of a dense weight, leaving this parametrization's state alone."""
        if tuple(weight.shape) != self.layout.shape:
            raise LscError(f"{self.name}: cannot assign a tensor of shape {tuple(weight.shape)} to a spectral parameter of shape {self.layout.shape}")
        if weight.is_meta:
            raise LscError(f"{self.name}: is on the meta device; materialize the model (e.g. to_empty + load weights) before lsc.spectral")
        w = weight.detach().to(self.mean.dtype)
        if not bool(torch.isfinite(w).all()):
            raise LscError(f"{self.name}: contains NaN or Inf; lsc cannot compress non-finite weights")
        mean = w.mean() if w.numel() else torch.zeros((), dtype=w.dtype, device=w.device)
        std = w.std(unbiased=False) if w.numel() > 1 else torch.ones((), dtype=w.dtype, device=w.device)
        if not bool(torch.isfinite(mean) & torch.isfinite(std)):  # finite weights whose float32 sums overflow (~1e35)
            w64 = w.double()
            mean, std = w64.mean().to(w.dtype), w64.std(unbiased=False).to(w.dtype)
        if not bool(torch.isfinite(std)):
            raise LscError(f"{self.name}: the weights are too large to standardize (their standard deviation "
                           f"overflows {w.dtype}); scale the tensor down before lsc.spectral")
        if not bool(std > 0):
            std = torch.ones_like(std)
        coeffs = block_transform(to_blocks((w - mean) / std, self.layout), self.layout.block_shape, self.transform)
        # decoding multiplies coefficients by the step and std before the inverse transform: near the largest
        # float that product overflows and the decoded weights would be Inf/NaN, silently
        largest = float(coeffs.abs().max()) if coeffs.numel() else 0.0
        if not math.isfinite(largest) or 2.0 * largest * float(std) >= torch.finfo(w.dtype).max:
            raise LscError(f"{self.name}: the weights (up to {float(w.abs().max()):.3g}) are too close to the largest "
                           f"{w.dtype} for lsc's transforms, which would overflow; scale the tensor down before lsc.spectral")
        return coeffs, mean, std

    def extra_repr(self) -> str:
        return f"{self.name}: shape={self.layout.shape}, block={self.layout.block_shape}, {self.transform}, groups={self.num_groups}"


def _untraced(fn, *args):
    """``fn(*args)`` with ``torch.jit.trace``'s recording paused: its result enters the trace as a constant.

    The decoded weight reads q_net's parameters, which are no input of the traced module, so
    recording its computation would fail; PyTorch's own tracer exposes no public switch for this.
    """
    get, set_ = getattr(torch._C, "_get_tracing_state", None), getattr(torch._C, "_set_tracing_state", None)
    if get is None or set_ is None:  # a PyTorch without them: the trace then fails as it did before
        return fn(*args)
    state = get()
    set_(None)
    try:
        return fn(*args)
    finally:
        set_(state)


class _DecodedWithGradient(torch.autograd.Function):
    """``weight`` (the decoded weight) as the value, the training synthesis's gradient for ``coeffs`` and ``step``.

    The forward costs nothing beyond the decoded weight (kept between calls); the backward
    runs the training synthesis's backward kernels (:func:`lsc.training.synthesis_gradients`),
    or differentiates the synthesis redone where those do not apply.
    """

    @staticmethod
    def forward(ctx, weight, coeffs, step, par):
        ctx.save_for_backward(coeffs, step)
        ctx.par = par
        return weight.view_as(weight)  # a view: the kept weight itself never joins a graph

    @staticmethod
    @once_differentiable
    @full_precision
    def backward(ctx, grad):
        coeffs, step = ctx.saved_tensors
        need = ctx.needs_input_grad[1:3]
        par = ctx.par
        got = synthesis_gradients(grad, coeffs.to(step.dtype), step, par.layout, par.std, par.orig_dtype,
                                  par.transform, par.leak, need[1])
        if got is not None:  # the training synthesis's own backward kernels, without its forward
            return None, got[0].to(coeffs.dtype) if need[0] else None, got[1], None
        with torch.enable_grad():
            c, s = (t.detach().requires_grad_(n) for t, n in zip((coeffs, step), need))
            w = ctx.par._training_weight(c, s)
            got = iter(torch.autograd.grad(w, [t for t, n in zip((c, s), need) if n], grad))  # densified there
        return None, *(next(got) if n else None for n in need), None
