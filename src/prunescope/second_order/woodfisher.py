"""Global second-order pruning with the Optimal Brain Surgeon and a WoodFisher inverse.

Optimal Brain Surgeon (Hassibi & Stork 1993) with the block-diagonal empirical Fisher of
WoodFisher (Singh & Alistarh, NeurIPS 2020) as the Hessian. Removing weight ``q`` and letting the
others move optimally raises the quadratic model of the loss by ``w_q^2 / (2 [F^-1]_qq)``: that
is the keep-score, so the allocation ranks weights by their cost in loss. Removing a set ``Q`` at
once (the joint OBS solution, within each Fisher block) moves the weights by

    dw = -F^-1[:, Q] (F^-1[Q, Q])^-1 w_Q,

which zeroes ``w_Q`` exactly and corrects every kept weight of the block. Several recomputation
steps are the ``rounds`` of :func:`prunescope.prune`: each round recomputes the gradients and
the Fisher at the corrected weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prunescope.criteria import Context, Criterion, Scores
from prunescope.errors import PruningError
from prunescope.mask import Mask
from prunescope.patterns import Pattern
from prunescope.second_order.fisher import (
    block_size_for,
    check_memory,
    dampened_inverse,
    empirical_fisher,
    mean_diagonal,
)
from prunescope.targets import parameters

CACHE_KEY = "woodfisher"


def obs_scores(weight: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``w_q^2 / (2 [F^-1]_qq)`` for every weight (float64, the weight's shape).

    ``inverse`` holds the ``[numel / B, B, B]`` diagonal blocks of ``F^-1`` over the flattened
    weight.
    """
    diagonal = inverse.diagonal(dim1=1, dim2=2).reshape(weight.shape)
    return weight.detach().double().square() / (2.0 * diagonal)


def obs_update(weight: torch.Tensor, inverse: torch.Tensor, prune: torch.Tensor) -> torch.Tensor:
    """The weight after removing the ``prune`` (bool, weight's shape) set with the joint OBS
    correction of each block; pruned entries are exactly zero, other blocks unchanged."""
    block = inverse.shape[-1]
    w = weight.detach().double().reshape(-1, block).clone()
    chosen = prune.reshape(-1, block).to(w.device)
    rows = chosen.any(dim=1).nonzero().squeeze(1)
    if rows.numel():
        p = chosen[rows].double()
        inv = inverse[rows].to(w.device)
        # F^-1[Q, Q] embedded in the identity, so that one batched solve handles every block
        system = inv * p.unsqueeze(2) * p.unsqueeze(1)
        system.diagonal(dim1=1, dim2=2).add_(1.0 - p)
        z = torch.cholesky_solve((w[rows] * p).unsqueeze(2), torch.linalg.cholesky(system))
        w[rows] -= (inv @ z).squeeze(2)
    w[chosen] = 0.0
    return w.reshape(weight.shape).to(weight.dtype)


@dataclass(frozen=True)
class WoodFisher:
    """WoodFisher OBS pruning: the criterion's score and solve, with their settings.

    ``block_size``: weights per Fisher block (must divide every target tensor; ``None`` takes
    the largest divisor of each tensor's size up to 128). ``dampening``: ``lambda`` relative to
    the mean Fisher diagonal over all target tensors. ``memory_limit``: bytes the Fisher blocks
    may use (default: the memory available now). Gradient samples are the examples of the
    batches passed to :func:`prunescope.prune` (one gradient per example).
    """

    block_size: int | None = None
    dampening: float = 0.1
    memory_limit: int | None = None

    def inverses(self, model: nn.Module, keep: dict[str, torch.Tensor], context: Context
                 ) -> dict[str, torch.Tensor]:
        """``(F + lambda I)^-1`` blocks per tensor, with the weights ``keep`` marks False held
        at zero; checks the memory before allocating."""
        if not self.dampening > 0:
            raise PruningError(f"woodfisher dampening must be > 0, got {self.dampening}")
        params = parameters(model)
        blocks = {n: block_size_for(n, params[n].numel(), self.block_size) for n in keep}
        check_memory({n: (params[n].numel(), b) for n, b in blocks.items()}, self.memory_limit)
        if not context.batches:
            raise PruningError("criterion 'woodfisher' needs data: pass data= (batches of "
                               "(inputs, targets)) for its gradient samples")
        fisher = empirical_fisher(model, keep, blocks, context.batches, context.loss_fn)
        damp = self.dampening * mean_diagonal(fisher)
        return {n: dampened_inverse(fisher.pop(n), damp) for n in list(fisher)}

    def score(self, model: nn.Module, names: Sequence[str], context: Context) -> Scores:
        """OBS keep-scores ``w^2 / (2 [F^-1]_qq)``; the model's zero weights count as pruned."""
        params = parameters(model)
        keep = {n: params[n].detach() != 0 for n in names}
        inverses = self.inverses(model, keep, context)
        context.cache[CACHE_KEY] = (keep, inverses)
        return {n: obs_scores(params[n], inverses[n]) for n in names}

    @torch.no_grad()
    def solve(self, model: nn.Module, current: Mask, counts: dict[str, int], pattern: Pattern,
              context: Context) -> Mask:
        """Keep the ``counts`` highest OBS scores under ``pattern`` and correct the kept weights
        of every block with the joint OBS update."""
        keep_before, inverses = context.cache.pop(CACHE_KEY, (None, None))
        if inverses is None or any(not torch.equal(keep_before[n], current[n].to(keep_before[n]))
                                   for n in current):
            inverses = self.inverses(model, dict(current.items()), context)
        params = parameters(model)
        kept = {}
        for name, live in current.items():
            param = params[name]
            scores = obs_scores(param, inverses[name])
            scores = torch.where(live.to(scores.device), scores, -torch.inf)
            keep = pattern.select(name, scores, counts[name]).to(live.device) & live
            param.copy_(obs_update(param, inverses[name], live & ~keep))
            kept[name] = keep
        return Mask(kept)

    def criterion(self, name: str = "woodfisher") -> Criterion:
        """This configuration as a :class:`Criterion` for :func:`prunescope.prune`."""
        return Criterion(name, self.score, needs_data=True, solve=self.solve)


CRITERION = WoodFisher().criterion()
"""The registered ``woodfisher`` criterion, with the default settings."""
