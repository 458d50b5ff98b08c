"""Schedules: when the mask changes, as a pure function of the optimizer step.

Every schedule that runs implements one protocol, :class:`Schedule`: ``sparsity_at(step)`` is
the target sparsity at any step (0 where the model trains dense), and ``is_update(step)`` says
whether the mask is recomputed at that step. Nothing is remembered between calls, so a resumed
run asks the same questions and gets the same answers.

- :class:`OneShot`: the whole target at one step.
- :class:`Iterative`: ``rounds`` prunings ``every`` steps apart, with the density shrinking
  geometrically (each round removes the same fraction of what is left: Frankle & Carbin 2019,
  Tanaka et al. 2020) or linearly.
- :class:`Gradual`: Zhu & Gupta (2017) cubic schedule
  ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_1 - t_0))^3`` with updates every ``every`` steps
  (gradual magnitude pruning, ``gmp``).
- :class:`Phases`: AC/DC's dense warm-up, alternating compressed / decompressed phases and final
  compressed phase (Peste et al. 2021).
- :class:`DropGrow`: RigL's and SET's constant sparsity with a cosine-decaying drop fraction
  (Evci et al. 2020).
- :class:`Rounds`: the lottery ticket's rounds, each removing ``rate`` of what is left (Frankle
  & Carbin 2019); its "step" is the round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from prunescope.allocation import check_sparsity
from prunescope.errors import ConfigError
from prunescope.registry import Registry

SCHEDULES: Registry[type] = Registry("schedule")


class Schedule(Protocol):
    """What every schedule answers, for any step, with no state."""

    def sparsity_at(self, step: int) -> float:
        """The target sparsity at ``step`` (0.0 where the model trains dense)."""
        ...

    def is_update(self, step: int) -> bool:
        """True when the mask is recomputed at ``step``."""
        ...


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


@dataclass(frozen=True)
class Phases:
    """AC/DC's phases in optimizer steps (Peste et al., NeurIPS 2021).

    ``[0, warmup)`` dense; then cycles of a compressed phase of ``compressed`` steps and a
    decompressed one of ``decompressed`` steps, as many as fit *whole* before the final
    compressed phase ``[total - final, total)``; the last decompressed phase stretches to it.
    With the paper's ImageNet schedule (100 epochs, 10 warm-up, 5-epoch phases, final 15) the
    last compressed phase is epochs 70-75 and the last dense one 75-85, as in the authors' code.
    ``sparsity`` is the compressed phases' target.
    """

    warmup: int
    compressed: int
    decompressed: int
    final: int
    total: int
    sparsity: float = 0.0

    def __post_init__(self) -> None:
        lengths = (self.compressed, self.decompressed, self.final)
        if self.warmup < 0 or min(lengths) < 1:
            raise ConfigError("acdc: phase lengths must be positive (warmup may be 0)")
        if self.warmup + self.final > self.total:
            raise ConfigError(
                f"acdc: warm-up ({self.warmup} steps) and the final compressed phase "
                f"({self.final} steps) do not fit in the {self.total} training steps; shorten "
                "them or raise train.epochs"
            )

    @property
    def final_start(self) -> int:
        return self.total - self.final

    @property
    def cycle(self) -> int:
        return self.compressed + self.decompressed

    @property
    def cycles(self) -> int:
        """Whole compressed + decompressed cycles between the warm-up and the final phase."""
        return (self.final_start - self.warmup) // self.cycle

    def is_compressed(self, step: int) -> bool:
        if step >= self.final_start:
            return True
        offset = step - self.warmup
        return 0 <= offset < self.cycles * self.cycle and offset % self.cycle < self.compressed

    def starts_compression(self, step: int) -> bool:
        """True at the first step of a compressed phase (the mask is recomputed there)."""
        return self.is_compressed(step) and (step == 0 or not self.is_compressed(step - 1))

    def starts_phase(self, step: int) -> bool:
        return step > 0 and self.is_compressed(step) != self.is_compressed(step - 1)

    def sparsity_at(self, step: int) -> float:
        return self.sparsity if self.is_compressed(step) else 0.0

    def is_update(self, step: int) -> bool:
        return self.starts_compression(step)


@dataclass(frozen=True)
class DropGrow:
    """RigL / SET: constant ``sparsity``; every ``every`` steps before ``end`` the mask is
    rewired, moving the fraction ``alpha/2 (1 + cos(pi t / end))`` of each layer's kept weights."""

    every: int
    end: int
    alpha: float
    sparsity: float = 0.0

    def is_update(self, step: int) -> bool:
        return 0 < step < self.end and step % self.every == 0

    def fraction(self, step: int) -> float:
        return self.alpha / 2 * (1 + math.cos(math.pi * step / self.end))

    def sparsity_at(self, step: int) -> float:
        return self.sparsity


@dataclass(frozen=True)
class Rounds:
    """Iterative magnitude pruning's rounds: after round ``r`` the nominal sparsity is
    ``1 - (1 - rate)^r``; every round from 1 on prunes."""

    rate: float

    def __post_init__(self) -> None:
        if not 0 < self.rate < 1:
            raise ConfigError(f"lottery: rate must be in (0, 1), got {self.rate}")

    def sparsity_at(self, step: int) -> float:
        return 1.0 - (1.0 - self.rate) ** max(step, 0)

    def is_update(self, step: int) -> bool:
        return step >= 1

    def rounds_to(self, sparsity: float) -> int:
        """Regular rounds needed to reach ``sparsity`` (the last one may be cut short)."""
        return max(0, math.ceil(math.log1p(-sparsity) / math.log1p(-self.rate) - 1e-9))


def build(kind: str, **options) -> OneShot | Iterative | Gradual:
    """Construct a registered schedule by name; bad options raise ConfigError."""
    cls = SCHEDULES.get(kind)
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for schedule {kind!r}: {exc}") from None
