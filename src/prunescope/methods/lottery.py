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
(with rewinding to step k the papers continue the schedule from k).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunescope import checkpoint
from prunescope.errors import ConfigError
from prunescope.mask import Mask
from prunescope.methods.base import Context, Method, check_unit, register, run_dir
from prunescope.patterns import topk_mask
from prunescope.sparsifier import MaskHold
from prunescope.targets import select

REWIND = "rewind.safetensors"
CONTROL_SEED_OFFSET = 1000


class Snapshot:
    """Training hook saving the weights when step ``at`` begins (the rewind point)."""

    mask = None

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
        for what, value in {"rate": self.rate, **self.rates}.items():
            if not 0 < value < 1:
                raise ConfigError(f"lottery: {what} must be a fraction in (0, 1), got {value}")
        if self.rewind < 0:
            raise ConfigError(f"lottery: rewind must be >= 0, got {self.rewind}")

    @property
    def results_per_sparsity(self) -> int:
        return 2 if self.control else 1

    def check(self, context: Context, sparsities: tuple[float, ...]) -> None:
        total = context.total_steps(self.budget)
        if context.steps(self.rewind, self.unit) >= total:
            raise ConfigError(f"lottery: the rewind point (step "
                              f"{context.steps(self.rewind, self.unit)}) is past the end of "
                              f"training ({total} steps)")

    def run(self, context: Context, sparsities: tuple[float, ...]) -> list[dict[str, Any]]:
        base = run_dir(context, self.label)
        model, mask = self.round_zero(context, base)
        rates = self.tensor_rates(mask)
        results, round_number = [], 0
        result = context.cached(base / "round00")
        for target in sorted(sparsities):
            while mask.sparsity < target - 1e-12:
                round_number += 1
                regular = keep_counts(mask, rates, 1.0)
                exact = 1 - sum(regular.values()) / mask.num_total > target
                counts = keep_counts(mask, rates, scale_for(mask, rates, target)) if exact \
                    else regular
                mask = prune_round(model, mask, counts)
                model, result = self.train_round(context, base, round_number, mask)
            results.append({**result, "sparsity": target})
            if self.control:
                results.append(self.control_run(context, base, target, mask))
        return results

    def tensor_rates(self, mask: Mask) -> dict[str, float]:
        rates = {}
        for name in mask:
            matches = [v for glob, v in self.rates.items() if fnmatchcase(name, glob)]
            rates[name] = matches[0] if matches else self.rate
        return rates

    def round_zero(self, context: Context, base: Path) -> tuple[nn.Module, Mask]:
        """Train the dense network, saving its weights at the rewind point."""
        model = context.fresh_model()
        prune_config = context.recipe.prune
        names = select(model, prune_config.include, prune_config.exclude)
        rewind_step = context.steps(self.rewind, self.unit)
        directory = base / "round00"
        if context.cached(directory) is None:
            started = time.perf_counter()
            hook = Snapshot(rewind_step, base / REWIND, context.meta(model))
            context.fit(model, directory, context.train_config(self.budget), hook=hook,
                        desc=f"{self.label} round 0")
            context.finish(directory, model, None, started, round=0)
        return context.load(directory / "model.safetensors"), Mask.ones(model, names)

    def train_round(self, context: Context, base: Path, number: int, mask: Mask
                    ) -> tuple[nn.Module, dict[str, Any]]:
        """Rewind the survivors, train with the mask held; cached per round."""
        directory = base / f"round{number:02d}"
        fields = {"method": self.label, "round": number}
        if (done := context.cached(directory)) is None:
            started = time.perf_counter()
            model = context.load(base / REWIND)
            mask.apply_(model)
            context.fit(model, directory, context.train_config(self.budget),
                        hook=MaskHold(mask), desc=f"{self.label} round {number}", method=fields)
            done = context.finish(directory, model, mask, started, **fields)
        return context.load(directory / "model.safetensors"), done

    def control_run(self, context: Context, base: Path, target: float, mask: Mask
                    ) -> dict[str, Any]:
        """The same mask trained from a fresh random initialisation."""
        directory = base / f"reinit-s{target:g}"
        fields = {"method": f"{self.label}-reinit", "sparsity": target}
        if (done := context.cached(directory)) is not None:
            return done
        started = time.perf_counter()
        model = context.fresh_model(seed=context.recipe.seed + CONTROL_SEED_OFFSET)
        mask.apply_(model)
        context.fit(model, directory, context.train_config(self.budget), hook=MaskHold(mask),
                    desc=f"{self.label} reinit s={target:g}", method=fields)
        return context.finish(directory, model, mask, started, **fields)
