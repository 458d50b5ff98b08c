"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin, ICLR 2019;
Frankle, Dziugaite, Roy & Carbin, ICML 2020).

Round 0 trains the dense network and keeps its weights at the rewind point (step 0, the
initialisation, or step k). Every later round prunes ``rate`` of each layer's remaining weights
by magnitude (per-tensor ``rates`` override it, e.g. the output layer at half rate), resets the
survivors to their rewind-point values and trains again with the mask held. One path serves all
target sparsities: when a regular round would pass the next target, that round prunes exactly to
the target instead (every layer's rate scaled by one factor). The control trains each ticket's
mask from a fresh random initialisation.

Differences from the papers, stated: every round trains the recipe's full schedule from step 0
(with rewinding to step k the papers continue the schedule from k). Each target's ticket is the
regular rounds that stay below it plus one round exactly to it, so tickets of several targets
share their regular rounds and none depends on which other targets were asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunescope import checkpoint
from prunescope.errors import ConfigError
from prunescope.hooks import Hook
from prunescope.mask import Mask
from prunescope.methods.base import Method, check_unit, register
from prunescope.patterns import topk_mask
from prunescope.run import Run
from prunescope.schedules import Rounds
from prunescope.sparsifier import MaskHold
from prunescope.targets import select
from prunescope.train import FINAL

REWIND = "rewind.safetensors"
CONTROL_SEED_OFFSET = 1000


class Snapshot(Hook):
    """Training hook saving the weights when step ``at`` begins (the rewind point)."""

    def __init__(self, at: int, path: Path, meta: dict[str, Any]) -> None:
        self.at, self.path, self.meta = at, path, meta

    def on_step(self, model: nn.Module, step: int, optimizer=None) -> None:
        if step == self.at:
            checkpoint.save(self.path, model, meta={**self.meta, "step": step})


def keep_counts(mask: Mask, rates: dict[str, float], scale: float) -> dict[str, int]:
    """Each tensor keeps ``round(kept * (1 - scale * rate))`` of its kept weights."""
    return {n: round(int(keep.sum()) * (1 - scale * rates[n])) for n, keep in mask.items()}


def prune_round(model: nn.Module, mask: Mask, counts: dict[str, int]) -> Mask:
    """Keep the ``counts[name]`` largest-magnitude kept weights of every tensor."""
    params = dict(model.named_parameters())
    return Mask({n: topk_mask(torch.where(keep, params[n].detach().abs(), -torch.inf), counts[n])
                 for n, keep in mask.items()})


def scale_for(mask: Mask, rates: dict[str, float], target: float) -> float:
    """The rate scale in (0, 1] whose round reaches sparsity ``target`` (>= it, closest)."""
    goal = round((1 - target) * mask.num_total)
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        kept = sum(keep_counts(mask, rates, middle).values())
        low, high = (middle, high) if kept > goal else (low, middle)
    return high


@register("lottery")
@dataclass(frozen=True)
class Lottery(Method):
    """``rate`` of the remaining weights pruned per round, ``rates`` per-tensor overrides by
    glob; ``rewind`` in ``unit`` (steps, epochs or a fraction of training; 0: the
    initialisation); ``control`` adds the random
    re-initialisation control for every target."""

    method: str = "lottery"
    rate: float = 0.2
    rates: dict[str, float] = field(default_factory=dict)
    rewind: float = 0.0
    unit: str = "steps"
    control: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_unit("lottery", self.unit)
        Rounds(self.rate)
        for what, value in {"rate": self.rate, **self.rates}.items():
            if not 0 < value < 1:
                raise ConfigError(f"lottery: {what} must be a fraction in (0, 1), got {value}")
        if self.rewind < 0:
            raise ConfigError(f"lottery: rewind must be >= 0, got {self.rewind}")

    def outputs(self) -> tuple[str, ...]:
        return (self.label, f"{self.label}-reinit") if self.control else (self.label,)

    def directories(self, run: Run, sparsity: float) -> list[Path]:
        main = [run.dir(self.label, sparsity)]
        return main + [run.dir(self.label) / f"reinit-s{sparsity:g}"] if self.control else main

    def check(self, run: Run, sparsities: tuple[float, ...]) -> None:
        total = run.total_steps(self.budget)
        if run.steps(self.rewind, self.unit) >= total:
            raise ConfigError(f"lottery: the rewind point (step "
                              f"{run.steps(self.rewind, self.unit)}) is past the end of "
                              f"training ({total} steps)")

    def run_one(self, run: Run, sparsity: float) -> list[dict[str, Any]]:
        """Regular rounds while they stay below ``sparsity``, then one round exactly to it;
        the regular rounds are shared by every target (``OUT/<label>/roundNN``), the exact one
        is the target's own (``roundNN-s<sparsity>``)."""
        base = run.dir(self.label)
        model, mask = self.round_zero(run, base)
        rates = self.tensor_rates(mask)
        number, directory = 0, base / "round00"
        while mask.sparsity < sparsity - 1e-12:
            number += 1
            regular = keep_counts(mask, rates, 1.0)
            exact = 1 - sum(regular.values()) / mask.num_total > sparsity
            counts = keep_counts(mask, rates, scale_for(mask, rates, sparsity)) if exact \
                else regular
            mask = prune_round(model, mask, counts)
            directory = base / (f"round{number:02d}" + (f"-s{sparsity:g}" if exact else ""))
            model = self.train_round(run, base, directory, number, mask)
        results = [run.result(model, mask, method=self.label, sparsity=sparsity, rounds=number,
                              checkpoint=str(directory / FINAL))]
        if self.control:
            results.append(self.control_run(run, sparsity, mask))
        return results

    def tensor_rates(self, mask: Mask) -> dict[str, float]:
        rates = {}
        for name in mask:
            matches = [v for glob, v in self.rates.items() if fnmatchcase(name, glob)]
            rates[name] = matches[0] if matches else self.rate
        return rates

    def round_zero(self, run: Run, base: Path) -> tuple[nn.Module, Mask]:
        """Train the dense network (resumed, or read back when trained), saving its weights at
        the rewind point."""
        model = run.fresh_model()
        names = select(model, run.targets.include, run.targets.exclude)
        hook = Snapshot(run.steps(self.rewind, self.unit), base / REWIND, run.meta(model))
        run.fit(model, base / "round00", run.train_config(self.budget), hook=hook,
                desc=f"{self.label} round 0")
        return model, Mask.ones(model, names)

    def train_round(self, run: Run, base: Path, directory: Path, number: int, mask: Mask
                    ) -> nn.Module:
        """Rewind the survivors and train with the mask held (resumed when there)."""
        model = run.load(base / REWIND)
        mask.apply_(model)
        run.fit(model, directory, run.train_config(self.budget), hook=MaskHold(mask),
                desc=f"{self.label} round {number}", method={"method": self.label,
                                                             "round": number})
        return model

    def control_run(self, run: Run, target: float, mask: Mask) -> dict[str, Any]:
        """The same mask trained from a fresh random initialisation."""
        directory = self.directories(run, target)[1]
        fields = {"method": f"{self.label}-reinit", "sparsity": target}
        model = run.fresh_model(seed=run.seed + CONTROL_SEED_OFFSET)
        mask.apply_(model)
        run.fit(model, directory, run.train_config(self.budget), hook=MaskHold(mask),
                desc=f"{self.label} reinit s={target:g}", method=fields)
        return run.result(model, mask, **fields)
