"""Collect per-layer input activations for output-error based baselines.

The SVD baseline chooses each layer's rank from the error of the layer's
*output* on real inputs (as its reference method does), so it needs, for every
Linear/Conv2d weight, a matrix X of inputs with one row per input vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def collect_layer_inputs(model: nn.Module, run, max_rows: int = 2048,
                         seed: int = 0) -> dict:
    """Run `run(model)` once with hooks; return {weight_name: X (N, fan_in)}.

    Conv2d inputs are unfolded into patches so X @ W.reshape(out, -1).T is
    the conv output.  At most `max_rows` rows per layer, sampled uniformly.
    """
    rows: dict[str, list] = {}
    hooks = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        key = f"{name}.weight"

        def hook(m, inp, _out, key=key):
            x = inp[0].detach()
            if isinstance(m, nn.Conv2d):
                x = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)
                x = x.transpose(1, 2)
            rows.setdefault(key, []).append(x.reshape(-1, x.shape[-1]).float())
        hooks.append(mod.register_forward_hook(hook))
    try:
        run(model)
    finally:
        for h in hooks:
            h.remove()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, chunks in rows.items():
        x = torch.cat(chunks)
        if len(x) > max_rows:
            x = x[torch.randperm(len(x), generator=gen)[:max_rows]]
        out[key] = x
    return out
