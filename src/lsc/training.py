"""The training-mode forward of one spectral tensor, in as few passes over its coefficients as possible.

``weight = mean + std * IDCT(step * round(coefficients / step))`` written naively is
about ten full-size passes forward and as many backward, most of them allocating.
For the DCT, whose block transform is one (P, P) matrix product (the Kronecker
product of the per-dim DCT matrices), :class:`_QuantizedSynthesis` instead folds
``step`` and ``std`` into that small matrix: forward is divide, round, residual,
one GEMM (that also adds the mean) and one strided copy into the weight's layout;
backward is one strided copy, one GEMM and, for the step's gradient, one product
with the kept residual and a column sum. Temporaries live in reused buffers and
big outputs in recycled memory (:func:`lsc.quantizer.scratch`, :func:`lsc.quantizer.fresh`).
On the CPU, tensors of 1M+ coefficients go through forward and backward in chunks of block
rows (``_CHUNK``) whose temporaries stay in the cache.
Blocks too large for one matrix (conv kernels such as 8x8x3x3) use two smaller
Kronecker factors instead. Other transforms take the generic path (fused fake
quantization, then ``synthesize``).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .blocking import BlockLayout
from .precision import full_precision
from .quantizer import fake_quantize, fresh, scratch
from .reconstruct import synthesize
from .transforms import KRON_MAX_POSITIONS, inverse_matrix

__all__ = ["quantized_synthesis", "synthesis_gradients"]


class _Plan(NamedTuple):
    """Shapes of one layout, computed once (the training step runs thousands of times)."""

    n: int                      # blocks
    p: int                      # positions per block
    coeff_shape: tuple          # (grid..., block...)
    padded: tuple               # grid * block per dim
    interleaved: tuple          # (n_1, b_1, n_2, b_2, ...)
    perm: tuple                 # interleaved -> (grid..., block...)
    natural: bool               # blocks are already in the weight's memory order (1-D, one block column, 1 x b rows)
    ragged: int                 # 0: no padding, 1: only the leading dim is padded, 2: others too
    split: int                  # block dims [:split] and [split:] form two Kronecker factors (0: one matrix)


@lru_cache(maxsize=None)
def _plan(layout: BlockLayout) -> _Plan:
    grid, block, shape = layout.grid, layout.block_shape, layout.shape
    k = len(block)
    padded = tuple(n * b for n, b in zip(grid, block))
    ragged = 0 if padded == shape else (1 if padded[1:] == shape[1:] else 2)
    split = 0
    if layout.block_numel > KRON_MAX_POSITIONS:  # the cheapest split into two factors that are small enough
        costs = [(math.prod(block[:j]) + math.prod(block[j:]), j) for j in range(1, k)
                 if max(math.prod(block[:j]), math.prod(block[j:])) <= KRON_MAX_POSITIONS]
        split = min(costs)[1] if costs else -1
    return _Plan(layout.num_blocks, layout.block_numel, layout.coeff_shape, padded,
                 tuple(v for nb in zip(grid, block) for v in nb),
                 tuple(range(0, 2 * k, 2)) + tuple(range(1, 2 * k, 2)), _natural(grid, block), ragged, split)


def _natural(grid: tuple, block: tuple) -> bool:
    """Whether (grid..., block...) order is the padded weight's own memory order, (n_1, b_1, ..., n_k, b_k):
    every block dim but the last must have size 1 or only grid dims of size 1 after it (so 1-D tensors,
    a single block column, and blocks of whole rows such as 1 x 64 for an embedding table need no copies)."""
    return all(b == 1 or math.prod(grid[i + 1:]) == 1 for i, b in enumerate(block[:-1]))


def _blocked_view(x: torch.Tensor, grid, block) -> torch.Tensor:
    """View of a contiguous tensor of shape (n_i * b_i) as (grid..., block...) (see :func:`lsc.blocking.to_blocks`)."""
    k = len(block)
    return x.view([v for nb in zip(grid, block) for v in nb]).permute(list(range(0, 2 * k, 2)) + list(range(1, 2 * k, 2)))


def _unblock(blocks: torch.Tensor, shape: tuple, plan: _Plan, dtype: torch.dtype) -> torch.Tensor:
    """The weight (``shape``, ``dtype``) from (num_blocks, P) blocks: at most one strided copy."""
    if plan.natural:
        full = blocks.view(plan.padded) if blocks.dtype == dtype else blocks.to(dtype).view(plan.padded)
    else:
        full = fresh(plan.padded, dtype, blocks.device)
        full.view(plan.interleaved).permute(plan.perm).copy_(blocks.view(plan.coeff_shape))
    if plan.ragged == 0:
        return full
    if plan.ragged == 1:  # only the leading dim is ragged: the weight is a contiguous prefix
        return full[: shape[0]]
    return full[tuple(slice(0, s) for s in shape)].contiguous()


def _blocks_of(w: torch.Tensor, layout: BlockLayout, plan: _Plan, slot: int) -> torch.Tensor:
    """(num_blocks, P) blocks of ``w`` (``layout.shape``) with zeros in the padding; a view when possible."""
    w = w.contiguous()
    if plan.natural and plan.ragged == 0:
        return w.view(plan.n, plan.p)
    out = scratch(slot, plan.n * plan.p, w.dtype, w.device)
    o = out.view(plan.coeff_shape)
    if plan.ragged == 0:
        o.copy_(w.view(plan.interleaved).permute(plan.perm))
    elif plan.ragged == 1:
        # ragged leading dim (e.g. a vocabulary): whole block rows, then the partial one and its zeros
        grid, block = layout.grid, layout.block_shape
        full, rem = divmod(layout.shape[0], block[0])
        if full:
            o[:full].copy_(_blocked_view(w[: full * block[0]], (full,) + grid[1:], block))
        tail = o[full:]
        tail.zero_()
        tail.narrow(len(grid), 0, rem).copy_(_blocked_view(w[full * block[0]:], (1,) + grid[1:], (rem,) + block[1:]))
    else:
        buf = scratch(slot + 1, out.numel(), out.dtype, out.device).view(plan.padded).zero_()
        buf[tuple(slice(0, s) for s in layout.shape)].copy_(w)
        o.copy_(buf.view(plan.interleaved).permute(plan.perm))
    return out.view(plan.n, plan.p)


def _two_factor(x: torch.Tensor, lead: torch.Tensor, trail: torch.Tensor, bias, slot: int, out: torch.Tensor) -> torch.Tensor:
    """``out`` <- ``bias + lead^T X trail`` for every block X of x (num_blocks, L*T) seen as an (L, T) matrix.

    Two GEMMs around one transposing copy: a batched product with a broadcast (L, L)
    matrix is several times slower on the CPU.
    """
    L, T = lead.shape[0], trail.shape[0]
    n = x.shape[0]
    mid = torch.mm(x.view(n * L, T), trail, out=scratch(slot, n * L * T, x.dtype, x.device).view(n * L, T))
    mid_t = scratch(slot + 1, n * L * T, x.dtype, x.device).view(n, T, L).copy_(mid.view(n, L, T).transpose(1, 2))
    out_t = torch.mm(mid_t.view(n * T, L), lead, out=scratch(slot, n * L * T, x.dtype, x.device).view(n * T, L))
    torch.add(out_t.view(n, T, L).transpose(1, 2), bias, out=out.view(n, L, T))
    return out


class _Job(NamedTuple):
    """Everything about one tensor's training forward that is fixed between steps."""

    plan: _Plan
    layout: BlockLayout
    mats: tuple                 # synthesis matrix, or its two Kronecker factors
    dtype: torch.dtype          # the weight's dtype
    leak: float
    rows: int                   # leading grid rows per cache-sized chunk on the CPU (0: whole tensor at once)


_JOBS: dict = {}
_SMALL = 1 << 14  # elements
# Big tensors go through the forward and backward in chunks of about this many coefficients
# (whole rows of blocks): the temporaries of a chunk stay in the CPU cache, so each pass over
# the tensor reads its inputs and writes its outputs once (coefficients -> weight and residual;
# weight gradient and residual -> coefficient gradient) instead of about five full passes each.
_CHUNK = 1 << 18


def _job(layout: BlockLayout, transform: str, cdtype, device, dtype, leak: float) -> _Job | None:
    """The cached :class:`_Job` of a tensor, or None where the generic path applies."""
    key = (layout, transform, cdtype, device, dtype, leak)
    job = _JOBS.get(key, False)
    if job is False:
        plan, bs = _plan(layout), layout.block_shape
        mats = None
        if layout.shape and plan.split == 0:
            m = inverse_matrix(bs, transform, cdtype, device)
            mats = None if m is None else (m,)
        elif layout.shape and plan.split > 0:
            mats = (inverse_matrix(bs[: plan.split], transform, cdtype, device),
                    inverse_matrix(bs[plan.split:], transform, cdtype, device))
            mats = None if None in mats else mats
        rows = 0
        if mats is not None and plan.split == 0 and plan.ragged < 2 and plan.n * plan.p >= 4 * _CHUNK and layout.grid[0] > 1:
            rows = max(1, _CHUNK // (plan.n // layout.grid[0] * plan.p))
            rows = 0 if rows >= layout.grid[0] else rows
        job = _JOBS[key] = None if mats is None else _Job(plan, layout, mats, dtype, leak, rows)
    return job


def _rounded(c, step, leak: float, x_out=None, q_out=None):
    """(x, q) with x = c / step and q = round(x), moved back towards x by ``leak``; into the given buffers."""
    x = torch.div(c, step, out=x_out)
    q = torch.round(x, out=q_out)
    if leak:
        q.lerp_(x, leak)
    return x, q


def _step_gradient(residual, grad_c, buf=None):
    """Per-position sum over blocks of residual * grad_c (the step's gradient; ``buf`` holds the product)."""
    return torch.mul(residual, grad_c, out=buf).sum(0)


def _weight_rows(full: torch.Tensor, layout: BlockLayout, r0: int, r1: int) -> torch.Tensor:
    """View of grid rows r0..r1-1 of the padded weight ``full`` as (rows, b_0, n_1, b_1, ...)."""
    b0 = layout.block_shape[0]
    return full[r0 * b0: r1 * b0].view([v for nb in zip((r1 - r0,) + layout.grid[1:], layout.block_shape) for v in nb])


def _chunked_forward(c, step, job: "_Job", mean, std, residual):
    """:class:`_QuantizedSynthesis` forward chunk by chunk (see ``_CHUNK``): -> weight; fills ``residual``."""
    plan, layout = job.plan, job.layout
    n, p = plan.n, plan.p
    per_row = n // layout.grid[0]
    width = job.rows * per_row * p
    x_buf, q_buf, b_buf = (scratch(k, width, c.dtype, c.device) for k in range(3))
    mat = (step * std).unsqueeze(1) * job.mats[0]
    full = fresh(plan.padded, c.dtype, c.device)
    perm = tuple(range(0, 2 * len(layout.grid), 2)) + tuple(range(1, 2 * len(layout.grid), 2))
    for r0 in range(0, layout.grid[0], job.rows):
        r1 = min(layout.grid[0], r0 + job.rows)
        a, b = r0 * per_row, r1 * per_row
        m = (b - a) * p
        x, q = _rounded(c[a:b], step, job.leak, x_buf[:m].view(b - a, p), q_buf[:m].view(b - a, p))
        if residual is not None:
            torch.sub(q, x, out=residual[a:b])
        rows = _weight_rows(full, layout, r0, r1)
        if plan.natural:  # the blocks are the weight's own memory
            torch.addmm(mean, q, mat, out=rows.view(b - a, p))
        else:
            blocks = torch.addmm(mean, q, mat, out=b_buf[:m].view(b - a, p))
            rows.permute(perm).copy_(blocks.view((r1 - r0,) + plan.coeff_shape[1:]))
    w = full if plan.ragged == 0 else full[: layout.shape[0]]
    return w if w.dtype == job.dtype else w.to(job.dtype)


def _chunked_backward(grad_w, job: "_Job", std, residual, need_step: bool):
    """:class:`_QuantizedSynthesis` backward chunk by chunk -> (coefficient gradient, step gradient or None)."""
    plan, layout = job.plan, job.layout
    n, p = plan.n, plan.p
    per_row = n // layout.grid[0]
    width = job.rows * per_row * p
    g_buf, r_buf = scratch(0, width, grad_w.dtype, grad_w.device), scratch(1, width, grad_w.dtype, grad_w.device)
    mat_t = (job.mats[0] * std).T
    grad_w = grad_w.contiguous()
    b0 = layout.block_shape[0]
    grad_coeffs = fresh(plan.coeff_shape, grad_w.dtype, grad_w.device)
    grad_c = grad_coeffs.view(n, p)
    grad_step = torch.zeros(p, dtype=grad_w.dtype, device=grad_w.device) if need_step else None
    perm = tuple(range(0, 2 * len(layout.grid), 2)) + tuple(range(1, 2 * len(layout.grid), 2))
    for r0 in range(0, layout.grid[0], job.rows):
        r1 = min(layout.grid[0], r0 + job.rows)
        a, b = r0 * per_row, r1 * per_row
        m = (b - a) * p
        src = grad_w
        if r1 * b0 > layout.shape[0]:  # the ragged last rows: the padding's gradient is zero
            src = scratch(2, (r1 - r0) * b0 * math.prod(plan.padded[1:]), grad_w.dtype, grad_w.device)
            src = src.view(((r1 - r0) * b0,) + plan.padded[1:])
            src[: layout.shape[0] - r0 * b0].copy_(grad_w[r0 * b0:])
            src[layout.shape[0] - r0 * b0:].zero_()
            r0, r1 = 0, r1 - r0
        rows = _weight_rows(src, layout, r0, r1)
        if plan.natural:
            g = rows.view(b - a, p)
        else:
            g = g_buf[:m].view((r1 - r0,) + plan.coeff_shape[1:]).copy_(rows.permute(perm)).view(b - a, p)
        gc = torch.mm(g, mat_t, out=grad_c[a:b])
        if grad_step is not None:
            grad_step.add_(_step_gradient(residual[a:b], gc, r_buf[:m].view(b - a, p)))
    return grad_coeffs, grad_step


class _QuantizedSynthesis(torch.autograd.Function):
    """coefficients (grid..., block...), steps (P,) -> weight; straight-through like :func:`fake_quantize`.

    The gradient reaching the quantized coefficients goes to ``coeffs`` unchanged; the
    step gets ``sum over blocks of (grad * rounding residual)``.
    """

    @staticmethod
    def forward(ctx, coeffs, step, job, mean, std):
        plan = job.plan
        c = coeffs.view(plan.n, plan.p)
        if job.rows and coeffs.device.type == "cpu":
            residual = fresh((plan.n, plan.p), c.dtype, c.device) if ctx.needs_input_grad[1] else None
            w = _chunked_forward(c, step, job, mean, std, residual)
        else:
            w, residual = _whole_forward(c, step, job, mean, std, ctx.needs_input_grad[1])
        ctx.save_for_backward(coeffs, step, std, residual)
        ctx.job = job
        return w

    @staticmethod
    @once_differentiable  # no graph through these in-place kernels: create_graph=True gives first-order grads
    @full_precision
    def backward(ctx, grad_w):
        coeffs, step, std, residual = ctx.saved_tensors
        grad_coeffs, grad_step = _backward(grad_w, ctx.job, std, residual, ctx.needs_input_grad[1], coeffs)
        return (grad_coeffs if ctx.needs_input_grad[0] else None), grad_step, None, None, None


def _backward(grad_w, job: _Job, std, residual, need_step: bool, coeffs: torch.Tensor):
    """:class:`_QuantizedSynthesis` backward -> (coefficient gradient, step gradient or None): chunk by
    chunk for big CPU tensors (see ``_CHUNK``), else in one go."""
    grad_w = dense(grad_w).to(coeffs.dtype)
    if job.rows and coeffs.device.type == "cpu":
        return _chunked_backward(grad_w, job, std, residual, need_step)
    return _whole_backward(grad_w, job, std, residual, need_step)


def _whole_forward(c, step, job: _Job, mean, std, need_residual: bool):
    """:class:`_QuantizedSynthesis` forward in one go -> (weight, rounding residual or None)."""
    plan = job.plan
    n, p = plan.n, plan.p
    # q = round(c / step) (leaky: moved back towards c / step), and the rounding residual q - c / step
    # that the step's gradient needs, kept rather than recomputed in the backward (two passes fewer)
    small = n * p < _SMALL  # tiny tensors: fewer calls beat reused buffers
    x, q = _rounded(c, step, job.leak, *((None, None) if small else
                                         (fresh((n, p), c.dtype, c.device), scratch(0, n * p, c.dtype, c.device).view(n, p))))
    residual = torch.sub(q, x, out=x) if need_residual else None
    scale = step * std
    # natural layouts return the blocks themselves: fresh memory; others are copied into the weight
    out = None if small else (fresh((n, p), c.dtype, c.device) if plan.natural else scratch(1, n * p, c.dtype, c.device).view(n, p))
    if len(job.mats) == 1:
        # mean + (q * step * std) @ M, with step and std folded into the rows of the small matrix
        blocks = torch.addmm(mean, q, scale.unsqueeze(1) * job.mats[0], out=out)
    else:
        blocks = _two_factor(q.mul_(scale), job.mats[0], job.mats[1], mean, 2, torch.empty_like(q) if out is None else out)
    return _unblock(blocks, job.layout.shape, plan, job.dtype), residual


def _whole_backward(grad_w, job: _Job, std, residual, need_step: bool):
    """:class:`_QuantizedSynthesis` backward in one go -> (coefficient gradient, step gradient or None)."""
    plan, mats = job.plan, job.mats
    n, p = plan.n, plan.p
    g = _blocks_of(grad_w, job.layout, plan, 0)
    # d loss / d quantized coefficients, allocated in the parameter's shape: not being a view,
    # autograd can add the rate term's gradient into it in place
    grad_coeffs = fresh(plan.coeff_shape, grad_w.dtype, grad_w.device)
    grad_c = grad_coeffs.view(n, p)
    if len(mats) == 1:
        torch.mm(g, (mats[0] * std).T, out=grad_c)
    else:
        _two_factor(g, mats[0].T * std, mats[1].T, 0.0, 2, grad_c)
    grad_step = None
    if need_step:
        grad_step = _step_gradient(residual, grad_c, None if n * p < _SMALL else scratch(0, n * p, g.dtype, g.device).view(n, p))
    return grad_coeffs, grad_step


def synthesis_gradients(grad_w: torch.Tensor, coeffs: torch.Tensor, step: torch.Tensor, layout: BlockLayout,
                        std: torch.Tensor, dtype: torch.dtype, transform: str, leak: float, need_step: bool):
    """(coefficient gradient, step gradient or None) of :func:`quantized_synthesis` for the weight gradient
    ``grad_w``, without its forward: the straight-through synthesis is linear in the coefficients, so only the
    rounding residual is recomputed (for the step's gradient). The same kernels as its backward, hence the same
    values. None where the generic path applies (then differentiate :func:`quantized_synthesis` instead).
    """
    job = _job(layout, transform, coeffs.dtype, coeffs.device, dtype, float(leak))
    if job is None or not coeffs.is_contiguous():
        return None
    plan = job.plan
    residual = None
    if need_step:
        c = coeffs.view(plan.n, plan.p)
        x, q = _rounded(c, step, job.leak, fresh((plan.n, plan.p), c.dtype, c.device),
                        scratch(0, plan.n * plan.p, c.dtype, c.device).view(plan.n, plan.p))
        residual = torch.sub(q, x, out=x)
    return _backward(grad_w, job, std, residual, need_step, coeffs)


def quantized_synthesis(coeffs: torch.Tensor, step: torch.Tensor, layout: BlockLayout, mean: torch.Tensor,
                        std: torch.Tensor, dtype: torch.dtype, transform: str = "dct", leak: float = 0.0) -> torch.Tensor:
    """Training forward: ``synthesize(fake_quantize(coeffs, step, leak), ...)`` for coefficients of ``layout``.

    ``step`` holds one step per in-block position (P,), in the coefficients' dtype.
    """
    job = _job(layout, transform, coeffs.dtype, coeffs.device, dtype, float(leak))
    if job is None or not coeffs.is_contiguous():
        c_hat = fake_quantize(coeffs, step.reshape(layout.block_shape), leak)
        return _DenseGradient.apply(synthesize(c_hat, layout, mean, std, dtype, transform))
    return _QuantizedSynthesis.apply(coeffs, step, job, mean, std)


def dense(grad: torch.Tensor) -> torch.Tensor:
    """A weight's gradient as a strided tensor: ``nn.Embedding(sparse=True)`` hands back a sparse one, but
    the coefficients of a block mix several rows, so their gradient is dense."""
    return grad if grad.layout == torch.strided else grad.to_dense()


class _DenseGradient(torch.autograd.Function):
    """Identity whose backward densifies the gradient (see :func:`dense`), for the generic synthesis path."""

    @staticmethod
    def forward(ctx, w):
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        return dense(grad)
