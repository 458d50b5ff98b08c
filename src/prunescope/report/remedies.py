"""The remedies table: who pays for compression, and whether a remedy repairs it.

One row per population of an audit (dense first, then every compressed population in the
audit's order: sparse models, data-pruned ones such as DRoP's, robust-distillation students,
whatever the audit holds), computed from the typed result alone (per-model class recall,
:attr:`prunescope.audit.schema.ModelMetrics.recall`); standard library only, like the rest of
the report.

- **overall accuracy**: the population's :class:`~prunescope.audit.schema.Spread` (mean over
  its models; range over seeds, or a Wilson 95% interval for a single model).
- **worst-class accuracy**: per model, its lowest class recall (classes without an example
  skipped); mean over the models and range over them. The class that is worst in most models
  is named (ties to the lowest class index, as :func:`prunescope.audit.metrics.worst_class`).
- **harmed class** ``h``: the class whose recall the focus compressed populations lose most
  against dense, ``h = argmax_c mean_P (R_dense[c] - R_P[c])`` over the focus populations
  ``P``, where ``R_X[c]`` is the mean over X's models of their class-c recall
  (:attr:`PopulationAudit.recall`); classes without a recall in dense or in a focus
  population are skipped, ties go to the lowest class index. It is also the class of largest
  mean normalised change (Hooker et al.'s change minus the overall accuracy change, which is
  the same for every class). Its recall per population: mean over the models and range.

"Range over seeds" is ``[min, max]`` over the population's models (the interval the rest of
the page shows for accuracy), None for one model. Issue 12 item 5 asks for this table, to set
remedies (DRoP, Vysogorets et al. 2025; worst-class robust distillation, Wang et al. 2023)
beside the compressed models whose harm they target.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from prunescope.audit.schema import AuditResult, PopulationAudit, Spread


@dataclass(frozen=True)
class OverSeeds:
    """Mean of a per-model value over ``models`` models, and its ``[min, max]`` over them
    (None for one model)."""

    mean: float
    interval: list[float] | None
    models: int


@dataclass(frozen=True)
class RemedyRow:
    """One population: overall accuracy, worst-class accuracy and the class that is worst in
    most of its models (``worst_models`` of them), and the harmed class's recall (None without
    a harmed class)."""

    label: str
    k: int
    accuracy: Spread
    worst: OverSeeds | None
    worst_class: int | None
    worst_models: int
    harmed: OverSeeds | None


@dataclass(frozen=True)
class Remedies:
    """The harmed class (None without one), its mean recall drop over the focus populations
    (a fraction; positive = lost), and one row per population, dense first."""

    harmed_class: int | None
    harmed_drop: float | None
    rows: list[RemedyRow]


def remedies(result: AuditResult) -> Remedies:
    """The remedies table of an audit (see the module doc for every definition)."""
    harmed, drop = harmed_class(result)
    rows = [_row(block, harmed) for block in [result.dense, *result.populations]]
    return Remedies(harmed, drop, rows)


def harmed_class(result: AuditResult) -> tuple[int | None, float | None]:
    """``(h, drop)``: the class of largest mean recall drop from dense to the focus
    populations and that drop; ``(None, None)`` when no class has a recall everywhere."""
    focus = result.focus_populations()
    drops = {}
    for c, dense in enumerate(result.dense.recall):
        lost = [dense - block.recall[c] for block in focus
                if dense is not None and block.recall[c] is not None]
        if focus and len(lost) == len(focus):
            drops[c] = sum(lost) / len(lost)
    if not drops:
        return None, None
    worst = max(drops, key=lambda c: (drops[c], -c))
    return worst, drops[worst]


def over_seeds(values: list[float | None]) -> OverSeeds | None:
    """Mean and range of the defined values (None when none is)."""
    defined = [v for v in values if v is not None]
    if not defined:
        return None
    interval = [min(defined), max(defined)] if len(defined) > 1 else None
    return OverSeeds(sum(defined) / len(defined), interval, len(defined))


def _row(block: PopulationAudit, harmed: int | None) -> RemedyRow:
    worst = Counter(m.worst_class for m in block.models if m.worst_class is not None)
    most = max(worst, key=lambda c: (worst[c], -c)) if worst else None
    return RemedyRow(
        label=block.label, k=block.k, accuracy=block.accuracy,
        worst=over_seeds([m.worst_class_recall for m in block.models]),
        worst_class=most, worst_models=worst[most] if worst else 0,
        harmed=None if harmed is None else over_seeds([m.recall[harmed] for m in block.models]))
