"""The shared quantization network: (tensor id, frequency position) -> bits.

One small MLP serves every tensor, so the model learns a bit allocation that
generalizes across layers instead of one free number per coefficient. Unlike the
seed's network it cannot die: hidden units are SiLU, there is no output ReLU, and
the last layer starts at zero so every frequency starts at exactly ``init_bits``
while still receiving gradient.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .blocking import BlockLayout

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
