"""Compression-identified exemplars (CIEs, also PIEs) and disproportionately affected classes.

Hooker, Courville, Clark, Dauphin & Frome, "What Do Compressed Deep Neural Networks Forget?"
(2019; first titled "Selective Brain Damage") and Hooker, Moorosi, Clark, Bengio & Denton,
"Characterising Bias in Compressed Models" (2020), as implemented in google-research
``pruning_identified_exemplars``:

- an example is a CIE when the *modal* prediction of the compressed population differs from the
  modal prediction of the dense population; a tie between labels goes to the largest label
  (``predictions.mode().max()`` in ``pie_dataset_gen/aggregate_predictions.py``);
- a class is disproportionately affected when Welch's t-test (unequal variances,
  ``scipy.stats.ttest_ind(..., equal_var=False)``) separates the per-model class recall minus
  that population's mean top-1 accuracy, dense against compressed
  (``per_class_accuracy/gen_tstatistic.py``). With C classes tested at once, C x alpha of them
  would be marked by chance alone; here the p-values are Holm-Bonferroni adjusted across the
  classes (family-wise error rate alpha), which the authors' code does not do, and the
  uncorrected marks are reported beside the corrected ones.

With one model in a population its "modal" label is that model's own prediction, so the CIE
count mixes that model's seed-to-seed noise with what compression changed: a single compressed
run against a 5-seed dense population counts every example where that run differs from the
dense *mode*, including those where the same-seed dense run differs from the mode as well. Its
flips (disagreements with the dense run of the same seed) are a different, paired count; the
summary states which definition applies (``definition``) and warns (``warning``) when either
population has one model. The t-test needs two models a side and is otherwise not run.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

from prunescope.audit.metrics import NO_PREDICTION

ALPHA = 0.05
CORRECTION = "holm-bonferroni"
TIE = 1e-12  # recalls closer than this are equal


def modal_labels(predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """The most frequent label per column of ``predictions [K, N]``; ties go to the largest.
    :data:`~prunescope.audit.metrics.NO_PREDICTION` entries (non-finite logits) do not vote; a
    column without any vote gets NO_PREDICTION."""
    predictions = np.atleast_2d(np.asarray(predictions))
    n = predictions.shape[1]
    votes = np.zeros((n, num_classes), dtype=np.int64)
    for row in predictions:
        scored = row != NO_PREDICTION
        votes[np.flatnonzero(scored), row[scored]] += 1
    # argmax returns the first maximum: search the reversed columns to get the last (largest)
    modal = num_classes - 1 - np.argmax(votes[:, ::-1], axis=1)
    return np.where(votes.any(axis=1), modal, NO_PREDICTION)


def compression_identified(dense: np.ndarray, compressed: np.ndarray,
                           num_classes: int) -> np.ndarray:
    """Boolean ``[N]``: the modal labels of the two populations (``[K, N]`` each) differ."""
    return modal_labels(dense, num_classes) != modal_labels(compressed, num_classes)


def definition(k_dense: int, k_compressed: int) -> str:
    """What the CIE count of a ``k_dense`` against ``k_compressed`` comparison is, in words."""
    side = lambda k, name: (f"the prediction of the 1 {name} model" if k == 1  # noqa: E731
                            else f"the modal label of the {k} {name} models")
    return (f"examples where {side(k_compressed, 'compressed')} differs from "
            f"{side(k_dense, 'dense')} (ties to the largest label; Hooker et al. 2019)")


def seed_noise_warning(k_dense: int, k_compressed: int) -> str | None:
    """A warning when a population has one model (its CIEs include its own seed noise)."""
    single = [name for k, name in ((k_dense, "dense"), (k_compressed, "compressed")) if k == 1]
    if not single or (k_dense == 1 and k_compressed == 1):
        return None if not single else ("one model a side: the CIEs are the flips against "
                                        "that dense model, seed noise included")
    return (f"the {single[0]} population has one model, so its 'modal' label is one seed's "
            "prediction and the CIE count mixes seed noise (that seed's own departures from "
            "a mode) with what compression changed; compare the flips (vs the same-seed "
            "dense run) or add seeds")


def summary(dense: np.ndarray, compressed: np.ndarray, labels: np.ndarray,
            num_classes: int) -> dict:
    """CIE count, fraction, count per true class, and the accuracy of both populations (mean over
    their models) on the CIEs and on the rest (NaN where a set is empty), with the
    :func:`definition` of what was counted and the :func:`seed_noise_warning` (or None)."""
    dense, compressed = np.atleast_2d(dense), np.atleast_2d(compressed)
    cie = compression_identified(dense, compressed, num_classes)
    return {
        "definition": definition(len(dense), len(compressed)),
        "dense_models": len(dense), "compressed_models": len(compressed),
        "warning": seed_noise_warning(len(dense), len(compressed)),
        "count": int(cie.sum()), "fraction": float(cie.mean()),
        "per_class": np.bincount(labels[cie], minlength=num_classes).tolist(),
        "dense_accuracy_cie": _accuracy_on(dense, labels, cie),
        "dense_accuracy_rest": _accuracy_on(dense, labels, ~cie),
        "compressed_accuracy_cie": _accuracy_on(compressed, labels, cie),
        "compressed_accuracy_rest": _accuracy_on(compressed, labels, ~cie),
        "dense_modal": modal_labels(dense, num_classes)[cie].tolist(),
        "compressed_modal": modal_labels(compressed, num_classes)[cie].tolist(),
        "positions": np.flatnonzero(cie).tolist(),
    }


def welch_classes(dense_recall: np.ndarray, dense_accuracy: np.ndarray,
                  sparse_recall: np.ndarray, sparse_accuracy: np.ndarray,
                  alpha: float = ALPHA) -> list[dict] | None:
    """Per class: Welch's t statistic and p-value of (recall - mean population accuracy), dense
    ``[K_d, C]`` against compressed ``[K_s, C]``, with Holm-Bonferroni adjusted p-values over
    the classes tested (:func:`holm`); ``affected`` is ``p_holm < alpha`` (``affected_uncorrected``
    is ``p < alpha``); ``direction`` is ``"hurt"`` when the class fell further than the model
    overall, else ``"spared"``; ``test`` says what was done.

    A class whose recall is the same in every model of each population (zero variance on both
    sides) gets no test (``t``, ``p`` None): it is affected exactly when the two recalls differ
    (``test`` says which), never through an infinite statistic. A class absent from the labels
    gets no test and is not affected. None when either population has fewer than two models."""
    if len(dense_recall) < 2 or len(sparse_recall) < 2:
        return None
    dense_recall, sparse_recall = np.asarray(dense_recall), np.asarray(sparse_recall)
    dense_norm = dense_recall - np.mean(dense_accuracy)
    sparse_norm = sparse_recall - np.mean(sparse_accuracy)
    rows = [_welch_row(dense_recall[:, c], sparse_recall[:, c], dense_norm[:, c],
                       sparse_norm[:, c], alpha) for c in range(dense_norm.shape[1])]
    tested = [i for i, row in enumerate(rows) if row["p"] is not None]
    adjusted = holm(np.array([rows[i]["p"] for i in tested]))
    for i, value in zip(tested, adjusted, strict=True):
        rows[i]["p_holm"] = float(value)
        rows[i]["affected"] = bool(value < alpha)
    return rows


def welch_summary(rows: list[dict] | None, alpha: float) -> dict | None:
    """How many classes were tested and marked, the correction used, and the number of false
    "affected" classes to expect by chance at the uncorrected threshold (``alpha`` x tested)."""
    if rows is None:
        return None
    tested = sum(row["p"] is not None for row in rows)
    return {"correction": CORRECTION, "alpha": alpha, "tested": tested,
            "affected": sum(row["affected"] for row in rows),
            "affected_uncorrected": sum(row["affected_uncorrected"] for row in rows),
            "expected_false_uncorrected": alpha * tested}


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (Holm 1979): the i-th smallest of m is multiplied by
    ``m - i`` (i from 0), made non-decreasing in that order, and capped at 1. Rejecting where
    the adjusted value is below alpha controls the family-wise error rate at alpha."""
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (len(p) - np.arange(len(p)))
    out = np.empty_like(p)
    out[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return out


def _welch_row(dense_raw: np.ndarray, sparse_raw: np.ndarray, dense_norm: np.ndarray,
               sparse_norm: np.ndarray, alpha: float) -> dict:
    direction = "hurt" if dense_norm.mean() > sparse_norm.mean() else "spared"
    row = {"t": None, "p": None, "p_holm": None, "affected": False,
           "affected_uncorrected": False, "direction": direction, "test": "welch"}
    if not (np.isfinite(dense_raw).all() and np.isfinite(sparse_raw).all()):
        return {**row, "test": "none: class absent from the labels"}
    if np.ptp(dense_raw) == 0 and np.ptp(sparse_raw) == 0:
        differ = bool(abs(dense_raw[0] - sparse_raw[0]) > TIE)
        return {**row, "affected": differ, "affected_uncorrected": differ,
                "test": f"none: zero variance, {'means differ' if differ else 'equal means'}"}
    with warnings.catch_warnings():  # nearly equal recalls: scipy warns of lost precision
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(dense_norm, sparse_norm, equal_var=False)
    t, p = float(result.statistic), float(result.pvalue)
    return {**row, "t": t, "p": p, "affected_uncorrected": bool(p < alpha)}


def _accuracy_on(predictions: np.ndarray, labels: np.ndarray, where: np.ndarray) -> float:
    if not where.any():
        return float("nan")
    return float((predictions[:, where] == labels[where]).mean())
