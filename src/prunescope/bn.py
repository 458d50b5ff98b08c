"""Batch-norm recalibration: re-estimate running statistics after the weights changed.

One-shot pruning changes every layer's output distribution, so the running means and variances
batch norm learned for the dense model no longer fit; re-estimating them on a few hundred
training examples (no gradient step) recovers much of the lost accuracy (Peste et al. 2023,
CrAM, "one-shot pruning + BN tuning"; also Hubara et al. 2021).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                   ) -> int:
    """Reset every batch norm's running statistics and re-estimate them as an exact average
    over ``batches`` (inputs only), with the rest of the model in eval mode.

    Returns the number of batches used (0 and nothing changed when the model has no batch
    norm). The model's train/eval mode is restored.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not norms:
        return 0
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average: every batch weighs the same
        norm.train()
    used = 0
    try:
        for inputs, _ in batches:
            model(inputs.to(next(model.parameters()).device))
            used += 1
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)
    return used
