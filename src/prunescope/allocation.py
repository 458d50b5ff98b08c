"""Allocations: how many weights each tensor keeps.

An allocation is a function ``(scores, keep) -> {name: count}`` that splits a total budget of
``keep`` weights over the tensors; it sees the criterion's scores (so "global" needs no special
case) and must return counts that sum to ``keep`` (shape-based rules may fall short only where a
tensor has fewer live weights than its quota). Scores of weights that are already pruned are
``-inf``: such weights are never counted as live. Which weights fill each count is decided by
:mod:`prunescope.patterns`.

Registered allocations:

- ``global``: one ranking of all scores across tensors (Han et al. 2015; Frankle & Carbin 2019).
- ``uniform``: every tensor at the same sparsity (Zhu & Gupta 2017).
- ``erk``: Erdos-Renyi-Kernel, density proportional to ``sum(shape) / prod(shape)``, dense
  layers capped at density 1 and the rest re-solved (Evci et al. 2020, RigL).
- ``igq``: Ideal Gas Quotas, density ``1 / (F n_l + 1)`` with ``F`` found by bisection
  (Vysogorets & Kempe 2023).
- ``lamp``: layer-adaptive magnitude pruning scores ``s_u^2 / sum_{v >= u} s_v^2`` within each
  tensor, then one global ranking (Lee et al. 2021).

:func:`allocate` adds explicit per-tensor overrides and per-tensor floors on top of any of them.
A floor (:meth:`prunescope.patterns.Pattern.floor`: by default one weight per output unit, see
``min_density`` in :func:`prunescope.prune`) is the fewest weights a tensor may keep: a tensor the
allocation leaves below it is fixed at it and the allocation re-spreads the rest of the budget
over the other tensors, so the global sparsity still holds exactly; counts that already meet
every floor are unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, MutableSet
from fnmatch import fnmatchcase

import torch

from prunescope.errors import ConfigError, PruningError
from prunescope.patterns import topk_flat
from prunescope.registry import Registry

Scores = Mapping[str, torch.Tensor]
Allocation = Callable[[Scores, int], dict[str, int]]
ALLOCATIONS: Registry[Allocation] = Registry("allocation")
logger = logging.getLogger(__name__)


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """Return ``sparsity`` as a float, raising ConfigError unless it lies in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float):
        raise ConfigError(f"{what} must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0 or math.isnan(sparsity):
        raise ConfigError(f"{what} must be in [0, 1) (e.g. 0.9 keeps 10%), got {sparsity!r}")
    return float(sparsity)


def keep_count(total: int, sparsity: float) -> int:
    """Number of weights kept out of ``total`` at ``sparsity`` (rounded to nearest)."""
    return round((1.0 - sparsity) * total)


def check_min_density(min_density: float | None) -> float | None:
    """Return ``min_density`` (None = one weight per output unit, or a float in [0, 1)), raising
    ConfigError for anything else."""
    if min_density is None:
        return None
    return check_sparsity(min_density, "min_density")


def allocate(
    scores: Scores,
    sparsity: float,
    allocation: str = "global",
    overrides: Mapping[str, float] | None = None,
    *,
    floors: Mapping[str, int] | None = None,
    warned: MutableSet[str] | None = None,
) -> dict[str, int]:
    """Counts to keep per tensor so that the global sparsity is ``sparsity``.

    ``overrides`` maps name globs to a fixed sparsity for the matching tensors (e.g.
    ``{"fc3.weight": 0.5}``, the first glob that matches wins); the allocation then spreads the
    rest of the budget over the other tensors, so the global sparsity still holds. ``floors``
    (name -> fewest weights kept, overrides included) fixes every tensor the result would leave
    below its floor at it and re-spreads the rest; floors that exceed the budget raise
    PruningError. A tensor that would have kept nothing without its floor is named in one
    WARNING line (once per name in ``warned``, when a caller allocating repeatedly passes a set).
    """
    sparsity = check_sparsity(sparsity)
    rule = ALLOCATIONS.get(allocation)
    floors = {n: floors.get(n, 0) for n in scores} if floors else dict.fromkeys(scores, 0)
    held = _fixed_counts(scores, overrides or {})
    keep = keep_count(sum(s.numel() for s in scores.values()), sparsity)
    counts = _spread(rule, scores, keep, held, sparsity)
    first = counts
    while low := [n for n in scores if counts[n] < floors[n]]:
        held.update({n: floors[n] for n in low})
        _check_floors(scores, held, floors, keep, sparsity)
        counts = _spread(rule, scores, keep, held, sparsity)
    for name in scores:
        if first[name] == 0 < counts[name] and (warned is None or name not in warned):
            logger.warning("allocation %r would prune %r entirely; it keeps %d weight(s), its "
                           "min_density floor", allocation, name, counts[name])
            if warned is not None:
                warned.add(name)
    return counts


def _spread(rule: Allocation, scores: Scores, keep: int, held: Mapping[str, int],
            sparsity: float) -> dict[str, int]:
    """The ``held`` counts, and the rule's split of the rest of ``keep`` over the other tensors."""
    budget = keep - sum(held.values())
    rest = {n: s for n, s in scores.items() if n not in held}
    if budget < 0 or budget > sum(s.numel() for s in rest.values()):
        raise PruningError(
            f"the overrides keep {sum(held.values())} weights, which cannot be reconciled with "
            f"global sparsity {sparsity}; lower the overrides or change the sparsity"
        )
    counts = rule(rest, budget) if rest else {}
    return {n: held.get(n, counts.get(n, 0)) for n in scores}


def _check_floors(scores: Scores, held: Mapping[str, int], floors: Mapping[str, int], keep: int,
                  sparsity: float) -> None:
    least = sum(held.values()) + sum(floors[n] for n in scores if n not in held)
    if least > keep:
        raise PruningError(
            f"the per-tensor floors (min_density; by default one weight per output unit) and "
            f"overrides keep at least {least} weights, more than the {keep} that sparsity "
            f"{sparsity} allows; lower the sparsity or pass min_density=0.0"
        )


def _fixed_counts(scores: Scores, overrides: Mapping[str, float]) -> dict[str, int]:
    fixed: dict[str, int] = {}
    for pattern, value in overrides.items():
        value = check_sparsity(value, f"override sparsity for {pattern!r}")
        matched = [n for n in scores if fnmatchcase(n, pattern) and n not in fixed]
        if not any(fnmatchcase(n, pattern) for n in scores):
            raise ConfigError(
                f"override {pattern!r} matches no prunable tensor; choose from: {', '.join(scores)}"
            )
        for name in matched:
            fixed[name] = min(keep_count(scores[name].numel(), value), _live(scores[name]))
    return fixed


def _live(score: torch.Tensor) -> int:
    return int(torch.isfinite(score).sum())


def _ranked_counts(scores: Scores, keep: int) -> dict[str, int]:
    """Counts from one global ranking; ties go to the earlier tensor, then the lower index."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten().double().cpu() for n in names])
    owner = torch.cat(
        [torch.full((scores[n].numel(),), i, dtype=torch.long) for i, n in enumerate(names)]
    )
    counts = torch.bincount(owner[topk_flat(flat, keep)], minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts, strict=True)}


def _from_densities(scores: Scores, densities: Mapping[str, float], keep: int) -> dict[str, int]:
    """Round per-tensor ``density * size`` to integers summing to ``keep`` (largest remainder)."""
    names = list(scores)
    caps = {n: _live(scores[n]) for n in names}
    target = {n: min(densities[n] * scores[n].numel(), caps[n]) for n in names}
    counts = {n: math.floor(target[n]) for n in names}
    by_remainder = sorted(names, key=lambda n: -(target[n] - counts[n]))  # stable: model order
    short = keep - sum(counts.values())
    for name in by_remainder:
        if short <= 0:
            break
        if counts[name] < caps[name]:
            counts[name] += 1
            short -= 1
    return counts


@ALLOCATIONS.register("global")
def global_allocation(scores: Scores, keep: int) -> dict[str, int]:
    """One ranking over all tensors: the ``keep`` highest scores anywhere survive."""
    return _ranked_counts(scores, keep)


@ALLOCATIONS.register("uniform")
def uniform_allocation(scores: Scores, keep: int) -> dict[str, int]:
    """The same density ``keep / total`` in every tensor."""
    total = sum(s.numel() for s in scores.values())
    return _from_densities(scores, {n: keep / total for n in scores}, keep)


def erk_densities(shapes: Mapping[str, torch.Size], keep: int) -> dict[str, float]:
    """ERK densities ``eps * sum(shape) / prod(shape)``, capped at 1 with the rest re-solved."""
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    size = {n: math.prod(s) for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        budget = keep - sum(size[n] for n in dense)
        eps = budget / sum(raw[n] * size[n] for n in free) if free else 0.0
        over = [n for n in free if eps * raw[n] > 1.0]
        if not over:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        dense.update(over)


@ALLOCATIONS.register("erk")
def erk_allocation(scores: Scores, keep: int) -> dict[str, int]:
    """Erdos-Renyi-Kernel densities (Evci et al. 2020)."""
    densities = erk_densities({n: s.shape for n, s in scores.items()}, keep)
    return _from_densities(scores, densities, keep)


def igq_densities(sizes: Mapping[str, int], keep: int, iterations: int = 200) -> dict[str, float]:
    """Ideal Gas Quota densities ``1 / (F n_l + 1)`` with ``sum n_l d_l = keep``."""
    total = sum(sizes.values())
    if keep >= total:
        return {n: 1.0 for n in sizes}
    if keep <= 0:
        return {n: 0.0 for n in sizes}

    def kept(force: float) -> float:
        return sum(n / (force * n + 1.0) for n in sizes.values())

    low, high = 0.0, 1.0
    while kept(high) > keep:
        high *= 2.0
    for _ in range(iterations):
        mid = (low + high) / 2.0
        low, high = (mid, high) if kept(mid) > keep else (low, mid)
    force = (low + high) / 2.0
    return {name: 1.0 / (force * n + 1.0) for name, n in sizes.items()}


@ALLOCATIONS.register("igq")
def igq_allocation(scores: Scores, keep: int) -> dict[str, int]:
    """Ideal Gas Quotas (Vysogorets & Kempe 2023): large layers are compressed more."""
    densities = igq_densities({n: s.numel() for n, s in scores.items()}, keep)
    return _from_densities(scores, densities, keep)


def lamp_scores(score: torch.Tensor) -> torch.Tensor:
    """LAMP scores of one tensor: ``s_u^2 / sum_{v >= u} s_v^2`` over the ascending order of s.

    Already-pruned entries (``-inf``) stay ``-inf``. Raises PruningError on negative scores
    (LAMP is defined for magnitudes).
    """
    live = torch.isfinite(score)
    values = torch.where(live, score, torch.zeros_like(score)).double().flatten()
    if (values < 0).any():
        raise PruningError("lamp needs non-negative scores; use it with magnitude-like criteria")
    squared = values.square()
    order = torch.argsort(squared, stable=True)
    ascending = squared[order]
    suffix = torch.flip(torch.cumsum(torch.flip(ascending, [0]), 0), [0])
    ratio = torch.where(suffix > 0, ascending / suffix.clamp_min(1e-300), torch.zeros_like(suffix))
    result = torch.empty_like(ratio)
    result[order] = ratio
    result = result.view_as(score)
    return torch.where(live, result, torch.full_like(result, -math.inf))


@ALLOCATIONS.register("lamp")
def lamp_allocation(scores: Scores, keep: int) -> dict[str, int]:
    """LAMP (Lee et al. 2021): one global ranking of per-tensor normalised scores."""
    return _ranked_counts({n: lamp_scores(s) for n, s in scores.items()}, keep)
