"""The ``data_pruning`` recipe method: prune the training set, train a dense model on it.

One entry per density and strategy (the recipe's weight ``sparsities`` must be ``[0.0]``: the
model stays dense; the sweep variable is ``density``)::

    - {method: data_pruning, density: 0.5, strategy: random, quota: drop_code}

Scoring and query models are shared by every entry of a run (``OUT/data-pruning``); each entry's
model and result go to ``OUT/<label>/s0``. Registered lazily under ``data_pruning`` by
:mod:`prunescope.methods` (importing this module registers nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prunescope.data_pruning.select import (
    DataPruningSpec,
    check_classes,
    protocol_splits,
    prune_with,
)
from prunescope.data_pruning.training import train_on
from prunescope.errors import ConfigError
from prunescope.methods.base import Method
from prunescope.run import Run


@dataclass(frozen=True)
class DataPruning(Method):
    """Recipe keys: those of :class:`~prunescope.data_pruning.select.DataPruningSpec`."""

    method: str = "data_pruning"
    density: float = 0.5
    strategy: str = "random"
    quota: str = "none"
    query_models: int = 3
    query_epochs: int = 2
    score_models: int = 3
    score_epochs: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        self.spec  # noqa: B018  (validates the keys)

    @property
    def spec(self) -> DataPruningSpec:
        return DataPruningSpec(self.density, self.strategy, self.quota, self.query_models,
                               self.query_epochs, self.score_models, self.score_epochs)

    def default_label(self) -> str:
        return self.spec.label

    def check(self, run: Run, sparsities: tuple[float, ...]) -> None:
        if any(s != 0 for s in sparsities):
            raise ConfigError(f"{self.label}: data_pruning trains dense models on pruned data; "
                              "give it sparsities: [0.0] and vary density instead")
        if self.quota != "none":
            check_classes(run.splits.train, run.splits.num_classes, "training")
            check_classes(protocol_splits(run.splits, run.seed).val, run.splits.num_classes,
                          "validation")

    def run_one(self, run: Run, sparsity: float) -> list[dict[str, Any]]:
        kept = prune_with(run, self.spec)
        record = train_on(run, kept, self.directories(run, sparsity)[0], density=self.density,
                          budget=self.budget, desc=self.label)
        return [{"method": self.label, "sparsity": sparsity, **record}]
