"""Training on a pruned training set and what it is judged by.

A pruned-data run is the DRoP protocol run (:func:`~prunescope.data_pruning.select.protocol_run`)
whose training set is the kept examples. It trains a fresh dense model for
``E' = floor((0.5 + 0.5 d) E / d)`` epochs (:func:`~prunescope.data_pruning.quotas.pruned_epochs`,
``E`` the run's epochs) and reports, on the test half: overall accuracy, each class's recall and
the worst of them (the figure DRoP is built to raise).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from prunescope.data_pruning.quotas import check_density, pruned_epochs
from prunescope.data_pruning.select import class_recall, protocol_run
from prunescope.errors import ConfigError
from prunescope.mask import Mask
from prunescope.run import Run
from prunescope.targets import select as select_targets


def pruned_run(run: Run, kept: torch.Tensor, out: Path | None = None) -> Run:
    """The protocol run whose training set is ``run.splits.train`` at positions ``kept``."""
    base = protocol_run(run)
    kept = torch.as_tensor(kept, dtype=torch.int64)
    if kept.numel() == 0 or kept.min() < 0 or kept.max() >= len(run.splits.train):
        raise ConfigError(f"kept positions must be in 0..{len(run.splits.train) - 1} and not "
                          "empty; pass what prune_data returned")
    splits = dataclasses.replace(base.splits, train=base.splits.train.select(kept))
    return dataclasses.replace(base, splits=splits, out=Path(out) if out else run.out)


def train_on(run: Run, kept: torch.Tensor, directory: str | Path, *,
             density: float | None = None, budget: float = 1.0,
             desc: str = "pruned data") -> dict[str, Any]:
    """Train a fresh model of ``run`` on the kept examples for ``E'`` epochs (``density``
    defaults to the kept fraction; ``budget`` scales ``E``) in ``directory`` and evaluate it.

    Returns the run's result record (test-half accuracy and loss, validation-half accuracy,
    sparsity 0) with ``density``, ``kept``, ``kept_per_class``, ``epochs``,
    ``per_class_recall``, ``worst_class_recall`` and ``worst_class``."""
    total = len(run.splits.train)
    density = check_density(len(kept) / total if density is None else density)
    pruned = pruned_run(run, kept, Path(directory))
    epochs = pruned_epochs(run.train_config(budget).epochs, density)
    config = dataclasses.replace(run.train, epochs=epochs)
    model = pruned.fresh_model()
    pruned.fit(model, Path(directory), config, desc=desc, distill=False)
    return evaluate_pruned(pruned, model, density=density, epochs=epochs)


def evaluate_pruned(pruned: Run, model: torch.nn.Module, **fields: Any) -> dict[str, Any]:
    """The result record of ``model`` trained on ``pruned``'s training set (see
    :func:`train_on`)."""
    splits = pruned.splits
    recall = class_recall(model, splits.test, splits.num_classes, pruned.train.eval_batch_size)
    present = ~recall.isnan()
    worst = int(torch.where(present, recall, torch.inf).argmin())
    mask = Mask.ones(model, select_targets(model, pruned.targets.include,
                                            pruned.targets.exclude))
    return pruned.result(
        model, mask, **fields, kept=len(splits.train),
        kept_per_class=torch.bincount(splits.train.y, minlength=splits.num_classes).tolist(),
        per_class_recall=[None if r != r else float(r) for r in recall.tolist()],
        worst_class_recall=float(recall[worst]), worst_class=splits.classes[worst])
