"""Disaggregation (Fairlearn MetricFrame) against a loop over groups; rate gaps; bias
amplification with its skip rules; interdependence."""

from __future__ import annotations

import numpy as np
import pytest

from prunescope.audit import disaggregation as dis
from prunescope.audit.errors import AuditError


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    groups = rng.integers(0, 3, 200)
    predictions = np.stack([np.where(rng.random(200) < 0.8, labels, 1 - labels)
                            for _ in range(3)])
    return labels, groups, predictions


def test_disaggregation_equals_a_loop_over_groups(arrays):
    labels, groups, predictions = arrays
    out = dis.population_disaggregation(labels, predictions, groups, names=["a", "b", "c"])
    by_hand = {name: float((predictions[:, groups == g] == labels[groups == g]).mean())
               for g, name in enumerate("abc")}
    accuracy = out["accuracy"]
    assert accuracy["by_group"] == pytest.approx(by_hand)
    assert accuracy["overall"] == pytest.approx((predictions == labels).mean())
    assert accuracy["min"] == pytest.approx(min(by_hand.values()))
    assert accuracy["max"] == pytest.approx(max(by_hand.values()))
    assert accuracy["difference"] == pytest.approx(max(by_hand.values()) - min(by_hand.values()))
    assert accuracy["ratio"] == pytest.approx(min(by_hand.values()) / max(by_hand.values()))


def test_binary_rates_by_group_equal_a_loop(arrays):
    labels, groups, predictions = arrays
    out = dis.population_disaggregation(labels, predictions, groups, binary=True)
    for g in range(3):
        inside = groups == g
        fpr = (predictions[:, inside & (labels == 0)] == 1).mean()
        fnr = (predictions[:, inside & (labels == 1)] == 0).mean()
        assert out["false_positive_rate"]["by_group"][str(g)] == pytest.approx(fpr)
        assert out["false_negative_rate"]["by_group"][str(g)] == pytest.approx(fnr)
    rates = out["false_positive_rate"]["by_group"].values()
    assert out["false_positive_rate"]["difference"] == pytest.approx(max(rates) - min(rates))


def test_bootstrap_intervals_bracket_the_estimates(arrays):
    labels, groups, predictions = arrays
    out = dis.population_disaggregation(labels, predictions, groups, n_boot=30, seed=1)
    ci = out["accuracy"]["ci"]
    low, high = ci["overall"]
    assert low <= out["accuracy"]["overall"] <= high and high - low < 0.2
    for name, (lo, hi) in ci["by_group"].items():
        assert lo <= hi and lo - 0.05 <= out["accuracy"]["by_group"][name] <= hi + 0.05
    assert set(ci) == {"overall", "by_group", "min", "max", "difference", "ratio"}


def test_a_group_array_of_the_wrong_length_is_refused(arrays):
    labels, groups, predictions = arrays
    with pytest.raises(AuditError, match="199 entries but the predictions have 200"):
        dis.population_disaggregation(labels, predictions, groups[:-1])


def _ba_data(pos_in_group1: int, pos_in_group0: int):
    """Attribute positives split between the groups, 100 examples per group."""
    protected = np.repeat([0, 1], 100)
    attribute = np.zeros(200, dtype=int)
    attribute[100:100 + pos_in_group1] = 1
    attribute[:pos_in_group0] = 1
    return attribute, protected


def test_bias_amplification_by_hand():
    attribute, protected = _ba_data(30, 10)
    predicted = attribute.copy()
    predicted[:5] = 0          # 5 positives of group 0 missed
    predicted[130:140] = 1     # 10 extra predictions in group 1
    # attribute more prevalent in group 1 during training -> g = protected == 1
    value, reason = dis.bias_amplification(attribute, predicted, protected, (0.1, 0.3))
    expected = 40 / 45 - 30 / 40
    assert reason == "" and value == pytest.approx(expected)
    # prevalence the other way round: g = protected == 0
    value, _ = dis.bias_amplification(attribute, predicted, protected, (0.3, 0.1))
    assert value == pytest.approx(5 / 45 - 10 / 40)


def test_bias_amplification_skips_groups_with_fewer_than_ten_positives():
    attribute, protected = _ba_data(30, 9)
    value, reason = dis.bias_amplification(attribute, attribute, protected, (0.1, 0.3))
    assert value is None and "fewer than 10 test positives with protected=0" in reason
    attribute, protected = _ba_data(9, 30)
    value, reason = dis.bias_amplification(attribute, attribute, protected, (0.1, 0.3))
    assert value is None and "protected=1" in reason


def test_bias_amplification_skips_close_training_prevalences():
    attribute, protected = _ba_data(30, 10)
    # |0.205 - 0.2| / 0.2 = 2.5% < 10%: undefined
    value, reason = dis.bias_amplification(attribute, attribute, protected, (0.2, 0.205))
    assert value is None and "less than 10%" in reason
    # 0.2 vs 0.221: 10.5% -> defined (and zero for perfect predictions)
    value, _ = dis.bias_amplification(attribute, attribute, protected, (0.2, 0.221))
    assert value == pytest.approx(0.0)


def test_interdependence_is_the_r2_of_a_least_squares_fit():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2, 50)
    b = rng.integers(0, 2, 50)
    c = a.copy()
    c[:5] = 1 - c[:5]
    matrix = np.stack([a, b, c], axis=1).astype(float)
    scores = dis.interdependence(matrix)
    for j in range(3):
        x = np.column_stack([np.ones(50), np.delete(matrix, j, axis=1)])
        coef, *_ = np.linalg.lstsq(x, matrix[:, j], rcond=None)
        residual = matrix[:, j] - x @ coef
        r2 = 1 - residual @ residual / ((matrix[:, j] - matrix[:, j].mean()) ** 2).sum()
        assert scores[j] == pytest.approx(r2)
    with pytest.raises(AuditError, match="at least two attributes"):
        dis.interdependence(matrix[:, :1])
