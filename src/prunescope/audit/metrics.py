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


def model_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """The per-model block of the audit: top-1/top-5, loss, per-class recall and precision,
    worst class, calibration (ECE and reliability curve), uncertainty, and ``non_finite`` (rows
    of non-finite logits: wrong in top-1/top-5, left out of the probability measures, which are
    NaN, or None for the curve, when no row is finite)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    finite = finite_rows(logits)
    predictions = predicted(logits)
    matrix = confusion(labels, predictions, num_classes)
    recall = per_class_recall(matrix, np.bincount(labels, minlength=num_classes))
    precision = per_class_precision(matrix)
    worst, worst_recall = worst_class(recall)
    return {
        "accuracy": float(np.mean(predictions == labels)),
        "top5": top_k_accuracy(logits, labels, 5), "non_finite": int((~finite).sum()),
        "recall": recall.tolist(), "precision": precision.tolist(),
        "worst_class": worst, "worst_class_recall": worst_recall,
        **_probability_metrics(logits[finite], labels[finite], num_classes),
    }


def _probability_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Loss, calibration and uncertainty over finite rows (NaN / None when there are none)."""
    nan = float("nan")
    if not len(labels):
        out = {"loss": nan, "ece": nan, "reliability": None, "mean_entropy": nan,
               "mean_max_prob": nan}
        return {**out, "binary_ece": nan, "uncertain_fraction": nan} if num_classes == 2 else out
    probs = softmax(logits)
    max_prob = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    loss = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-300, None))
    out = {"loss": float(loss.mean()), "ece": expected_calibration_error(max_prob, correct),
           "reliability": reliability_curve(max_prob, correct),
           "mean_entropy": float(entropy(probs).mean()), "mean_max_prob": float(max_prob.mean())}
    if num_classes == 2:
        out["binary_ece"] = expected_calibration_error(probs[:, 1], labels)
        out["uncertain_fraction"] = uncertain_fraction(probs[:, 1])
    return out


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
