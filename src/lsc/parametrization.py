"""The spectral reparameterization of one tensor, as a ``torch.nn.utils.parametrize`` module.

``right_inverse`` turns a weight into standardized block-DCT coefficients (the new
trainable parameter); ``forward`` quantizes them with steps chosen by the shared
quantization network and transforms back. Because it is a parametrization, the
user's module keeps its class, forward, hooks and attribute access.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .blocking import BlockLayout, to_blocks
from .errors import LscError
from .grouping import position_groups
from .morton import morton_order
from .qnet import QuantizationNetwork, position_features
from .quantizer import bits_to_exponent, integer_coefficients, leaky_round, step_size
from .reconstruct import compute_dtype_for, reconstruct, synthesize
from .transforms import block_transform

__all__ = ["SpectralParametrization"]


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
        self.transform = transform
        cdtype = compute_dtype_for(dtype)
        self.register_buffer("mean", torch.zeros((), dtype=cdtype))
        self.register_buffer("std", torch.ones((), dtype=cdtype))
        self.register_buffer("features", position_features(tensor_id, num_tensors, self.layout), persistent=False)
        groups = position_groups(self.layout, min_group_symbols)
        self.num_groups = int(groups.max()) + 1
        self.register_buffer("groups", torch.from_numpy(groups), persistent=False)
        self.register_buffer("scan_order", torch.from_numpy(np.array(morton_order(self.layout.block_shape))), persistent=False)
        object.__setattr__(self, "q_net", q_net)  # shared by all tensors; deliberately not a submodule

    # -- device handling: model.to(device) carries the shared q_net along (device only, never dtype)
    def _apply(self, fn, *args, **kwargs):
        probe = fn(torch.zeros(0, device=self.features.device))
        result = super()._apply(fn, *args, **kwargs)
        q_net = self.__dict__["q_net"]
        if next(q_net.parameters()).device != probe.device:
            q_net.to(probe.device)
        return result

    def exponent(self) -> torch.Tensor:
        """Integer-valued float exponents per in-block position (row-major), straight-through to q_net."""
        return bits_to_exponent(self.q_net(self.features, self.tensor_id))

    def step(self, exponent: torch.Tensor) -> torch.Tensor:
        return step_size(exponent).to(self.mean.dtype).reshape(self.layout.block_shape)

    def integer_state(self, coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer coefficients, int64 exponents): exactly what the file stores."""
        with torch.no_grad():
            e = self.exponent().to(torch.int64)
            return integer_coefficients(coeffs.to(self.mean.dtype), self.step(e)), e

    def forward(self, coeffs: torch.Tensor) -> torch.Tensor:
        if self.training:
            e = self.exponent()
            step = self.step(e)
            c_hat = leaky_round(coeffs.to(step.dtype) / step, self.leak) * step
            return synthesize(c_hat, self.layout, self.mean, self.std, self.orig_dtype, self.transform)
        q, e = self.integer_state(coeffs)
        return reconstruct(q, e, self.layout, self.mean, self.std, self.orig_dtype, self.transform)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        if tuple(weight.shape) != self.layout.shape:
            raise LscError(f"{self.name}: cannot assign a tensor of shape {tuple(weight.shape)} to a spectral parameter of shape {self.layout.shape}")
        if weight.is_meta:
            raise LscError(f"{self.name}: is on the meta device; materialize the model (e.g. to_empty + load weights) before lsc.spectral")
        w = weight.detach().to(self.mean.dtype)
        if not bool(torch.isfinite(w).all()):
            raise LscError(f"{self.name}: contains NaN or Inf; lsc cannot compress non-finite weights")
        mean = w.mean() if w.numel() else torch.zeros((), dtype=w.dtype, device=w.device)
        std = w.std(unbiased=False) if w.numel() > 1 else torch.ones((), dtype=w.dtype, device=w.device)
        if not bool(std > 0) or not bool(torch.isfinite(std)):
            std = torch.ones_like(std)
        self.mean.copy_(mean)
        self.std.copy_(std)
        return block_transform(to_blocks((w - mean) / std, self.layout), self.layout.block_shape, self.transform)

    def extra_repr(self) -> str:
        return f"{self.name}: shape={self.layout.shape}, block={self.layout.block_shape}, {self.transform}, groups={self.num_groups}"
