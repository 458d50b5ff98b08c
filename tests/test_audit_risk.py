"""Risk signals of the dense models, AUROC and precision at k, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prunescope.audit import risk
from prunescope.audit.metrics import softmax


def test_signals_by_hand_for_one_model():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    labels = np.array([0, 0])
    out = risk.signals(logits, labels)
    p = softmax(logits)
    np.testing.assert_allclose(out["margin"], -(p[:, :].max(1) - np.sort(p, 1)[:, -2]))
    np.testing.assert_allclose(out["loss"], -np.log(p[[0, 1], [0, 0]]))
    el2n = [np.linalg.norm(p[0] - [1, 0, 0]), np.linalg.norm(p[1] - [1, 0, 0])]
    np.testing.assert_allclose(out["el2n"], el2n)
    np.testing.assert_array_equal(out["dense_incorrect"], [0.0, 1.0])
    # max probability 0.787 (< 0.9: uncertain) and 0.987
    np.testing.assert_array_equal(out["dense_uncertain"], [1.0, 0.0])
    np.testing.assert_array_equal(out["dense_disagreement"], [0.0, 0.0])


def test_signals_average_over_the_dense_population():
    logits = np.array([[[3.0, 0.0]], [[0.0, 3.0]], [[3.0, 0.0]]])  # 3 models, 1 example
    out = risk.signals(logits, np.array([0]))
    assert out["dense_incorrect"][0] == pytest.approx(1 / 3)
    assert out["dense_disagreement"][0] == pytest.approx(1 / 3)  # modal label 0


def _auroc_by_pairs(scores, target):
    pos, neg = scores[target], scores[~target]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_equals_pair_counting_and_curve_is_monotone():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)
    target = rng.random(60) < 0.3
    out = risk.evaluate(scores, target)
    assert out["auroc"] == pytest.approx(_auroc_by_pairs(scores, target))
    assert out["positives"] == target.sum() and out["base_rate"] == pytest.approx(target.mean())
    assert np.all(np.diff(out["roc"]["fpr"]) >= 0) and out["roc"]["tpr"][-1] == 1.0


def test_precision_at_k_without_and_with_ties():
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    target = np.array([True, False, True, False])
    assert risk.precision_at_k(scores, target) == pytest.approx(0.5)  # k = 2 positives
    assert risk.precision_at_k(scores, target, k=3) == pytest.approx(2 / 3)
    # a 0/1 signal: 3 tied at the top for 2 places, 2 of them positive -> expected 2/3
    tied = np.array([1.0, 1.0, 1.0, 0.0])
    target = np.array([True, True, False, False])
    assert risk.precision_at_k(tied, target) == pytest.approx(2 / 3)


def test_constant_target_has_no_auroc():
    out = risk.evaluate(np.array([0.1, 0.2]), np.array([False, False]))
    assert out["auroc"] is None and out["roc"] is None and math.isnan(out["precision_at_k"])


def test_non_finite_dense_logits_leave_the_signal_undefined_and_out_of_the_scores():
    logits = np.array([[[3.0, 0.0], [np.nan, np.nan], [0.0, 1.0], [1.0, 0.0]]])
    out = risk.signals(logits, np.array([0, 0, 1, 1]))
    assert math.isnan(out["margin"][1]) and math.isnan(out["dense_incorrect"][1])
    scored = risk.evaluate(out["loss"], np.array([False, True, False, True]))
    assert scored["auroc"] == 1.0 and scored["unscored"] == 1  # examples 0, 2, 3: 1 positive
