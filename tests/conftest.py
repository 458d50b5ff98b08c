"""Tiny shared models and data for the sparsity-core tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture
def tiny_mlp() -> nn.Sequential:
    """Flatten, Linear(4, 3), ReLU, Linear(3, 2): 12 + 6 prunable weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


@pytest.fixture
def mlp8() -> nn.Sequential:
    """Linear(8, 8), ReLU, Linear(8, 4): 64 + 32 prunable weights, dims divisible by 2 and 4."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    model.input_shape = (8,)
    return model


@pytest.fixture
def batches8() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two batches of 6 random 8-dim inputs with 4-class targets."""
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(6, 8, generator=generator), torch.randint(0, 4, (6,), generator=generator))
        for _ in range(2)
    ]
