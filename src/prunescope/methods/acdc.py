"""AC/DC: alternating compressed / decompressed training (Peste et al., NeurIPS 2021).

After a dense warm-up, training alternates compressed phases (at each phase start the weights
are pruned to the target sparsity by global magnitude top-k and the mask is held) and
decompressed phases (every weight trains again; pruned ones restart from zero), and ends with a
longer compressed phase. Optionally the optimizer's momentum is reset at every phase change.
One run yields two models: the final sparse one and the dense one co-trained with it (the best,
by validation accuracy, of the models at the ends of the decompressed phases).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunescope import checkpoint
from prunescope.allocation import ALLOCATIONS
from prunescope.errors import ConfigError
from prunescope.mask import Mask
from prunescope.methods.base import Context, Method, check_unit, register, run_dir
from prunescope.sparsifier import MaskHold, agree, prune
from prunescope.train import evaluate

DENSE = "dense.safetensors"


@dataclass(frozen=True)
class Phases:
    """AC/DC's phases in optimizer steps, as a pure function of the step.

    ``[0, warmup)`` dense; then ``cycles`` of a compressed phase of ``compressed`` steps and a
    decompressed one of ``decompressed`` steps; then a final compressed phase to ``total``.
    """

    warmup: int
    compressed: int
    decompressed: int
    final: int
    total: int

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

    def is_compressed(self, step: int) -> bool:
        if step >= self.final_start:
            return True
        return step >= self.warmup and (step - self.warmup) % self.cycle < self.compressed

    def starts_compression(self, step: int) -> bool:
        """True at the first step of a compressed phase (the mask is recomputed there)."""
        return self.is_compressed(step) and (step == 0 or not self.is_compressed(step - 1))

    def starts_phase(self, step: int) -> bool:
        return step > 0 and self.is_compressed(step) != self.is_compressed(step - 1)


class ACDCHook(MaskHold):
    """Training hook: prune at compressed-phase starts, hold the mask during compressed
    phases, train densely otherwise; hands each decompressed phase's end to ``on_dense``."""

    def __init__(self, phases: Phases, sparsity: float, allocation: str, *,
                 reset_momentum: bool, on_dense: Callable[[nn.Module, int], None],
                 prune_options: dict[str, Any]) -> None:
        super().__init__(None)
        self.phases, self.sparsity, self.allocation = phases, sparsity, allocation
        self.reset_momentum, self.on_dense = reset_momentum, on_dense
        self.prune_options = prune_options

    def on_step(self, model: nn.Module, step: int, optimizer=None) -> None:
        if self.phases.starts_compression(step):
            if step > self.phases.warmup:  # the end of a decompressed phase
                self.on_dense(model, step)
            self.mask = agree(model, prune(model, "magnitude", self.allocation, self.sparsity,
                                           rounds=1, **self.prune_options))
        elif not self.phases.is_compressed(step):
            self.mask = None
        if self.reset_momentum and optimizer is not None and self.phases.starts_phase(step):
            reset_optimizer_state(optimizer)


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero every tensor of the optimizer state (momentum buffers, Adam moments)."""
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                value.zero_()


@register("acdc")
@dataclass(frozen=True)
class ACDC(Method):
    """Phase lengths in ``unit``: epochs, steps, or (the default) fractions of the
    budget-scaled training, by default the paper's ImageNet proportions (10 warm-up epochs,
    5-epoch phases, final 15 of 100)."""

    method: str = "acdc"
    allocation: str = "global"
    warmup: float = 0.1
    compressed: float = 0.05
    decompressed: float = 0.05
    final: float = 0.15
    unit: str = "fraction"
    reset_momentum: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        ALLOCATIONS.get(self.allocation)
        check_unit("acdc", self.unit)

    def phases(self, context: Context) -> Phases:
        steps = [context.steps(v, self.unit, self.budget)
                 for v in (self.warmup, self.compressed, self.decompressed, self.final)]
        total = context.total_steps(self.budget)
        return Phases(*steps, total=total)

    def check(self, context: Context, sparsities: tuple[float, ...]) -> None:
        self.phases(context)

    def run_one(self, context: Context, sparsity: float) -> dict[str, Any]:
        directory = run_dir(context, self.label, sparsity)
        if (done := context.cached(directory)) is not None:
            return done
        started = time.perf_counter()
        model = context.fresh_model()
        best = _BestDense(context, directory)
        prune_config = context.recipe.prune
        hook = ACDCHook(self.phases(context), sparsity, self.allocation,
                        reset_momentum=self.reset_momentum, on_dense=best,
                        prune_options={"include": prune_config.include,
                                       "exclude": prune_config.exclude})
        fields = {"method": self.label, "sparsity": sparsity}
        directory.mkdir(parents=True, exist_ok=True)
        context.fit(model, directory, context.train_config(self.budget), hook=hook,
                    desc=f"{self.label} s={sparsity:g}", method=fields)
        dense = best.accuracy()
        mask = hook.mask if hook.mask is not None else Mask.from_weights(model)
        return context.finish(directory, model, mask, started, **fields, **dense)


class _BestDense:
    """Keeps the co-trained dense model with the best validation accuracy on disk."""

    def __init__(self, context: Context, directory) -> None:
        self.context, self.path = context, directory / DENSE

    def __call__(self, model: nn.Module, step: int) -> None:
        val = evaluate(model, self.context.splits.val)["accuracy"]
        if self.path.exists() and checkpoint.load(self.path).meta["val_accuracy"] >= val:
            return
        checkpoint.save(self.path, model, meta=self.context.meta(
            model, step=step, val_accuracy=val))

    def accuracy(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"dense_accuracy": None}
        dense = self.context.load(self.path)
        scores = self.context.scores(dense)
        return {"dense_accuracy": scores["accuracy"], "dense_val_accuracy": scores["val_accuracy"],
                "dense_checkpoint": str(self.path)}
