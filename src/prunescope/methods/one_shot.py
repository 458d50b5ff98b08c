"""One-shot pruning of the trained dense model, then fine-tuning with the mask held."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prunescope import checkpoint
from prunescope.allocation import ALLOCATIONS, check_sparsity
from prunescope.bn import recalibrate_bn
from prunescope.criteria import CRITERIA
from prunescope.errors import ConfigError
from prunescope.methods.base import Context, Method, register, run_dir
from prunescope.patterns import parse_pattern
from prunescope.sparsifier import MaskHold, check, prune
from prunescope.train import FINAL


@register("one_shot")
@dataclass(frozen=True)
class OneShot(Method):
    """Criterion x allocation under a pattern, applied once to the trained dense model (or to
    its initialisation with ``start: init``: pruning at initialisation, then training the
    sparse network with ``finetune``); ``bn_recalibration`` batches of 100 training examples
    re-estimate batch-norm statistics right after pruning (:mod:`prunescope.bn`)."""

    method: str = "one_shot"
    criterion: str = "magnitude"
    allocation: str = "global"
    pattern: str = "unstructured"
    rounds: int | None = None
    overrides: dict[str, float] = field(default_factory=dict)
    effective: bool = False
    bn_recalibration: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bn_recalibration < 0:
            raise ConfigError("one_shot: bn_recalibration (batches) must be >= 0")
        CRITERIA.get(self.criterion)
        ALLOCATIONS.get(self.allocation)
        parse_pattern(self.pattern)
        for glob, value in self.overrides.items():
            check_sparsity(value, f"override {glob!r}")

    def default_label(self) -> str:
        """E.g. ``magnitude+global`` or ``magnitude+global+2:4+effective``."""
        parts = [self.criterion, self.allocation]
        if self.pattern != "unstructured":
            parts.append(self.pattern)
        if self.effective:
            parts.append("effective")
        return "+".join(parts)

    def check(self, context: Context, sparsities: tuple[float, ...]) -> None:
        prune_config = context.recipe.prune
        model = context.fresh_model()
        for sparsity in sparsities:
            check(model, self.criterion, self.allocation, sparsity, pattern=self.pattern,
                  include=prune_config.include, exclude=prune_config.exclude,
                  overrides=self.overrides)

    def run_one(self, context: Context, sparsity: float) -> dict[str, Any]:
        """Prune, fine-tune (if the recipe has ``finetune``), evaluate; cached in result.json."""
        directory = run_dir(context, self.label, sparsity)
        if (done := context.cached(directory)) is not None:
            return done
        recipe, started = context.recipe, time.perf_counter()
        source = "model.safetensors" if recipe.prune.start == "trained" else "init.safetensors"
        model = context.load(context.out / "dense" / source)
        mask = prune(model, self.criterion, self.allocation, sparsity,
                     data=context.scoring_batches(), pattern=self.pattern,
                     include=recipe.prune.include, exclude=recipe.prune.exclude,
                     overrides=self.overrides, rounds=self.rounds, effective=self.effective,
                     seed=recipe.seed)
        if self.bn_recalibration:
            recalibrate_bn(model, context.batches(self.bn_recalibration, 100, seed_offset=1))
        directory.mkdir(parents=True, exist_ok=True)
        mask.save(directory / "mask.safetensors")
        before = context.scores(model)["accuracy"]
        fields = self.fields(sparsity)
        finetune = recipe.finetune
        if finetune is not None and finetune.epochs > 0:
            context.fit(model, directory, context.train_config(self.budget, finetune),
                        hook=MaskHold(mask), desc=f"{self.label} s={sparsity:g}", method=fields)
        else:
            checkpoint.save(directory / FINAL, model, meta=context.meta(model, method=fields),
                            mask=mask)
        return context.finish(directory, model, mask, started, **fields,
                              accuracy_before_finetune=before,
                              finetuned=finetune is not None and finetune.epochs > 0)

    def fields(self, sparsity: float) -> dict[str, Any]:
        return {"method": self.label, "criterion": self.criterion,
                "allocation": self.allocation, "pattern": self.pattern, "sparsity": sparsity}
