"""Dynamic sparse training: RigL (Evci et al., ICML 2020) and SET (Mocanu et al. 2018).

The network starts sparse (a random mask with ERK allocation by default) at constant sparsity.
Every ``every`` steps until ``end``, each layer drops the fraction ``f(t) = alpha/2 (1 + cos(pi t
/ end))`` of its kept weights with the smallest magnitude and grows as many among the others: by
the largest magnitude of the dense gradient (RigL) or at random (SET). Grown weights start at
zero with their optimizer state (momentum, Adam moments) reset; as in the authors' code, the
optimizer step is skipped on update steps, and every layer keeps its count of weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunescope.allocation import ALLOCATIONS
from prunescope.errors import ConfigError
from prunescope.mask import Mask
from prunescope.methods.base import (
    Method,
    check_unit,
    generator_state,
    register,
    restore_generator,
    train_from_scratch,
)
from prunescope.patterns import topk_mask
from prunescope.run import Run
from prunescope.schedules import DropGrow
from prunescope.sparsifier import MaskHold, agree, prune


class DropGrowHook(MaskHold):
    """Holds the mask; on update steps drops by magnitude and grows by gradient or at random."""

    def __init__(self, mask: Mask, schedule: DropGrow, grow: str, seed: int) -> None:
        super().__init__(mask)
        self.schedule, self.grow = schedule, grow
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": generator_state(self.generator)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_generator(self.generator, state.get("generator"))

    def before_optimizer_step(self, model: nn.Module, step: int, optimizer=None,
                              closure=None) -> bool:
        if not self.schedule.is_update(step):
            return super().before_optimizer_step(model, step)
        fraction = self.schedule.fraction(step)
        params = dict(model.named_parameters())
        rewired = {n: self.rewire(params[n], keep, fraction) for n, keep in self.mask.items()}
        self.mask = agree(model, Mask({n: keep for n, (keep, _) in rewired.items()}))
        with torch.no_grad():
            for name, (_, survivors) in rewired.items():
                grown = self.mask[name] & ~survivors
                params[name][grown] = 0.0  # a regrown dropped weight restarts at zero too
                if optimizer is not None:
                    reset_state(optimizer, params[name], grown)
        return False  # no weight update on a rewiring step

    def rewire(self, param: nn.Parameter, keep: torch.Tensor, fraction: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(new keep-mask, survivors of the drop) for one layer."""
        kept = int(keep.sum())
        moved = min(round(fraction * kept), kept)
        survivors = topk_mask(torch.where(keep, param.detach().abs(), -torch.inf), kept - moved)
        if self.grow == "gradient":
            scores = param.grad.detach().abs().double()
        else:
            scores = torch.rand(keep.shape, generator=self.generator, dtype=torch.float64)
        grown = topk_mask(torch.where(survivors, -torch.inf, scores), moved)
        return survivors | grown, survivors


def reset_state(optimizer: torch.optim.Optimizer, param: nn.Parameter,
                entries: torch.Tensor) -> None:
    """Zero ``param``'s optimizer state (momentum, Adam moments) at ``entries``."""
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value[entries] = 0.0


@register("rigl")
@dataclass(frozen=True)
class RigL(Method):
    """``every`` in steps; ``end`` in ``unit`` (epochs, steps, or by default a fraction of the
    budget-scaled training: 75% as in the paper); ``alpha`` the initial drop fraction."""

    method: str = "rigl"
    allocation: str = "erk"
    alpha: float = 0.3
    every: int = 100
    end: float = 0.75
    unit: str = "fraction"

    grow = "gradient"

    def __post_init__(self) -> None:
        super().__post_init__()
        ALLOCATIONS.get(self.allocation)
        check_unit(self.method, self.unit)
        if self.every < 1:
            raise ConfigError(f"{self.method}: the update period 'every' must be >= 1 step, "
                              f"got {self.every}")
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"{self.method}: alpha must be in (0, 1], got {self.alpha}")

    def schedule(self, run: Run, sparsity: float = 0.0) -> DropGrow:
        total = run.total_steps(self.budget)
        end = run.steps(self.end, self.unit, self.budget)
        if not 0 < end <= total:
            raise ConfigError(f"{self.method}: end must fall within the {total} training steps, "
                              f"got step {end}")
        return DropGrow(self.every, end, self.alpha, sparsity)

    def check(self, run: Run, sparsities: tuple[float, ...]) -> None:
        self.schedule(run)

    def run_one(self, run: Run, sparsity: float) -> list[dict[str, Any]]:
        return train_from_scratch(run, self, sparsity, lambda model: self.hook(
            run, model, sparsity))

    def hook(self, run: Run, model: nn.Module, sparsity: float) -> DropGrowHook:
        """A random mask of the allocation's per-layer sparsities, then drop and grow."""
        mask = prune(model, "random", self.allocation, sparsity, seed=run.seed,
                     **run.targets.options())
        return DropGrowHook(mask, self.schedule(run, sparsity), self.grow, run.seed)


@register("set")
@dataclass(frozen=True)
class SET(RigL):
    """RigL's schedule with random growth (Mocanu et al. 2018)."""

    method: str = "set"
    grow = "random"
