"""DRoP's class quotas (Vysogorets, Ahuja & Kempe, ICLR 2025) and its training length.

DRoP keeps ``S`` training examples and gives each class ``k`` a share that grows with its error
``1 - r_k``, ``r_k`` the validation recall of query models. A share larger than the class is
capped at the class size and the overflow is handed to the classes that still have room, in
proportion to their weights, until no class overflows. Two weightings are named here because the
two sources disagree for imbalanced classes:

- ``drop_code``: weight ``1 - r_k``, as the authors' ``quoters/drop.py`` computes it;
- ``drop_paper``: weight ``N_k (1 - r_k)`` (``N_k`` the class size), as the paper's Algorithm 1
  writes it.

On balanced classes they give the same quotas. The redistribution loop's fixed point is the
water-filling solution ``n_k = min(N_k, c w_k)`` with ``sum n_k = S``; :func:`capped_shares`
computes it exactly in floating point and :func:`round_quotas` rounds it to integers that sum to
exactly ``S`` (largest remainder). The authors' code floors every share in every round instead,
so it can end a few examples short of ``S``; ours never does. When every class with positive
weight is full (all other classes have recall 1), the rest is filled in proportion to each
class's remaining room, i.e. uniformly over the examples left (the authors' code divides by zero
there).
"""

from __future__ import annotations

import math

import torch

from prunescope.errors import ConfigError

QUOTAS = ("none", "drop_code", "drop_paper")


def class_weights(recall: torch.Tensor, sizes: torch.Tensor, variant: str) -> torch.Tensor:
    """DRoP's per-class weights: ``1 - r_k`` (``drop_code``) or ``N_k (1 - r_k)``
    (``drop_paper``), float64."""
    error = 1.0 - torch.as_tensor(recall, dtype=torch.float64)
    if variant == "drop_code":
        return error
    if variant == "drop_paper":
        return torch.as_tensor(sizes, dtype=torch.float64) * error
    raise ConfigError(f"unknown DRoP variant {variant!r}; choose drop_code or drop_paper")


def capped_shares(weights: torch.Tensor, sizes: torch.Tensor, keep: int) -> torch.Tensor:
    """Real shares ``min(N_k, c w_k)`` summing to ``keep``: proportional to ``weights``, capped
    at ``sizes``, the overflow redistributed among the classes with room until none overflows
    (the classes left with zero weight fill any rest in proportion to their room)."""
    sizes = torch.as_tensor(sizes, dtype=torch.float64)
    weights = torch.as_tensor(weights, dtype=torch.float64).clamp(min=0)
    shares = torch.zeros_like(sizes)
    active = torch.ones_like(sizes, dtype=torch.bool)
    left = float(keep)
    while left > 1e-9 and active.any():
        w = torch.where(active, weights, 0.0)
        if float(w.sum()) <= 0:  # only zero-weight classes have room: fill them evenly
            w = torch.where(active, sizes - shares, 0.0)
        share = left * w / w.sum()
        over = active & (share >= sizes - shares)
        if not over.any():
            return shares + share
        left -= float((sizes - shares)[over].sum())
        shares[over] = sizes[over]
        active &= ~over
    return shares


def round_quotas(shares: torch.Tensor, sizes: torch.Tensor, keep: int) -> torch.Tensor:
    """Integer quotas from real ``shares`` (each at most its size, summing to ``keep``): floors,
    then one more for the largest fractional parts (ties to the lower class), int64."""
    quotas = shares.floor().to(torch.int64)
    quotas = torch.minimum(quotas, torch.as_tensor(sizes, dtype=torch.int64))
    left = keep - int(quotas.sum())
    if left > 0:
        room = quotas < torch.as_tensor(sizes, dtype=torch.int64)
        remainder = torch.where(room, shares - quotas, -1.0)
        order = torch.sort(-remainder, stable=True).indices
        quotas[order[:left]] += 1
    return quotas


def drop_quotas(recall: torch.Tensor, sizes: torch.Tensor, keep: int,
                variant: str = "drop_code") -> torch.Tensor:
    """DRoP's per-class keep counts (int64, summing to ``keep``) from per-class validation
    ``recall`` and class ``sizes``; see the module doc for ``variant``.

    Raises :class:`ConfigError` when a class has no examples (its quota cannot be met) or
    ``keep`` is outside ``1..sum(sizes)``."""
    sizes = torch.as_tensor(sizes, dtype=torch.int64)
    recall = torch.as_tensor(recall, dtype=torch.float64)
    if recall.shape != sizes.shape:
        raise ConfigError(f"{recall.numel()} recalls for {sizes.numel()} classes; give one "
                          "recall per class")
    empty = torch.nonzero(sizes == 0).reshape(-1)
    if empty.numel():
        raise ConfigError(f"class {int(empty[0])} has no training examples, so its DRoP quota "
                          "cannot be met; drop the class from the data or use quota: none")
    if not 1 <= keep <= int(sizes.sum()):
        raise ConfigError(f"cannot keep {keep} of {int(sizes.sum())} examples; choose a "
                          "density in (0, 1]")
    if not bool(((recall >= 0) & (recall <= 1)).all()):
        raise ConfigError(f"recalls must lie in [0, 1], got {recall.tolist()}")
    shares = capped_shares(class_weights(recall, sizes, variant), sizes, keep)
    return round_quotas(shares, sizes, keep)


def pruned_epochs(epochs: int, density: float) -> int:
    """The DRoP protocol's training length on a pruned set: ``floor((0.5 + 0.5 d) E / d)``
    for ``E`` epochs on the full data and kept fraction ``d`` (so fewer optimizer steps than
    the full run for every ``d < 1``, and ``E`` at ``d = 1``)."""
    check_density(density)
    return max(1, math.floor((0.5 + 0.5 * density) * epochs / density + 1e-9))


def check_density(density: float) -> float:
    """``density`` as a float, or :class:`ConfigError` unless it lies in (0, 1]."""
    if isinstance(density, bool) or not isinstance(density, int | float) or math.isnan(density):
        raise ConfigError(f"density must be a number in (0, 1], got {density!r}")
    if not 0 < density <= 1:
        raise ConfigError(f"density must be in (0, 1] (the kept fraction of the training set, "
                          f"e.g. 0.5 keeps half), got {density!r}")
    return float(density)
