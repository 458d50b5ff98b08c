"""Per-model audit metrics against hand computations on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prunescope.audit import metrics


def test_softmax_rows_sum_to_one_and_survive_large_logits():
    probs = metrics.softmax(np.array([[1000.0, 1000.0], [0.0, math.log(3.0)]]))
    np.testing.assert_allclose(probs, [[0.5, 0.5], [0.25, 0.75]])


def test_top_k_accuracy_by_hand():
    logits = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [2.0, 2.0, 0.0]])
    labels = np.array([1, 0, 1])
    # ranks of the label's logit: 1, 2, 0 (the tie in row 3 counts for the label)
    assert metrics.top_k_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert metrics.top_k_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert metrics.top_k_accuracy(logits, labels, 5) == 1.0  # capped at the class count


def test_confusion_recall_precision_worst_class():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 0, 1])
    matrix = metrics.confusion(labels, predicted, 3)
    np.testing.assert_array_equal(matrix, [[2, 1, 0], [1, 1, 0], [0, 1, 0]])
    np.testing.assert_allclose(metrics.per_class_recall(matrix), [2 / 3, 1 / 2, 0.0])
    precision = metrics.per_class_precision(matrix)
    np.testing.assert_allclose(precision[:2], [2 / 3, 1 / 3])
    assert math.isnan(precision[2])  # class 2 is never predicted
    assert metrics.worst_class(np.array([0.9, 0.5, np.nan, 0.5])) == (1, 0.5)


def test_normalised_change_is_the_difference_of_recall_minus_accuracy():
    dense_recall = np.array([[0.9, 1.0], [0.7, 1.0]])  # two dense models
    dense_accuracy = np.array([0.9, 0.8])
    sparse_recall = np.array([[0.5, 0.9]])
    sparse_accuracy = np.array([0.7])
    # dense: (0.8 - 0.85, 1.0 - 0.85); sparse: (0.5 - 0.7, 0.9 - 0.7)
    expected = [(0.5 - 0.7) - (0.8 - 0.85), (0.9 - 0.7) - (1.0 - 0.85)]
    np.testing.assert_allclose(metrics.normalised_change(dense_recall, dense_accuracy,
                                                         sparse_recall, sparse_accuracy),
                               expected)


def test_ece_uses_the_authors_floor_bins():
    # bins floor(10p)/10: {0.05, 0.08} -> 0.0; {0.35} -> 0.3; {0.95, 1.0}: 0.9 and 1.0 apart
    p = np.array([0.05, 0.08, 0.35, 0.95, 1.0])
    y = np.array([0, 1, 1, 1, 1])
    rows = metrics.calibration_bins(p, y)
    assert [r["lower"] for r in rows] == [0.0, 0.3, 0.9, 1.0]
    assert [r["count"] for r in rows] == [2, 1, 1, 1]
    expected = (2 / 5 * abs(0.065 - 0.5) + 1 / 5 * abs(0.35 - 1) + 1 / 5 * abs(0.95 - 1)
                + 1 / 5 * abs(1.0 - 1))
    assert metrics.expected_calibration_error(p, y) == pytest.approx(expected)


def test_ece_is_zero_when_confidence_matches_frequency():
    p = np.array([0.25] * 4 + [0.75] * 4)
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert metrics.expected_calibration_error(p, y) == pytest.approx(0.0)


def test_reliability_curve_matches_sklearn_bins_with_counts():
    p = np.array([0.05, 0.15, 0.12, 0.95, 0.97])
    y = np.array([0, 1, 0, 1, 1])
    curve = metrics.reliability_curve(p, y)
    np.testing.assert_allclose(curve["confidence"], [0.05, 0.135, 0.96])
    np.testing.assert_allclose(curve["accuracy"], [0.0, 0.5, 1.0])
    assert curve["count"] == [1, 2, 2]


def test_entropy_and_uncertain_fraction():
    probs = np.array([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    expected = [math.log(2), 0.0, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    np.testing.assert_allclose(metrics.entropy(probs), expected)
    # 0.1 < p < 0.9, strict at both ends
    assert metrics.uncertain_fraction(np.array([0.1, 0.11, 0.5, 0.89, 0.9, 0.95])) == 0.5


def test_flips():
    np.testing.assert_array_equal(metrics.flips(np.array([0, 1, 2]), np.array([0, 2, 2])),
                                  [False, True, False])


def test_model_metrics_block_for_a_binary_task():
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [0.0, 0.1], [3.0, 0.0]])
    labels = np.array([0, 1, 0, 1])
    block = metrics.model_metrics(logits, labels, 2)
    assert block["accuracy"] == 0.5
    assert block["recall"] == [0.5, 0.5]
    p1 = metrics.softmax(logits)[:, 1]
    assert block["values"]["uncertain_fraction"] == pytest.approx(np.mean(np.abs(p1 - 0.5) < 0.4))
    ece = metrics.expected_calibration_error(p1, labels)
    assert block["values"]["binary_ece"] == pytest.approx(ece)
    loss = -np.log(metrics.softmax(logits)[np.arange(4), labels]).mean()
    assert block["values"]["loss"] == pytest.approx(loss)


def test_clean_makes_json_data():
    cleaned = metrics.clean({"a": np.float32(0.5), "b": [float("nan"), np.int64(3)],
                             "c": np.array([1.0, np.inf])})
    assert cleaned == {"a": 0.5, "b": [None, 3], "c": [1.0, None]}


def test_non_finite_logits_are_never_a_prediction():
    logits = np.array([[np.nan, np.nan, np.nan], [3.0, 0.0, 0.0], [np.inf, 0.0, 0.0],
                       [0.0, 2.0, 0.0]])
    labels = np.array([0, 0, 0, 1])
    block = metrics.model_metrics(logits, labels, 3)
    # only rows 1 and 3 are scored; rows 0 and 2 (labels 0, the "predicted" argmax) are wrong
    assert block["non_finite"] == 2
    assert block["accuracy"] == 0.5 and block["values"]["top5"] == 0.5
    assert block["recall"][0] == pytest.approx(1 / 3)
    p = metrics.softmax(logits[[1, 3]])
    assert block["values"]["mean_entropy"] == pytest.approx(metrics.entropy(p).mean())
    assert block["values"]["mean_max_prob"] == pytest.approx(p.max(axis=1).mean())
    np.testing.assert_array_equal(metrics.predicted(logits), [-1, 0, -1, 1])


def test_all_non_finite_logits_score_nothing():
    block = metrics.model_metrics(np.full((4, 3), np.nan), np.array([0, 1, 2, 0]), 3)
    assert block["non_finite"] == 4 and block["accuracy"] == 0.0 and block["values"]["top5"] == 0.0
    assert math.isnan(block["values"]["mean_entropy"]) and block["reliability"] is None


def test_collapsed_is_chance_plus_a_margin_or_nan():
    assert metrics.collapsed(0.1, 10) and metrics.collapsed(0.1 + metrics.CHANCE_MARGIN, 10)
    assert not metrics.collapsed(0.2, 10)
    assert metrics.collapsed(float("nan"), 10) and metrics.collapsed(0.51, 2)
