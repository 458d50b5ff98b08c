"""Seeded, stratified index splits.

Used for every validation split (and for the fixed test split of ``digits``): the same labels,
size and seed always give the same split, and each class contributes in proportion to its
frequency.
"""

from __future__ import annotations

import torch

from prunescope.errors import ConfigError


def class_quotas(counts: torch.Tensor, size: int) -> torch.Tensor:
    """Per-class sample counts proportional to ``counts`` that sum to exactly ``size``.

    Largest-remainder rounding: every class gets ``floor(size * n_c / N)``, and the examples left
    over go to the classes with the largest fractional parts (ties to the lower class position).
    A class never gets more than it has.
    """
    total = int(counts.sum())
    exact = counts.to(torch.float64) * size / max(total, 1)
    quotas = exact.floor().to(torch.int64)
    left = size - int(quotas.sum())
    if left > 0:
        remainder = exact - quotas
        order = torch.sort(-remainder, stable=True).indices
        quotas[order[:left]] += 1
    return quotas


def stratified_split(
    labels: torch.Tensor, size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(len(labels))`` into ``(rest_idx, chosen_idx)``, both sorted int64.

    ``chosen_idx`` has exactly ``size`` elements, drawn per class (see :func:`class_quotas`) by a
    permutation from ``torch.Generator().manual_seed(seed)``; ``rest_idx`` is the complement.
    ``size`` outside ``0..len(labels)`` raises :class:`ConfigError`.
    """
    labels = torch.as_tensor(labels).reshape(-1)
    n = labels.numel()
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= n:
        raise ConfigError(f"split size {size!r} is out of range: choose an integer in 0..{n}")
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    # Group the shuffled positions by class; within a class they stay in random order.
    by_class = perm[torch.sort(labels[perm], stable=True).indices]
    _, counts = torch.unique(labels, return_counts=True)
    quotas = class_quotas(counts, size)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - torch.repeat_interleave(starts, counts)
    chosen_mask = torch.zeros(n, dtype=torch.bool)
    chosen_mask[by_class[rank < torch.repeat_interleave(quotas, counts)]] = True
    chosen = torch.nonzero(chosen_mask).reshape(-1)
    rest = torch.nonzero(~chosen_mask).reshape(-1)
    return rest, chosen
