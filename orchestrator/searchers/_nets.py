"""Small torch building blocks shared by the learned searchers (``haq``'s DDPG agent, ``aqgan``)."""

from __future__ import annotations

import math

import torch
from torch import nn


def seeded_linear(n_in: int, n_out: int, generator: torch.Generator) -> nn.Linear:
    """``nn.Linear`` with PyTorch's default init drawn from ``generator``, not the global RNG
    (so a searcher's networks depend on its seed alone)."""
    layer = nn.utils.skip_init(nn.Linear, n_in, n_out)
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(n_in)
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer
