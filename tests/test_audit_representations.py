"""Q-score and prediction depth (prunescope.audit.representations) and their audit fields."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from test_audit_fixtures import synthetic_predictions
from torch import nn

from prunescope.audit import build, representations
from prunescope.audit.predictions import Predictions, load_cached, save
from prunescope.audit.schema import VERSION, AuditResult, RepresentationMetrics


def test_q_score_by_hand():
    # |z| = [3, 0, 0, 1]: mean 1, std sqrt(1.5); top 1: (3 - 1) / sqrt(1.5); top 2: (2 - 1) / ..
    z = np.array([[3.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    assert np.allclose(representations.q_score(z), [2 / math.sqrt(1.5), 0.0])
    assert np.allclose(representations.q_score(z, top=2), [1 / math.sqrt(1.5), 0.0])


def test_prediction_depth_by_hand():
    probes = np.array([[0, 1, 1, 2],
                       [1, 1, 0, 2],
                       [1, 1, 1, 0]])
    final = np.array([1, 1, 0, 2])
    # ex 0 agrees from probe 1 on; ex 1 everywhere; ex 2 only at probe 1, so the last
    # probe disagrees: L = 3; ex 3 agrees at 0 and 1, not at 2: 3
    assert representations.prediction_depth(probes, final).tolist() == [1, 0, 3, 3]


def test_knn_probe_matches_a_direct_loop():
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(60, 5)), rng.normal(size=(25, 5))
    labels = rng.integers(0, 4, 60)
    got = representations.knn_predict(torch.tensor(bank), torch.tensor(labels),
                                      torch.tensor(queries), k=7, num_classes=4)
    for q, label in zip(queries, got.tolist(), strict=True):
        nearest = sorted(range(60), key=lambda i: float(np.sum((bank[i] - q) ** 2)))[:7]
        votes = [sum(labels[i] == c for i in nearest) for c in range(4)]
        assert label == votes.index(max(votes))


def test_knn_equal_votes_go_to_the_smaller_class():
    bank = torch.tensor([[0.0], [1.0]])
    got = representations.knn_predict(bank, torch.tensor([3, 1]), torch.tensor([[0.4]]), 2, 4)
    assert got.tolist() == [1]


def _tiny_model() -> nn.Sequential:
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(2))
        model[1].bias.zero_()
        model[3].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model[3].bias.zero_()
    return model


def test_layer_inputs_are_the_linear_inputs():
    x = torch.tensor([[[[1.0, -2.0]]]])
    layers, output = representations.layer_inputs(_tiny_model(), x)
    assert [t.tolist() for t in layers] == [[[1.0, -2.0]], [[1.0, 0.0]]]
    assert output.tolist() == [[1.0, 0.0]]


def test_compute_by_hand():
    # Identity network, the input's larger coordinate is the class. The bank (k = 1) holds
    # two training points; the test point (2, 1.5) is predicted class 0 by the network.
    # Probe 0 (input): nearest of (0, 3) [class 1] and (3, 0) [class 0] is (3, 0): agrees.
    # Probe 1 (after ReLU, same values): agrees. Depth 0. The test point (-1, 0.5): final
    # class 1; probe 0 nearest (0, 3)? |(-1,.5)-(0,3)|^2 = 7.25, to (3,0): 16.25 -> class 1;
    # probe 1 sees (0, 0.5): to (0,3) 6.25, to (3,0) 9.25 -> class 1. Depth 0 as well.
    # The test point (1.4, 1.0): final class 0; probe 0: to (0,3) 5.96, to (3,0) 3.56 -> 0.
    x = torch.tensor([[2.0, 1.5], [-1.0, 0.5], [1.4, 1.0]]).reshape(3, 1, 1, 2)
    train_x = torch.tensor([[0.0, 3.0], [3.0, 0.0]]).reshape(2, 1, 1, 2)
    out = representations.compute(_tiny_model(), x, train_x, torch.tensor([1, 0]), 2,
                                  representations.Settings(k=1, bank=5))
    assert out["layers"] == 2 and out["prediction_depth"].tolist() == [0, 0, 0]
    # penultimate = ReLU output: (2, 1.5) -> (2 - 1.75) / 0.25 = 1; (0, .5) -> 1; (1.4, 1) -> 1
    assert np.allclose(out["q_score"], [1.0, 1.0, 1.0])


def test_compute_depth_when_the_probes_disagree():
    # a bank whose labels contradict the network at every layer: depth L = 2
    x = torch.tensor([[2.0, 0.0]]).reshape(1, 1, 1, 2)
    train_x = torch.tensor([[2.0, 0.0]]).reshape(1, 1, 1, 2)
    out = representations.compute(_tiny_model(), x, train_x, torch.tensor([1]), 2,
                                  representations.Settings(k=30))
    assert out["prediction_depth"].tolist() == [2]


def _with_metrics(member: Predictions, q: np.ndarray, depth: np.ndarray) -> Predictions:
    meta = {**member.meta, "representations": {"k": 30, "bank": 1000, "seed": 0, "top": 1,
                                               "layers": 3}}
    return dataclasses.replace(member, meta=meta, q_score=q.astype(np.float32),
                               prediction_depth=depth.astype(np.int64))


def test_audit_fields_on_synthetic_predictions():
    n = 400
    dense = [_with_metrics(synthetic_predictions(seed=s, accuracy=0.95, run=f"dense-{s}"),
                           np.full(n, 1.0), np.full(n, 1)) for s in range(3)]
    plain = [synthetic_predictions(seed=10 + s, accuracy=0.85, run=f"sparse-{s}")
             for s in range(3)]
    for s, member in enumerate(plain):
        member.meta.update(method={"label": "magnitude+global", "sparsity": 0.9}, seed=s)
    probe = build(dense, plain, n_boot=0)
    cie = np.zeros(n, dtype=bool)
    cie[probe.populations[0].cie.positions] = True
    assert probe.populations[0].representations is None  # members lack the metrics
    assert 0 < cie.sum() < n
    compressed = [_with_metrics(m, np.where(cie, 2.0, 0.0), np.where(cie, 3, 2))
                  for m in plain]
    result = build(dense, compressed, n_boot=0)
    reps = result.populations[0].representations
    assert isinstance(reps, RepresentationMetrics) and reps.models == 3 and reps.layers == 3
    q, depth = reps.q_score_cie, reps.prediction_depth_cie
    assert q.cie.count == 3 * cie.sum() and q.rest.count == 3 * (n - cie.sum())
    assert (q.cie.mean, q.rest.mean, q.dense_cie.mean, q.dense_rest.mean) == (2, 0, 1, 1)
    assert (depth.cie.median, depth.rest.q3, depth.dense_cie.q1) == (3, 2, 1)
    dense_reps = result.dense.representations
    assert dense_reps.q_score.count == 3 * n and dense_reps.q_score_cie is None
    assert abs(reps.q_score.mean - 2 * cie.mean()) < 1e-12
    back = AuditResult.from_json(result.to_json())
    assert back == result and VERSION == "prunescope.audit/4"
    assert "representations" not in probe.to_dict()["populations"][0]


def test_report_shows_the_panel():
    from prunescope.report import render

    n = 400
    dense = [_with_metrics(synthetic_predictions(seed=s, accuracy=0.95, run=f"dense-{s}"),
                           np.full(n, 1.0), np.full(n, 1)) for s in range(2)]
    member = synthetic_predictions(seed=10, accuracy=0.85, run="sparse-0")
    member.meta.update(method={"label": "magnitude+global", "sparsity": 0.9}, seed=0)
    page = render(build(dense, [_with_metrics(member, np.full(n, 0.5), np.full(n, 2))],
                        n_boot=0))
    assert "Q-score and prediction depth" in page and "0.50 [0.50, 0.50]" in page


def test_cache_round_trip(tmp_path):
    member = _with_metrics(synthetic_predictions(seed=0, accuracy=0.9), np.arange(400.0),
                           np.arange(400) % 4)
    member.meta.update(checkpoint_sha256="ab" * 32)
    run = tmp_path / "run"
    run.mkdir()
    path = save(member, tmp_path / "cache")
    assert path.is_file()
    from safetensors.numpy import load_file

    arrays = load_file(str(path))
    assert np.array_equal(arrays["q_score"], member.q_score)
    assert np.array_equal(arrays["prediction_depth"], member.prediction_depth)
    assert load_cached(run, "test", tmp_path / "cache") is None  # no checkpoint in run
