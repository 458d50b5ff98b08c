"""The one compression pipeline: prune -> recalibrate -> fine-tune -> evaluate.

Every path that compresses a trained model goes through :func:`compress`: ``prunescope
prune``, the recipe's one-shot stage, CrAM's one-shot evaluation, sparse transfer (which keeps
its source's mask and only fine-tunes) and the transformer track. Its defaults are defined once,
here: :class:`PruneSpec` (what to prune and how), :data:`FINETUNE` (how to recover) and
:data:`BN_BATCH_SIZE`. Writing ``result.json`` and deciding whether to skip are the stages' job
(:mod:`prunescope.stages`), not this module's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from prunescope import checkpoint
from prunescope.allocation import ALLOCATIONS, check_sparsity
from prunescope.bn import recalibrate_bn
from prunescope.criteria import CRITERIA
from prunescope.errors import ConfigError
from prunescope.mask import Mask
from prunescope.patterns import parse_pattern
from prunescope.run import Run
from prunescope.sparsifier import MaskHold, check, prune
from prunescope.train import FINAL, TrainConfig

BN_BATCH_SIZE = 100  # training examples per batch-norm recalibration batch
MASK = "mask.safetensors"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """How a pruned model recovers: :class:`~prunescope.train.TrainConfig` with the fine-tuning
    defaults (2 epochs at learning rate 0.01, a tenth of the dense default, as in the
    prune-then-fine-tune literature)."""

    epochs: int = 2
    lr: float = 0.01


FINETUNE = FinetuneConfig()


@dataclass(frozen=True)
class PruneSpec:
    """Criterion x allocation under a pattern (see :func:`prunescope.prune`); ``rounds``
    re-scores in several rounds, ``overrides`` fixes some tensors' sparsity, ``effective``
    reaches the sparsity as effective sparsity."""

    criterion: str = "magnitude"
    allocation: str = "global"
    pattern: str = "unstructured"
    rounds: int | None = None
    overrides: Mapping[str, float] = field(default_factory=dict)
    effective: bool = False

    def __post_init__(self) -> None:
        CRITERIA.get(self.criterion)
        ALLOCATIONS.get(self.allocation)
        parse_pattern(self.pattern)
        for glob, value in self.overrides.items():
            check_sparsity(value, f"override {glob!r}")

    def check(self, run: Run, model: nn.Module, sparsity: float | None) -> None:
        """Raise what :meth:`apply` would raise, scoring nothing."""
        check(model, self.criterion, self.allocation, sparsity, pattern=self.pattern,
              overrides=self.overrides, **run.targets.options())

    def apply(self, run: Run, model: nn.Module, sparsity: float | None,
              start: Mask | None = None) -> Mask:
        """Prune ``model`` in place with the run's targets, scoring batches and seed."""
        return prune(model, self.criterion, self.allocation, sparsity, run.scoring_batches(),
                     pattern=self.pattern, overrides=self.overrides, rounds=self.rounds,
                     effective=self.effective, mask=start, seed=run.seed,
                     **run.targets.options())


def compress(run: Run, model: nn.Module, directory: Path, *, spec: PruneSpec | None,
             sparsity: float | None, start: Mask | None = None, bn_batches: int = 0,
             finetune: TrainConfig | None = None, fields: Mapping[str, Any],
             desc: str) -> dict[str, Any]:
    """Prune ``model`` (``spec`` at ``sparsity``, keeping ``start``'s pruned weights pruned; no
    pruning when ``spec`` is None: ``start`` is then the mask to hold), re-estimate batch-norm
    statistics on ``bn_batches`` training batches, fine-tune with the mask held (``finetune``;
    None: no training), evaluate. Writes ``directory/{mask,model}.safetensors`` (fine-tuning
    resumes from ``directory``) and returns the result record: ``fields``, the sparsity report,
    the scores, ``accuracy_before_finetune``, ``bn_recalibration_batches`` (0 for a model
    without batch norm) and ``finetuned``."""
    if bn_batches < 0:
        raise ConfigError(f"batch-norm recalibration needs >= 0 batches, got {bn_batches}")
    if spec is not None:
        mask = spec.apply(run, model, sparsity, start if start is not None and
                          start.sparsity > 0 else None)
    elif start is not None:
        mask = start
        mask.apply_(model)
    else:
        raise ConfigError("compress needs a pruning spec or a mask to hold")
    recalibrated = (recalibrate_bn(model, run.batches(bn_batches, BN_BATCH_SIZE, seed_offset=1))
                    if bn_batches else 0)
    directory.mkdir(parents=True, exist_ok=True)
    mask.save(directory / MASK)
    before = run.scores(model)["accuracy"]
    if finetune is not None:
        run.fit(model, directory, finetune, hook=MaskHold(mask), desc=desc, method=dict(fields))
    else:
        checkpoint.save(directory / FINAL, model, meta=run.meta(model, method=dict(fields)),
                        mask=mask)
    return run.result(model, mask, **fields, accuracy_before_finetune=before,
                      bn_recalibration_batches=recalibrated, finetuned=finetune is not None)
