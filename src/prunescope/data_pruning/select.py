"""Which training examples a pruned set keeps: the DRoP protocol's splits, the query models'
recall, and the selection itself (random or by score, globally or within class quotas).

The protocol (Vysogorets, Ahuja & Kempe, ICLR 2025, and their code): the official test set is
split class by class 50/50 into a validation half (the query models' recall, each epoch's
validation accuracy) and a test half (every reported figure); the training set is untouched.
Query models are trained briefly on the full training set from several seeds and their
per-class validation recalls averaged. The paper reads each query model's recall at its best
validation epoch; here it is read after the last of its ``query_epochs`` (a short run with a
decaying learning rate ends near its best).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from prunescope.data import Splits, Subset, stratified_split
from prunescope.data_pruning.quotas import QUOTAS, check_density, drop_quotas
from prunescope.data_pruning.scores import el2n_scores, forgetting_scores, train_scorer
from prunescope.errors import ConfigError
from prunescope.run import Run
from prunescope.train import predict

STRATEGIES = ("random", "el2n", "forgetting")
SELECT_SEED = 7919  # offset of the selection's generator from the run's seed


@dataclass(frozen=True)
class DataPruningSpec:
    """How to prune a training set to ``density``: ``strategy`` ranks examples (``random``,
    ``el2n``, ``forgetting``; higher scores kept), ``quota`` fixes per-class counts (``none``:
    one global ranking; ``drop_code`` / ``drop_paper``: DRoP, :mod:`.quotas`).
    ``query_models`` models of ``query_epochs`` epochs set DRoP's recalls; ``score_models``
    models of ``score_epochs`` epochs set EL2N (forgetting uses one model of ``score_epochs``)."""

    density: float = 0.5
    strategy: str = "random"
    quota: str = "none"
    query_models: int = 3
    query_epochs: int = 2
    score_models: int = 3
    score_epochs: int = 2

    def __post_init__(self) -> None:
        check_density(self.density)
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown data-pruning strategy {self.strategy!r}; choose one of: "
                              f"{', '.join(STRATEGIES)}")
        if self.quota not in QUOTAS:
            raise ConfigError(f"unknown data-pruning quota {self.quota!r}; choose one of: "
                              f"{', '.join(QUOTAS)}")
        for name in ("query_models", "query_epochs", "score_models", "score_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"data pruning: {name} must be a positive integer, "
                                  f"got {value!r}")

    @property
    def label(self) -> str:
        """``strategy[+quota]-d<density>``, e.g. ``random+drop_code-d0.5``."""
        quota = "" if self.quota == "none" else f"+{self.quota}"
        return f"{self.strategy}{quota}-d{self.density:g}"


def protocol_splits(splits: Splits, seed: int) -> Splits:
    """``splits`` with the test set split class by class 50/50 (seeded): the first half becomes
    the validation set, the second the test set; the training set is unchanged."""
    test_half, val_half = stratified_split(splits.test.y, len(splits.test) // 2, seed)
    return dataclasses.replace(splits, val=splits.test.select(val_half),
                               test=splits.test.select(test_half))


def protocol_run(run: Run) -> Run:
    """``run`` on :func:`protocol_splits` (same training set, output directory and seed)."""
    return dataclasses.replace(run, splits=protocol_splits(run.splits, run.seed))


def class_recall(model: nn.Module, subset: Subset, num_classes: int,
                 batch_size: int = 1000) -> torch.Tensor:
    """Recall of each class on ``subset`` (float64 ``[num_classes]``, NaN for an absent
    class)."""
    predicted = predict(model, subset, batch_size).argmax(1)
    hits = torch.bincount(subset.y[predicted == subset.y], minlength=num_classes)
    counts = torch.bincount(subset.y, minlength=num_classes)
    return hits.double() / counts.double()


def query_recall(run: Run, models: int = 3, epochs: int = 2) -> torch.Tensor:
    """DRoP's per-class validation recall, averaged over ``models`` query models trained
    ``epochs`` epochs on the full training set of the protocol run (seeds ``run.seed + k``)."""
    run = protocol_run(run)
    check_classes(run.splits.val, run.splits.num_classes, "validation")
    recalls = [class_recall(train_scorer(run, "query", epochs, k)[0], run.splits.val,
                            run.splits.num_classes, run.train.eval_batch_size)
               for k in range(models)]
    return torch.stack(recalls).mean(0)


def check_classes(subset: Subset, num_classes: int, what: str) -> None:
    """ConfigError naming the first class without examples in ``subset`` (DRoP needs every
    class in the training set and in the validation half)."""
    counts = torch.bincount(subset.y, minlength=num_classes)
    empty = torch.nonzero(counts == 0).reshape(-1)
    if empty.numel():
        raise ConfigError(f"class {int(empty[0])} has no {what} examples, so its DRoP quota "
                          "cannot be met; drop the class from the data or use quota: none")


def example_scores(run: Run, spec: DataPruningSpec) -> torch.Tensor | None:
    """Each training example's score under ``spec.strategy`` (None for random)."""
    if spec.strategy == "el2n":
        return el2n_scores(protocol_run(run), spec.score_models, spec.score_epochs)
    if spec.strategy == "forgetting":
        return forgetting_scores(protocol_run(run), spec.score_epochs)
    return None


def class_counts(run: Run, spec: DataPruningSpec) -> torch.Tensor | None:
    """DRoP's per-class keep counts under ``spec`` (None without a quota)."""
    if spec.quota == "none":
        return None
    labels, num_classes = run.splits.train.y, run.splits.num_classes
    check_classes(run.splits.train, num_classes, "training")
    recall = query_recall(run, spec.query_models, spec.query_epochs)
    sizes = torch.bincount(labels, minlength=num_classes)
    return drop_quotas(recall, sizes, keep_count(len(labels), spec.density), spec.quota)


def keep_count(total: int, density: float) -> int:
    """Examples kept of ``total`` at ``density`` (rounded, at least one)."""
    return max(1, round(density * total))


def select(labels: torch.Tensor, keep: int, scores: torch.Tensor | None,
           quotas: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Sorted positions of the kept examples: the ``keep`` highest ``scores`` (random order
    when None), globally or ``quotas[k]`` within each class ``k``; equal scores are ordered
    at random by ``generator`` (forgetting counts are mostly ties: a fixed order would keep
    the examples of low positions, and a dataset's order is not random)."""
    if scores is None:
        order = torch.sort(-torch.randperm(len(labels), generator=generator).double(),
                           stable=True).indices
    else:
        shuffled = torch.randperm(len(labels), generator=generator)
        order = shuffled[torch.sort(-scores[shuffled], stable=True).indices]
    if quotas is None:
        return order[:keep].sort().values
    # rank of every example within its class, in score order
    by_class = order[torch.sort(labels[order], stable=True).indices]
    counts = torch.bincount(labels, minlength=len(quotas))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(labels)) - torch.repeat_interleave(starts, counts)
    kept = by_class[rank < torch.repeat_interleave(quotas, counts)]
    return kept.sort().values


def prune_data(run: Run, density: float, strategy: str = "random", quota: str = "none",
               **options: int) -> torch.Tensor:
    """Positions in ``run.splits.train`` of the examples a pruned set keeps (sorted int64).

    ``options`` are the other fields of :class:`DataPruningSpec` (query and scoring models).
    Bad input (density outside (0, 1], an unknown strategy or quota, a class without examples
    under a quota) raises :class:`ConfigError` before anything is trained or written."""
    return prune_with(run, DataPruningSpec(density, strategy, quota, **options))


def prune_with(run: Run, spec: DataPruningSpec) -> torch.Tensor:
    """:func:`prune_data` with a ready :class:`DataPruningSpec`."""
    labels = run.splits.train.y
    if spec.quota != "none":
        check_classes(run.splits.train, run.splits.num_classes, "training")
        check_classes(protocol_splits(run.splits, run.seed).val, run.splits.num_classes,
                      "validation")
    quotas = class_counts(run, spec)
    scores = example_scores(run, spec)
    generator = torch.Generator().manual_seed(run.seed + SELECT_SEED)
    return select(labels, keep_count(len(labels), spec.density), scores, quotas, generator)
