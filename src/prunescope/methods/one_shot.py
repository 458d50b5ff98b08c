"""One-shot pruning of the trained dense model, then fine-tuning with the mask held: the
compression pipeline (:func:`prunescope.pipeline.compress`) as a recipe method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prunescope.errors import ConfigError
from prunescope.methods.base import Method, register
from prunescope.pipeline import PruneSpec, compress
from prunescope.run import Run

START_POINTS = ("trained", "init")


@register("one_shot")
@dataclass(frozen=True)
class OneShot(Method):
    """Criterion x allocation under a pattern, applied once to the trained dense model (or to
    its initialisation with ``start: init``: pruning at initialisation, then training the
    sparse network with the run's fine-tuning config); ``bn_recalibration`` batches of 100
    training examples re-estimate batch-norm statistics right after pruning
    (:mod:`prunescope.bn`)."""

    method: str = "one_shot"
    criterion: str = "magnitude"
    allocation: str = "global"
    pattern: str = "unstructured"
    rounds: int | None = None
    overrides: dict[str, float] = field(default_factory=dict)
    effective: bool = False
    bn_recalibration: int = 0
    start: str = "trained"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bn_recalibration < 0:
            raise ConfigError("one_shot: bn_recalibration (batches) must be >= 0")
        if self.start not in START_POINTS:
            raise ConfigError(f"one_shot: start must be one of {START_POINTS}, got {self.start!r}")
        self.spec  # noqa: B018 - validates the names and overrides

    @property
    def spec(self) -> PruneSpec:
        return PruneSpec(self.criterion, self.allocation, self.pattern, self.rounds,
                         self.overrides, self.effective)

    def default_label(self) -> str:
        """E.g. ``magnitude+global`` or ``magnitude+global+2:4+effective``."""
        parts = [self.criterion, self.allocation]
        if self.pattern != "unstructured":
            parts.append(self.pattern)
        if self.effective:
            parts.append("effective")
        return "+".join(parts)

    def check(self, run: Run, sparsities: tuple[float, ...]) -> None:
        model = run.fresh_model()
        for sparsity in sparsities:
            self.spec.check(run, model, sparsity)

    def run_one(self, run: Run, sparsity: float) -> list[dict[str, Any]]:
        """Prune the dense model (trained, or its initialisation), fine-tune with the run's
        fine-tuning config scaled by ``budget`` (none when the run has none), evaluate."""
        model = run.load(run.dense_path(self.start))
        finetune = run.train_config(self.budget, run.finetune) if run.finetune else None
        fields = {"method": self.label, "criterion": self.criterion,
                  "allocation": self.allocation, "pattern": self.pattern, "sparsity": sparsity}
        return [compress(run, model, self.directories(run, sparsity)[0], spec=self.spec,
                         sparsity=sparsity, bn_batches=self.bn_recalibration, finetune=finetune,
                         fields=fields, desc=f"{self.label} s={sparsity:g}")]
