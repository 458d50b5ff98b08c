"""Compression-identified exemplars and Welch-tested classes on hand-made predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prunescope.audit import exemplars


def test_modal_label_ties_go_to_the_largest_label():
    predictions = np.array([[0, 1, 2, 3],
                            [1, 1, 0, 3],
                            [1, 2, 0, 0],
                            [0, 2, 2, 0]])
    # column 0: 0,1,1,0 -> tie 0/1 -> 1; column 1: 1,1,2,2 -> 2; column 2: 2,0,0,2 -> 2;
    # column 3: 3,3,0,0 -> 3
    np.testing.assert_array_equal(exemplars.modal_labels(predictions, 4), [1, 2, 2, 3])


def test_modal_label_is_the_majority_when_there_is_one():
    predictions = np.array([[4, 0], [4, 1], [0, 1]])
    np.testing.assert_array_equal(exemplars.modal_labels(predictions, 5), [4, 1])


def test_cie_with_one_model_per_population_are_the_flips():
    dense = np.array([[0, 1, 2, 2]])
    compressed = np.array([[0, 2, 2, 1]])
    np.testing.assert_array_equal(exemplars.compression_identified(dense, compressed, 3),
                                  dense[0] != compressed[0])


def test_summary_counts_and_accuracy_on_cie_vs_rest():
    labels = np.array([0, 1, 1, 2, 2])
    dense = np.array([[0, 1, 1, 2, 0],
                      [0, 1, 0, 2, 0]])       # modal: 0, 1, 1 (tie 0/1), 2, 0
    compressed = np.array([[0, 2, 1, 2, 2],
                           [0, 2, 0, 2, 2]])  # modal: 0, 2, 1, 2, 2
    out = exemplars.summary(dense, compressed, labels, 3)
    assert out["positions"] == [1, 4]
    assert out["count"] == 2 and out["fraction"] == pytest.approx(0.4)
    assert out["per_class"] == [0, 1, 1]
    assert out["dense_modal"] == [1, 0] and out["compressed_modal"] == [2, 2]
    # dense on CIEs: positions 1 and 4: (1==1, 0!=2) x2 models -> 2 of 4
    assert out["dense_accuracy_cie"] == pytest.approx(0.5)
    # dense on the rest (0, 2, 3): model 1 all right, model 2 wrong at 2 -> 5 of 6
    assert out["dense_accuracy_rest"] == pytest.approx(5 / 6)
    assert out["compressed_accuracy_cie"] == pytest.approx(0.5)


def test_summary_of_identical_populations_has_no_cie():
    labels = np.array([0, 1])
    out = exemplars.summary(np.array([[0, 1]]), np.array([[0, 1]]), labels, 2)
    assert out["count"] == 0 and math.isnan(out["dense_accuracy_cie"])


def _welch_t(a: np.ndarray, b: np.ndarray) -> float:
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    return (a.mean() - b.mean()) / math.sqrt(va + vb)


def test_welch_statistic_by_hand():
    dense_recall = np.array([[0.90, 0.99], [0.92, 0.97], [0.94, 0.98]])
    dense_accuracy = np.array([0.95, 0.96, 0.94])
    sparse_recall = np.array([[0.70, 0.99], [0.60, 0.98]])
    sparse_accuracy = np.array([0.85, 0.83])
    rows = exemplars.welch_classes(dense_recall, dense_accuracy, sparse_recall, sparse_accuracy)
    for c in range(2):
        a = dense_recall[:, c] - dense_accuracy.mean()
        b = sparse_recall[:, c] - sparse_accuracy.mean()
        assert rows[c]["t"] == pytest.approx(_welch_t(a, b))
    # class 0 fell far further than the model: t > 0 (dense minus compressed)
    assert rows[0]["t"] > 0


def test_welch_marks_a_class_at_alpha_and_needs_two_models_a_side():
    dense = np.array([[0.95, 0.95], [0.96, 0.94], [0.95, 0.96], [0.94, 0.95]])
    sparse = np.array([[0.60, 0.95], [0.62, 0.96], [0.61, 0.94], [0.59, 0.95]])
    accuracy = np.array([0.95] * 4)
    rows = exemplars.welch_classes(dense, accuracy, sparse, accuracy)
    assert rows[0]["affected"] and rows[0]["p"] < 0.05
    assert not rows[1]["affected"] and rows[1]["p"] > 0.5
    assert exemplars.welch_classes(dense[:1], accuracy[:1], sparse, accuracy) is None


def test_welch_with_identical_recalls_is_not_affected():
    same = np.ones((3, 1))
    rows = exemplars.welch_classes(same, np.ones(3), same, np.ones(3))
    assert rows[0]["affected"] is False and rows[0]["p"] is None
    assert rows[0]["test"] == "none: zero variance, equal means"


def test_a_class_with_the_same_recall_everywhere_is_not_affected():
    # recall 1.0 in every model; the populations' accuracies differ, so the normalised values
    # differ by a constant with zero variance: before, an infinite t marked it affected
    recall = np.ones((3, 1))
    rows = exemplars.welch_classes(recall, np.array([0.98, 0.97, 0.99]), recall,
                                   np.array([0.90, 0.91, 0.89]))
    assert rows[0]["affected"] is False and rows[0]["t"] is None


def test_zero_variance_with_different_means_is_affected_without_a_test():
    dense = np.array([[1.0], [1.0]])
    sparse = np.array([[0.5], [0.5]])
    rows = exemplars.welch_classes(dense, np.ones(2), sparse, np.ones(2))
    assert rows[0]["direction"] == "hurt" and rows[0]["affected"] is True
    assert rows[0]["t"] is None and rows[0]["test"] == "none: zero variance, means differ"


def test_holm_adjusted_p_values_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> monotone
    # 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(exemplars.holm(p), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(exemplars.holm(np.array([0.5, 0.9])), [1.0, 1.0])


def test_affected_classes_are_holm_corrected():
    rng = np.random.default_rng(0)
    dense = 0.9 + 0.01 * rng.standard_normal((5, 10))
    sparse = 0.9 + 0.01 * rng.standard_normal((5, 10))
    sparse[:, 0] -= 0.1  # only class 0 really moves
    accuracy = np.full(5, 0.9)
    rows = exemplars.welch_classes(dense, accuracy, sparse, accuracy, alpha=0.05)
    raw = np.array([r["p"] for r in rows])
    np.testing.assert_allclose([r["p_holm"] for r in rows], exemplars.holm(raw))
    assert [r["affected"] for r in rows] == list(exemplars.holm(raw) < 0.05)
    assert rows[0]["affected"] and [r["affected_uncorrected"] for r in rows] == list(raw < 0.05)


def test_models_without_a_prediction_do_not_vote():
    predictions = np.array([[-1, -1, 2], [-1, 1, 2], [-1, 1, -1]])
    np.testing.assert_array_equal(exemplars.modal_labels(predictions, 3), [-1, 1, 2])
