"""Per-model metrics on cached predictions (numpy only): accuracy, classes, calibration, flips.

Every function takes plain arrays (``logits [N, C]``, ``labels [N]``, predictions ``[N]``) so
that it can be checked against a hand computation. A row of logits with a NaN or an infinity is
never scored as a prediction: its predicted class is :data:`NO_PREDICTION` (-1), it counts as
wrong in top-1 and top-5, and the probability measures (loss, entropy, max-probability,
calibration) are averages over the finite rows only; :func:`model_metrics` reports how many
rows were non-finite. A model at or below chance (:func:`collapsed`) is flagged by the audit.
Multi-class uncertainty is entropy and max-probability; for a binary task (two classes) ``p``
is the probability of class 1 and the measures are those of Iofinova, Peste & Alistarh, "Bias
in Pruned Vision Models: In-Depth Analysis and Countermeasures" (CVPR 2023), as implemented in
their code (IST-DASLab/pruned-vision-model-bias, ``bias_utils/runs.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

ECE_BINS = 10
NO_PREDICTION = -1  # the predicted class of a row of non-finite logits
CHANCE_MARGIN = 0.02  # collapsed: accuracy <= 1 / num_classes + this (or NaN)


def finite_rows(logits: np.ndarray) -> np.ndarray:
    """Boolean ``[N]``: the rows of ``logits`` without NaN or infinity."""
    return np.isfinite(np.asarray(logits)).all(axis=-1)


def predicted(logits: np.ndarray) -> np.ndarray:
    """The predicted class of each row (first maximum), :data:`NO_PREDICTION` where the row is
    not finite."""
    logits = np.asarray(logits)
    finite = finite_rows(logits)
    out = np.where(finite[..., None], logits, 0).argmax(axis=-1)
    return np.where(finite, out, NO_PREDICTION)


def collapsed(accuracy: float, num_classes: int, margin: float = CHANCE_MARGIN) -> bool:
    """True when ``accuracy`` is NaN or at most chance (``1 / num_classes``) plus ``margin``."""
    return math.isnan(accuracy) or accuracy <= 1.0 / num_classes + margin


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (shifted by the row maximum, so large logits do not overflow)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of examples whose label is among the ``k`` largest logits.

    An example counts when fewer than ``k`` logits are strictly larger than its label's logit
    (so ties count in the label's favour); ``k`` is capped at the number of classes.
    """
    logits = np.asarray(logits)
    own = logits[np.arange(len(labels)), labels]
    above = (logits > own[:, None]).sum(axis=1)
    return float(np.mean((above < min(k, logits.shape[1])) & finite_rows(logits)))


def confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C]`` counts, row = true class, column = predicted class; examples without a
    prediction (:data:`NO_PREDICTION`) are left out."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    scored = predictions != NO_PREDICTION
    flat = labels[scored] * num_classes + predictions[scored]
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_recall(matrix: np.ndarray, support: np.ndarray | None = None) -> np.ndarray:
    """Recall of each class (diagonal / ``support``, default the row sums, i.e. the examples
    with a prediction); NaN for a class absent from the labels."""
    support = matrix.sum(axis=1) if support is None else np.asarray(support)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(matrix) / support


def per_class_precision(matrix: np.ndarray) -> np.ndarray:
    """Precision of each class (diagonal / column sum); NaN for a class never predicted."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(matrix) / matrix.sum(axis=0)


def worst_class(recall: np.ndarray) -> tuple[int, float]:
    """``(class, recall)`` of the lowest recall (the lowest class index among ties; NaN skipped)."""
    index = int(np.nanargmin(recall))
    return index, float(recall[index])


def normalised_change(dense_recall: np.ndarray, dense_accuracy: np.ndarray,
                      sparse_recall: np.ndarray, sparse_accuracy: np.ndarray) -> np.ndarray:
    """Per-class recall change normalised by the overall accuracy change (Hooker et al.).

    Hooker, Courville, Clark, Dauphin & Frome, "What Do Compressed Deep Neural Networks
    Forget?" (2019): each model's class recall is first normalised by subtracting its
    population's mean top-1 accuracy (google-research ``pruning_identified_exemplars/
    per_class_accuracy/gen_tstatistic.py``); the change is the difference of the population
    means, ``(mean recall_c - mean acc)_compressed - (mean recall_c - mean acc)_dense``.
    Negative: the class lost more than the model did overall. Recalls are ``[K, C]`` (one row
    per model), accuracies ``[K]``.
    """
    dense = np.nanmean(dense_recall, axis=0) - np.mean(dense_accuracy)
    sparse = np.nanmean(sparse_recall, axis=0) - np.mean(sparse_accuracy)
    return sparse - dense


def calibration_bins(confidence: np.ndarray, outcome: np.ndarray,
                     bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Examples grouped by ``floor(bins * confidence) / bins`` (a confidence of exactly 1 gets a
    bin of its own, as in the authors' code); per non-empty bin: ``lower``, ``count``,
    ``confidence`` (mean) and ``accuracy`` (mean outcome)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    outcome = np.asarray(outcome, dtype=np.float64)
    keys = np.floor(confidence * bins).astype(np.int64)
    rows = []
    for key in np.unique(keys):
        inside = keys == key
        rows.append({"lower": float(key) / bins, "count": int(inside.sum()),
                     "confidence": float(confidence[inside].mean()),
                     "accuracy": float(outcome[inside].mean())})
    return rows


def expected_calibration_error(confidence: np.ndarray, outcome: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """ECE ``sum_b n_b / N * |mean_b(confidence) - mean_b(outcome)|`` over
    :func:`calibration_bins` (Iofinova et al. 2023, ``compute_uncertainty_calibration``).

    Binary task: ``confidence`` = p(class 1), ``outcome`` = label. Multi-class analogue:
    ``confidence`` = max-probability, ``outcome`` = prediction correct.
    """
    rows = calibration_bins(confidence, outcome, bins)
    total = sum(r["count"] for r in rows)
    return float(sum(r["count"] / total * abs(r["confidence"] - r["accuracy"]) for r in rows))


def reliability_curve(confidence: np.ndarray, outcome: np.ndarray,
                      bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Points of a reliability diagram from scikit-learn's ``calibration_curve`` (uniform bins):
    ``confidence`` (mean predicted), ``accuracy`` (observed frequency), ``count`` per bin."""
    from sklearn.calibration import calibration_curve

    outcome = np.asarray(outcome).astype(np.int64)
    confidence = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    if outcome.min() == outcome.max():  # calibration_curve needs both outcomes present
        return {"confidence": [float(confidence.mean())], "accuracy": [float(outcome[0])],
                "count": [len(outcome)]}
    accuracy, mean_confidence = calibration_curve(outcome, confidence, n_bins=bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=bins)
    return {"confidence": mean_confidence.tolist(), "accuracy": accuracy.tolist(),
            "count": [int(c) for c in counts if c > 0]}


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row."""
    p = np.asarray(probabilities, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=-1)


def uncertain_fraction(p_positive: np.ndarray) -> float:
    """Fraction of examples with ``0.1 < p < 0.9`` (Iofinova et al. 2023: ``|p - 0.5| < 0.4``)."""
    return float(np.mean(np.abs(np.asarray(p_positive, dtype=np.float64) - 0.5) < 0.4))


def flips(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Boolean ``[N]``: examples whose predicted class changed between two models."""
    return np.asarray(before) != np.asarray(after)


@dataclass(frozen=True)
class Outputs:
    """One model's logits ``[N, C]`` and the labels, with the views the metrics need: the rows
    with finite logits (``finite``), their softmax (``probs``) and labels (``scored_labels``)."""

    logits: np.ndarray
    labels: np.ndarray
    num_classes: int

    @cached_property
    def finite(self) -> np.ndarray:
        return finite_rows(self.logits)

    @cached_property
    def probs(self) -> np.ndarray:
        return softmax(self.logits[self.finite])

    @cached_property
    def scored_labels(self) -> np.ndarray:
        return self.labels[self.finite]


@dataclass(frozen=True)
class ModelMetric:
    """One per-model scalar metric: ``function(outputs) -> float`` (NaN when undefined), the
    ``aggregate`` of a population's values, the report's column ``label``, whether it is a
    fraction (shown as a percentage) and whether it applies to binary tasks only."""

    name: str
    function: Callable[[Outputs], float]
    label: str
    aggregate: Callable[[list[float]], float] = field(default=lambda v: finite_mean(v))
    percent: bool = False
    binary_only: bool = False


def finite_mean(values: list[float | None]) -> float:
    """Mean over the finite values (NaN when there is none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _over_finite(function: Callable[[Outputs], float]) -> Callable[[Outputs], float]:
    """``function`` on the finite rows, NaN when there are none."""
    return lambda o: float(function(o)) if len(o.scored_labels) else float("nan")


def _loss(o: Outputs) -> float:
    p = o.probs[np.arange(len(o.scored_labels)), o.scored_labels]
    return -np.log(np.clip(p, 1e-300, None)).mean()


def _ece(o: Outputs) -> float:
    return expected_calibration_error(o.probs.max(axis=1), o.probs.argmax(axis=1)
                                      == o.scored_labels)


MODEL_METRICS: list[ModelMetric] = [
    ModelMetric("top5", lambda o: top_k_accuracy(o.logits, o.labels, 5), "top-5", percent=True),
    ModelMetric("loss", _over_finite(_loss), "loss"),
    ModelMetric("ece", _over_finite(_ece), "ECE"),
    ModelMetric("mean_entropy", _over_finite(lambda o: entropy(o.probs).mean()),
                "mean entropy"),
    ModelMetric("mean_max_prob", _over_finite(lambda o: o.probs.max(axis=1).mean()),
                "mean max-prob.", percent=True),
    ModelMetric("binary_ece", _over_finite(
        lambda o: expected_calibration_error(o.probs[:, 1], o.scored_labels)),
        "ECE (p of class 1)", binary_only=True),
    ModelMetric("uncertain_fraction", _over_finite(lambda o: uncertain_fraction(o.probs[:, 1])),
                "uncertain (0.1<p<0.9)", percent=True, binary_only=True),
]
"""Every per-model scalar metric of the audit, in column order: adding one entry here puts it
in every model's and population's ``values`` and in the report's population table."""


def table(num_classes: int) -> list[ModelMetric]:
    """The entries of :data:`MODEL_METRICS` that apply to a task of ``num_classes`` classes."""
    return [m for m in MODEL_METRICS if num_classes == 2 or not m.binary_only]


def model_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """The per-model block of the audit: top-1 accuracy, ``non_finite`` (rows of non-finite
    logits: wrong, and left out of the probability measures), per-class recall and precision,
    worst class, the reliability curve (None without a finite row), and ``values``: every
    applicable metric of :data:`MODEL_METRICS`."""
    outputs = Outputs(np.asarray(logits), np.asarray(labels), num_classes)
    predictions = predicted(outputs.logits)
    matrix = confusion(outputs.labels, predictions, num_classes)
    recall = per_class_recall(matrix, np.bincount(outputs.labels, minlength=num_classes))
    worst, worst_recall = worst_class(recall)
    probs = outputs.probs
    return {
        "accuracy": float(np.mean(predictions == outputs.labels)),
        "non_finite": int((~outputs.finite).sum()),
        "recall": recall.tolist(), "precision": per_class_precision(matrix).tolist(),
        "worst_class": worst, "worst_class_recall": worst_recall,
        "reliability": reliability_curve(probs.max(axis=1), probs.argmax(axis=1)
                                         == outputs.scored_labels) if len(probs) else None,
        "values": {m.name: m.function(outputs) for m in table(num_classes)},
    }


def clean(value):
    """``value`` with NaN/inf floats as None and numpy scalars/arrays as Python data (for JSON)."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
