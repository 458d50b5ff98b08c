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
  (``per_class_accuracy/gen_tstatistic.py``).

With one model per population the modal prediction is that model's prediction, so the CIEs are
exactly its flips, and the t-test (which needs two models a side) is reported as not run.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

from prunescope.audit.metrics import NO_PREDICTION

ALPHA = 0.05


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


def summary(dense: np.ndarray, compressed: np.ndarray, labels: np.ndarray,
            num_classes: int) -> dict:
    """CIE count, fraction, count per true class, and the accuracy of both populations (mean over
    their models) on the CIEs and on the rest; NaN where a set is empty."""
    dense, compressed = np.atleast_2d(dense), np.atleast_2d(compressed)
    cie = compression_identified(dense, compressed, num_classes)
    return {
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
    ``[K_d, C]`` against compressed ``[K_s, C]``, and whether ``p < alpha`` marks the class as
    disproportionately affected; ``direction`` is ``"hurt"`` when the class fell further than
    the model overall (``t > 0``, infinite when both sides have zero variance), else ``"spared"``.
    None when either population has fewer than two models."""
    if len(dense_recall) < 2 or len(sparse_recall) < 2:
        return None
    dense_norm = np.asarray(dense_recall) - np.mean(dense_accuracy)
    sparse_norm = np.asarray(sparse_recall) - np.mean(sparse_accuracy)
    rows = []
    for c in range(dense_norm.shape[1]):
        with warnings.catch_warnings():  # identical recalls: scipy warns, returns NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            result = stats.ttest_ind(dense_norm[:, c], sparse_norm[:, c], equal_var=False)
        t, p = float(result.statistic), float(result.pvalue)
        hurt = dense_norm[:, c].mean() > sparse_norm[:, c].mean()
        rows.append({"t": t, "p": p, "affected": bool(np.isfinite(p) and p < alpha),
                     "direction": "hurt" if hurt else "spared"})
    return rows


def _accuracy_on(predictions: np.ndarray, labels: np.ndarray, where: np.ndarray) -> float:
    if not where.any():
        return float("nan")
    return float((predictions[:, where] == labels[where]).mean())
