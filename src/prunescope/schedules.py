"""Schedules: the target sparsity as a pure function of the optimizer step.

A schedule is stateless: ``sparsity_at(step)`` gives the target sparsity at any step, and
``is_update(step)`` says whether the mask should be recomputed at that step. Nothing is
remembered between calls, so a resumed run asks the same questions and gets the same answers.

- :class:`OneShot`: the whole target at one step.
- :class:`Iterative`: ``rounds`` prunings ``every`` steps apart, with the density shrinking
  geometrically (each round removes the same fraction of what is left: Frankle & Carbin 2019,
  Tanaka et al. 2020) or linearly.
- :class:`Gradual`: Zhu & Gupta (2017) cubic schedule
  ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_1 - t_0))^3`` with updates every ``every`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunescope.allocation import check_sparsity
from prunescope.errors import ConfigError
from prunescope.registry import Registry

SCHEDULES: Registry[type] = Registry("schedule")


def _check_steps(**steps: int) -> None:
    for name, value in steps.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"schedule {name} must be a non-negative integer, got {value!r}")


@SCHEDULES.register("one_shot")
@dataclass(frozen=True)
class OneShot:
    """Prune to ``sparsity`` at ``step`` (default 0) and hold it."""

    sparsity: float
    step: int = 0

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        _check_steps(step=self.step)

    def sparsity_at(self, step: int) -> float:
        return self.sparsity if step >= self.step else 0.0

    def is_update(self, step: int) -> bool:
        return step == self.step


@SCHEDULES.register("iterative")
@dataclass(frozen=True)
class Iterative:
    """``rounds`` prunings at ``start, start + every, ...``; round r of n reaches
    ``1 - (1 - sparsity)^(r/n)`` (geometric) or ``sparsity * r/n`` (linear)."""

    sparsity: float
    rounds: int
    every: int = 1
    start: int = 0
    spacing: str = "geometric"

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        _check_steps(every=self.every, start=self.start, rounds=self.rounds)
        if self.rounds < 1 or self.every < 1:
            raise ConfigError("iterative schedule needs rounds >= 1 and every >= 1")
        if self.spacing not in ("geometric", "linear"):
            raise ConfigError(f"spacing must be 'geometric' or 'linear', got {self.spacing!r}")

    def round_at(self, step: int) -> int:
        """Number of rounds done by ``step`` (0 before ``start``)."""
        if step < self.start:
            return 0
        return min(self.rounds, (step - self.start) // self.every + 1)

    def sparsity_at(self, step: int) -> float:
        fraction = self.round_at(step) / self.rounds
        if self.spacing == "linear":
            return self.sparsity * fraction
        return 1.0 - (1.0 - self.sparsity) ** fraction

    def is_update(self, step: int) -> bool:
        offset = step - self.start
        return offset >= 0 and offset % self.every == 0 and offset // self.every < self.rounds


@SCHEDULES.register("gradual")
@dataclass(frozen=True)
class Gradual:
    """Zhu & Gupta cubic ramp from ``initial`` at ``start`` to ``final`` at ``end``.

    The mask is updated at ``start, start + every, ...`` and at ``end``, where the final
    sparsity is reached whether or not ``end - start`` is a multiple of ``every``.
    """

    final: float
    start: int
    end: int
    every: int = 100
    initial: float = 0.0

    def __post_init__(self) -> None:
        check_sparsity(self.final, "final sparsity")
        check_sparsity(self.initial, "initial sparsity")
        _check_steps(start=self.start, end=self.end, every=self.every)
        if self.end <= self.start or self.every < 1:
            raise ConfigError(
                f"gradual schedule needs start < end and every >= 1 (got start={self.start}, "
                f"end={self.end}, every={self.every})"
            )
        if self.initial > self.final:
            raise ConfigError("gradual schedule needs initial sparsity <= final sparsity")

    def sparsity_at(self, step: int) -> float:
        if step < self.start:
            return 0.0
        if step >= self.end:
            return self.final
        last_update = self.start + (step - self.start) // self.every * self.every
        progress = (last_update - self.start) / (self.end - self.start)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3

    def is_update(self, step: int) -> bool:
        on_grid = self.start <= step < self.end and (step - self.start) % self.every == 0
        return on_grid or step == self.end


def build(kind: str, **options) -> OneShot | Iterative | Gradual:
    """Construct a registered schedule by name; bad options raise ConfigError."""
    cls = SCHEDULES.get(kind)
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for schedule {kind!r}: {exc}") from None
