"""Metrics by group: Fairlearn's MetricFrame, rate gaps, bias amplification, interdependence.

:func:`disaggregate` runs any ``metric(y_true, y_pred)`` through Fairlearn's ``MetricFrame``
(overall, by group, min, max, difference, ratio, and bootstrap confidence intervals with
``n_boot`` resamples of the examples). A population of K models enters as one row per example
whose ``y_pred`` is the fraction of the models that got it right (or predicted class 1), so the
metric is the population's mean and the bootstrap resamples examples, not models.

:func:`bias_amplification` and :func:`interdependence` follow Iofinova, Peste & Alistarh, "Bias
in Pruned Vision Models: In-Depth Analysis and Countermeasures" (CVPR 2023), as implemented in
IST-DASLab/pruned-vision-model-bias (``bias_utils/runs.py``: ``compute_bias_amplification``,
``compute_interdependence``), skip rules included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from prunescope.audit.errors import AuditError

CI_QUANTILES = (0.025, 0.975)
MIN_POSITIVES = 10  # bias amplification: fewer test positives in a group -> undefined
MIN_RELATIVE_GAP = 0.1  # ... training prevalences closer than this (relative) -> undefined
Metric = Callable[[np.ndarray, np.ndarray], float]


def mean_of_prediction(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean of ``y_pred`` (accuracy when ``y_pred`` is the fraction of models right)."""
    return float(np.mean(y_pred))


def false_positive_rate(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean predicted-positive fraction over the negatives (NaN without negatives)."""
    negatives = np.asarray(y_true) == 0
    return float(np.mean(np.asarray(y_pred)[negatives])) if negatives.any() else float("nan")


def false_negative_rate(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean predicted-negative fraction over the positives (NaN without positives)."""
    positives = np.asarray(y_true) == 1
    return float(np.mean(1 - np.asarray(y_pred)[positives])) if positives.any() else float("nan")


def check_groups(groups: np.ndarray, n: int, what: str = "group array") -> np.ndarray:
    """``groups`` as a 1-D array of length ``n``, or a one-line AuditError."""
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) != n:
        raise AuditError(f"the {what} has {len(groups) if groups.ndim else 0} entries but the "
                         f"predictions have {n} examples; give one group per example, in order")
    return groups


def disaggregate(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray,
                 metrics: dict[str, Metric], *, names: Sequence[str] | None = None,
                 n_boot: int = 0, seed: int = 0) -> dict:
    """``{"overall", "by_group", "min", "max", "difference", "ratio"}`` per metric, plus
    ``"ci"`` (2.5% and 97.5% bootstrap quantiles of each of them) when ``n_boot > 0``.

    ``by_group`` is keyed by ``names[g]`` (the group value itself without names). ``difference``
    is max - min over groups and ``ratio`` min / max (Fairlearn's ``between_groups``).
    """
    from fairlearn.metrics import MetricFrame

    y_true = np.asarray(y_true)
    groups = check_groups(groups, len(y_true))
    frame = MetricFrame(metrics=metrics, y_true=y_true, y_pred=np.asarray(y_pred),
                        sensitive_features=groups, n_boot=n_boot or None,
                        ci_quantiles=list(CI_QUANTILES) if n_boot else None,
                        random_state=seed if n_boot else None)
    label = (lambda g: str(names[int(g)])) if names else (lambda g: str(g))
    out = {name: _summary(frame, name, label) for name in metrics}
    if n_boot:
        for name in metrics:
            out[name]["ci"] = _intervals(frame, name, label)
    return out


def population_disaggregation(labels: np.ndarray, predictions: np.ndarray,
                              groups: np.ndarray, *, names: Sequence[str] | None = None,
                              binary: bool = False, n_boot: int = 0, seed: int = 0) -> dict:
    """Accuracy (and, for a binary task, FPR and FNR) of a population ``predictions [K, N]`` by
    group, through :func:`disaggregate`."""
    predictions = np.atleast_2d(predictions)
    correct = (predictions == labels).mean(axis=0)
    out = disaggregate(labels, correct, groups, {"accuracy": mean_of_prediction}, names=names,
                       n_boot=n_boot, seed=seed)
    if binary:
        positive = (predictions == 1).mean(axis=0)
        out.update(disaggregate(labels, positive, groups,
                                {"false_positive_rate": false_positive_rate,
                                 "false_negative_rate": false_negative_rate},
                                names=names, n_boot=n_boot, seed=seed))
    return out


def bias_amplification(attribute: np.ndarray, predicted: np.ndarray, protected: np.ndarray,
                       train_prevalence: tuple[float, float]) -> tuple[float | None, str]:
    """Bias amplification of a binary attribute w.r.t. a binary protected attribute.

    ``attribute``, ``predicted`` and ``protected`` are 0/1 arrays over the test examples;
    ``train_prevalence`` = (fraction of the attribute among training examples with protected = 0,
    the same with protected = 1). With ``g`` the group where the attribute is more prevalent in
    training, ``BA = #{pred = 1, g} / #{pred = 1} - #{attribute = 1, g} / #{attribute = 1}``.
    Returns ``(None, reason)`` when undefined: fewer than 10 test positives in either group, or
    training prevalences within 10% of each other, relative to the smaller one.
    """
    attribute, predicted = np.asarray(attribute), np.asarray(predicted)
    protected = np.asarray(protected)
    for value in (1, 0):
        if attribute[protected == value].sum() < MIN_POSITIVES:
            return None, f"fewer than {MIN_POSITIVES} test positives with protected={value}"
    neg_frac, pos_frac = train_prevalence
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.abs(pos_frac - neg_frac) / np.minimum(pos_frac, neg_frac)
    if gap < MIN_RELATIVE_GAP:
        return None, f"training prevalences differ by less than {MIN_RELATIVE_GAP:.0%} relative"
    group = protected == (1 if pos_frac > neg_frac else 0)
    if predicted.sum() == 0:
        return None, "nothing predicted positive"
    value = predicted[group].sum() / predicted.sum() - attribute[group].sum() / attribute.sum()
    return float(value), ""


def interdependence(predicted: np.ndarray) -> list[float]:
    """For each column of a 0/1 prediction matrix ``[N, A]`` (A >= 2 attributes): R^2 of a
    linear regression (scikit-learn ``LinearRegression``) predicting it from the other columns."""
    from sklearn.linear_model import LinearRegression

    predicted = np.asarray(predicted, dtype=np.float64)
    if predicted.ndim != 2 or predicted.shape[1] < 2:
        raise AuditError("interdependence needs predictions for at least two attributes "
                         "(an [N, A] matrix with A >= 2)")
    scores = []
    for a in range(predicted.shape[1]):
        others = np.delete(predicted, a, axis=1)
        regression = LinearRegression().fit(others, predicted[:, a])
        scores.append(float(regression.score(others, predicted[:, a])))
    return scores


def _summary(frame, name: str, label) -> dict:
    by_group = frame.by_group[name]
    return {"overall": float(frame.overall[name]),
            "by_group": {label(g): float(v) for g, v in by_group.items()},
            "min": float(frame.group_min()[name]), "max": float(frame.group_max()[name]),
            "difference": float(frame.difference()[name]), "ratio": float(frame.ratio()[name])}


def _intervals(frame, name: str, label) -> dict:
    low, high = (0, 1)
    by_group = frame.by_group_ci
    return {
        "overall": [float(frame.overall_ci[i][name]) for i in (low, high)],
        "by_group": {label(g): [float(by_group[i][name][g]) for i in (low, high)]
                     for g in by_group[0][name].index},
        "min": [float(frame.group_min_ci()[i][name]) for i in (low, high)],
        "max": [float(frame.group_max_ci()[i][name]) for i in (low, high)],
        "difference": [float(frame.difference_ci()[i][name]) for i in (low, high)],
        "ratio": [float(frame.ratio_ci()[i][name]) for i in (low, high)],
    }
