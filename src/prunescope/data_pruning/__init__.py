"""Data pruning: keep a fraction of the training set, chosen for who pays.

Strategies rank examples (random; EL2N, Paul et al. 2021; forgetting counts, Toneva et al. 2019)
and DRoP (Vysogorets, Ahuja & Kempe, ICLR 2025) fixes how many each class keeps, in proportion
to its query models' validation error, capped at the class size (:mod:`.quotas`, with the
paper's and the authors' code's weightings). Without a recipe::

    from prunescope.data_pruning import prune_data, train_on
    kept = prune_data(run, 0.5, strategy="random", quota="drop_code")
    result = train_on(run, kept, "runs/drop/random+drop_code-d0.5")
    result["accuracy"], result["worst_class_recall"], result["per_class_recall"]

In a recipe: the ``data_pruning`` method (:mod:`.method`); on the command line:
``prunescope prune-data``. See ``docs/data_pruning.md``.
"""

from prunescope.data_pruning.quotas import (
    QUOTAS,
    capped_shares,
    class_weights,
    drop_quotas,
    pruned_epochs,
)
from prunescope.data_pruning.scores import el2n, el2n_scores, forgetting_counts, forgetting_scores
from prunescope.data_pruning.select import (
    STRATEGIES,
    DataPruningSpec,
    class_recall,
    protocol_run,
    protocol_splits,
    prune_data,
    prune_with,
    query_recall,
    select,
)
from prunescope.data_pruning.training import evaluate_pruned, pruned_run, train_on

__all__ = [
    "QUOTAS",
    "STRATEGIES",
    "DataPruningSpec",
    "capped_shares",
    "class_recall",
    "class_weights",
    "drop_quotas",
    "el2n",
    "el2n_scores",
    "evaluate_pruned",
    "forgetting_counts",
    "forgetting_scores",
    "protocol_run",
    "protocol_splits",
    "prune_data",
    "prune_with",
    "pruned_epochs",
    "pruned_run",
    "query_recall",
    "select",
    "train_on",
]
