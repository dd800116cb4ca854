"""Step sizes and rounding: the one definition of the integer coefficients.

Bits are kept on a grid of 1/EXPONENT_RESOLUTION so that the per-frequency step
2^-bits is an integer "exponent" that the file stores exactly. The eval-mode
forward, the encoder, the decoder and the lazy loader all go through
:func:`integer_coefficients` and :func:`dequantize`, so they agree to the bit.
The training-time side lives here too: :func:`fake_quantize`, and the reusable
buffers (:func:`scratch`, :func:`fresh`) that keep the training step free of
page faults on the CPU.
"""
from __future__ import annotations

import math
import mmap
import sys
import threading

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "EXPONENT_RESOLUTION", "MIN_BITS", "MAX_BITS", "bits_to_exponent", "step_size",
    "fake_quantize", "integer_coefficients", "dequantize",
]

EXPONENT_RESOLUTION = 4  # quarter-bit steps: fine enough for rate control, cheap to store
MIN_BITS = -12.0         # step 4096 in the standardized domain: every coefficient rounds to 0
MAX_BITS = 24.0          # keeps |integer coefficient| well inside int32


def bits_to_exponent(bits: torch.Tensor) -> torch.Tensor:
    """Snap bits to the exponent grid (float tensor holding integers); straight-through gradient.

    The clamp to [MIN_BITS, MAX_BITS] passes the gradient outside the range too where it leads
    back in (:func:`inward`): with a plain clamp, bits that a strong rate phase (and Adam's
    momentum) carried past a bound would never receive a gradient again.
    """
    if torch.is_grad_enabled() and bits.requires_grad:
        b = _ClampInward.apply(bits) * EXPONENT_RESOLUTION
    else:
        b = bits.clamp(MIN_BITS, MAX_BITS) * EXPONENT_RESOLUTION
    return b + (torch.round(b) - b).detach()


def inward(below: torch.Tensor, above: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Where a clamp's gradient passes: inside the range, and outside it where gradient descent
    (a step along ``-grad``) moves the value back towards the range."""
    return ~((below & (grad >= 0)) | (above & (grad <= 0)))


class _ClampInward(torch.autograd.Function):
    """``bits.clamp(MIN_BITS, MAX_BITS)`` with the gradient of :func:`inward`."""

    @staticmethod
    def forward(ctx, bits):
        ctx.save_for_backward(bits < MIN_BITS, bits > MAX_BITS)
        return bits.clamp(MIN_BITS, MAX_BITS)

    @staticmethod
    def backward(ctx, grad):
        below, above = ctx.saved_tensors
        return grad * inward(below, above, grad)


def step_size(exponent: torch.Tensor) -> torch.Tensor:
    """Quantization step 2^(-exponent / EXPONENT_RESOLUTION), float32 (float64 for float64 models)."""
    e = exponent if exponent.is_floating_point() else exponent.to(torch.float32)
    return torch.exp2(-e / EXPONENT_RESOLUTION)


_SCRATCH = threading.local()
_SCRATCH_MIN = 1 << 16  # elements; below this a fresh tensor is cheaper than the bookkeeping


def scratch(slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable 1-D work buffer of ``numel`` elements for temporaries of the training step.

    On the CPU every fresh tensor above glibc's mmap threshold (32 MB at most) is new
    memory that the kernel zero-fills page by page: for MiniLM's embedding that costs
    about 4x the arithmetic of the pass that writes it, several times per step. The
    training kernels therefore keep their full-size temporaries here (one buffer per
    slot, grown to the largest tensor, per thread). A scratch view must never escape
    the function that asked for it. Small buffers come from the allocator's free lists
    anyway, and other devices have caching allocators: those get a plain ``empty``.
    """
    if numel < _SCRATCH_MIN or device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    store = getattr(_SCRATCH, "buffers", None)
    if store is None:
        store = _SCRATCH.buffers = {}
    buf = store.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        buf = store[(slot, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


_POOL_MIN = 1 << 22     # elements (16 MB in float32): smaller tensors are reused from the heap by malloc itself
_POOL_DEPTH = 4         # buffers kept per size: the forward's weight, the gradient, the rate's gradient, one spare
_PRIVATE_MAP = getattr(mmap, "MAP_PRIVATE", None)  # POSIX only: elsewhere fresh() is plain torch.empty


def fresh(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape)`` whose memory is recycled between training steps for big CPU tensors.

    Unlike :func:`scratch`, the result may escape (it is a weight or a gradient). The pool
    keeps anonymous memory maps, not tensors: a tensor handed out is ``torch.frombuffer``
    over one, whose storage alone holds the map (one extra reference, dropped when the
    storage dies, views and ``.grad`` included), so the map is handed out again only when
    no tensor anywhere uses it, and the tensor owns its storage like any fresh one (autograd
    then adds a second gradient into it in place instead of allocating the sum). This saves
    the page faults of a fresh mapping, several per step for an embedding matrix (see
    :func:`scratch`): ~18 ms for MiniLM's 47 MB table.
    """
    numel = math.prod(shape)
    if numel < _POOL_MIN or device.type != "cpu" or _PRIVATE_MAP is None:
        return torch.empty(shape, dtype=dtype, device=device)
    pools = getattr(_SCRATCH, "pools", None)
    if pools is None:
        pools = _SCRATCH.pools = {}
    entries = pools.setdefault((numel, dtype), [])
    for i in range(len(entries)):
        if sys.getrefcount(entries[i]) == 2:  # the list's reference and the argument's: free
            return _over(entries[i], dtype, numel, shape)
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    buf = mmap.mmap(-1, nbytes, flags=_PRIVATE_MAP | mmap.MAP_ANONYMOUS)
    if len(entries) < _POOL_DEPTH:
        entries.append(buf)
    return _over(buf, dtype, numel, shape)


def _over(buf, dtype: torch.dtype, numel: int, shape: tuple) -> torch.Tensor:
    """A tensor of ``shape`` over the memory of ``buf``, sole owner of its storage: reshaped in
    place (``resize_`` to the same size never reallocates), as a view or ``set_`` would share it."""
    return torch.frombuffer(buf, dtype=dtype, count=numel).resize_(shape)


def release_buffers() -> None:
    """Drop this thread's :func:`scratch` and :func:`fresh` buffers (they are kept between steps on purpose)."""
    _SCRATCH.__dict__.clear()


def rounding_residual(coeffs: torch.Tensor, step: torch.Tensor, leak: float, slot: int = 0) -> torch.Tensor:
    """``(round(x) - x) * (1 - leak)`` for ``x = coeffs / step``, in scratch ``slot`` and ``slot + 1``."""
    n = coeffs.numel()
    x = torch.div(coeffs, step, out=scratch(slot, n, coeffs.dtype, coeffs.device).view(coeffs.shape))
    r = torch.round(x, out=scratch(slot + 1, n, coeffs.dtype, coeffs.device).view(coeffs.shape)).sub_(x)
    return r.mul_(1.0 - leak) if leak else r


class _FakeQuantize(torch.autograd.Function):
    """``step * (x + (1 - leak) * (round(x) - x))`` for ``x = coeffs / step``; gradients as in :func:`fake_quantize`.

    Three passes forward and nothing full-size saved: the backward passes the gradient
    to ``coeffs`` unchanged and recomputes the rounding residual (in scratch) only
    when ``step`` needs its gradient.
    """

    @staticmethod
    def forward(ctx, coeffs, step, leak):
        out = torch.div(coeffs, step)
        if leak:
            x = scratch(0, out.numel(), out.dtype, out.device).view(out.shape).copy_(out)
            torch.lerp(x, out.round_(), 1.0 - leak, out=out)
        else:
            out.round_()
        ctx.save_for_backward(coeffs, step)
        ctx.leak = leak
        return out.mul_(step)

    @staticmethod
    @once_differentiable  # no graph through these in-place kernels: create_graph=True gives first-order grads
    def backward(ctx, grad):
        coeffs, step = ctx.saved_tensors
        grad_step = None
        if ctx.needs_input_grad[1]:
            r = rounding_residual(coeffs, step, ctx.leak).mul_(grad)
            grad_step = r.sum_to_size(step.shape)
            if grad_step.data_ptr() == r.data_ptr():  # nothing was summed: never hand out scratch
                grad_step = grad_step.clone()
        return (grad if ctx.needs_input_grad[0] else None), grad_step, None


def fake_quantize(coeffs: torch.Tensor, step: torch.Tensor, leak: float = 0.0) -> torch.Tensor:
    """Training-time quantization: ``round(x) + leak * (x - round(x))`` for ``x = coeffs / step``, times ``step``.

    The seed's ``leaky_floor`` passed only ``leak`` (0.01) of the gradient, which starves
    the coefficients. Here the gradient reaches ``coeffs`` unchanged (straight-through), and
    because the rounding residual ``r`` stays attached to ``step`` (``coeffs + r * step``),
    the task loss also tells the bit allocation when a step is too coarse (the gradient of
    learned step size quantization). ``step`` broadcasts against ``coeffs``.
    """
    if torch.broadcast_shapes(coeffs.shape, step.shape) == coeffs.shape:
        return _FakeQuantize.apply(coeffs, step, float(leak))
    with torch.no_grad():  # a step wider than the coefficients (never from lsc itself): plain autograd
        x = coeffs / step
        r = torch.round(x).sub_(x).mul_(1.0 - leak)
    return coeffs + r * step


def integer_coefficients(coeffs: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The stored symbols: round(coeffs / step) as int64."""
    return torch.round(coeffs / step).to(torch.int64)


def dequantize(q: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Integer coefficients back to (quantized) transform coefficients in step's dtype."""
    return q.to(step.dtype) * step
