"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune").

Training starts dense from the initialisation; between ``start`` and ``end`` the mask is
recomputed every ``every`` steps by magnitude with the chosen allocation, the sparsity following
the cubic ramp ``s_t = s_f + (s_i - s_f)(1 - (t - t_0)/(t_1 - t_0))^3``; pruned weights never
return, and training continues to the end with the final mask held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prunescope.allocation import ALLOCATIONS, check_sparsity
from prunescope.errors import ConfigError
from prunescope.methods.base import Method, check_unit, register, train_from_scratch
from prunescope.run import Run
from prunescope.schedules import Gradual
from prunescope.sparsifier import ScheduledPruning


@register("gmp")
@dataclass(frozen=True)
class GMP(Method):
    """``start``/``end`` in ``unit``: epochs, steps, or (the default) a fraction of the
    budget-scaled training; ``every`` in steps."""

    method: str = "gmp"
    allocation: str = "global"
    initial_sparsity: float = 0.0
    start: float = 0.1
    end: float = 0.7
    every: int = 100
    unit: str = "fraction"

    def __post_init__(self) -> None:
        super().__post_init__()
        ALLOCATIONS.get(self.allocation)
        check_unit("gmp", self.unit)
        check_sparsity(self.initial_sparsity, "gmp: initial_sparsity")
        if not 0 <= self.start < self.end or self.every < 1:
            raise ConfigError(
                f"gmp: need 0 <= start < end and every >= 1 (got start={self.start}, "
                f"end={self.end}, every={self.every})"
            )

    def default_label(self) -> str:
        return "gmp" if self.allocation == "global" else f"gmp+{self.allocation}"

    def schedule(self, run: Run, sparsity: float) -> Gradual:
        """The cubic schedule in optimizer steps; it must end within the training."""
        total = run.total_steps(self.budget)
        start = run.steps(self.start, self.unit, self.budget)
        end = run.steps(self.end, self.unit, self.budget)
        if end > total:
            raise ConfigError(
                f"gmp: the pruning schedule ends at step {end}, after the training's {total} "
                "steps; lower gmp.end or raise train.epochs"
            )
        return Gradual(final=sparsity, start=start, end=end, every=self.every,
                       initial=min(self.initial_sparsity, sparsity))

    def check(self, run: Run, sparsities: tuple[float, ...]) -> None:
        for sparsity in sparsities:
            self.schedule(run, sparsity)

    def run_one(self, run: Run, sparsity: float) -> list[dict[str, Any]]:
        return train_from_scratch(run, self, sparsity, lambda model: ScheduledPruning(
            self.schedule(run, sparsity), "magnitude", self.allocation,
            **run.targets.options()))
