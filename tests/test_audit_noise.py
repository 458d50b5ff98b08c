"""The noise floor (issue 12, item 1): churn, accuracy spread and weight distance per population,
the dense-vs-dense CIE floor, thread-count populations, and their place in the typed result and
the report."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from test_audit_fixtures import synthetic_audit, synthetic_predictions

from prunescope import checkpoint, experiment
from prunescope import recipe as recipes
from prunescope.audit import build, noise
from prunescope.audit.schema import VERSION, AuditResult, NoiseFloor
from prunescope.errors import ConfigError
from prunescope.report import render

# 4 models x 6 examples, 3 classes; -1 is a row without a prediction (non-finite logits)
PREDICTIONS = np.array([[0, 1, 2, 2, 1, 0],
                        [0, 1, 1, 2, 0, 0],
                        [2, 1, 1, 2, 0, -1],
                        [0, 0, 1, 2, 1, 0]])
LABELS = np.array([0, 1, 1, 2, 1, 0])


def test_churn_is_the_fraction_of_examples_two_models_label_differently():
    expected = []
    for i, j in itertools.combinations(range(4), 2):
        differ = sum(PREDICTIONS[i, n] != PREDICTIONS[j, n] for n in range(6))
        expected.append(differ / 6)
    assert noise.pairwise_churn(PREDICTIONS) == pytest.approx(expected)
    # by hand: models 0 and 1 differ on examples 2 and 4; 1 and 2 on examples 0 and 5
    assert noise.churn(PREDICTIONS[0], PREDICTIONS[1]) == pytest.approx(2 / 6)
    assert noise.churn(PREDICTIONS[1], PREDICTIONS[2]) == pytest.approx(2 / 6)
    # get_churn of the MLSys'22 code is the agreement: churn is one minus it
    agreement = np.mean(PREDICTIONS[0] == PREDICTIONS[3])
    assert noise.churn(PREDICTIONS[0], PREDICTIONS[3]) == pytest.approx(1 - agreement)


def test_population_noise_by_hand():
    out = noise.population_noise("p", "seeds", PREDICTIONS, LABELS, 3, ["a", "b", "c", "d"])
    accuracy = [5 / 6, 5 / 6, 3 / 6, 5 / 6]  # model 2: examples 0, 4 and 5 wrong
    assert out["accuracy_std"] == pytest.approx(np.std(accuracy))
    # class 1 (examples 1, 2, 4): each model gets two of three right
    assert out["per_class_accuracy_std"][1] == pytest.approx(0.0)
    # class 0 (examples 0, 5): 1, 1, 0, 1 (the row without a prediction counts as wrong)
    assert out["per_class_accuracy_std"][0] == pytest.approx(np.std([1, 1, 0, 1]))
    # models 0 and 2 (and 2 and 3) differ on 4 of 6 examples, every other pair on 2
    assert out["pairs"] == 6 and out["churn"]["max"] == pytest.approx(4 / 6)
    assert out["churn"]["mean"] == pytest.approx((4 * 2 + 2 * 4) / 6 / 6)
    assert out["weight_distance"] is None and "weights not given" in out["note"]


def test_pairwise_l2_by_hand():
    vectors = [np.array([0.0, 0.0]), np.array([3.0, 4.0]), np.array([0.0, 1.0])]
    assert noise.pairwise_l2(vectors) == pytest.approx([5.0, 1.0, math.sqrt(9 + 9)])
    stats = noise.spread(noise.pairwise_l2(vectors))
    assert stats["mean"] == pytest.approx((5 + 1 + math.sqrt(18)) / 3)


def test_weight_vector_reads_the_parameters_of_a_checkpoint(tmp_path):
    from prunescope import models

    weights = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = models.build("lenet300", num_classes=10, in_channels=1, image_size=8)
        (tmp_path / f"r{seed}").mkdir()
        checkpoint.save(tmp_path / f"r{seed}" / "model.safetensors", model,
                        meta={"model": checkpoint.model_spec(model, 10)})
        weights[seed] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    state = torch.random.get_rng_state()
    a, b = noise.weight_vector(tmp_path / "r0"), noise.weight_vector(tmp_path / "r1")
    assert torch.equal(torch.random.get_rng_state(), state)  # rebuilding left the RNG alone
    assert np.array_equal(a, weights[0].numpy())
    expected = float(torch.linalg.vector_norm((weights[0] - weights[1]).double()))
    assert noise.pairwise_l2([a, b])[0] == pytest.approx(expected, rel=1e-6)


def test_balanced_splits_enumerate_each_unordered_pair_once():
    splits, exhaustive = noise.balanced_splits(4, 2)
    assert exhaustive and splits == [((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2))]
    splits, exhaustive = noise.balanced_splits(5, 2)
    assert exhaustive and len(splits) == 15 and len(set(splits)) == 15
    sampled, exhaustive = noise.balanced_splits(12, 6, limit=20, seed=3)
    assert not exhaustive and len(set(sampled)) == 20
    assert all(not set(a) & set(b) and len(a) == len(b) == 6 for a, b in sampled)


def test_cie_floor_by_hand():
    # 4 dense models, 2 a side; modal labels (ties to the largest label):
    # {0,1}: [0,1,2,2,1,0]  {2,3}: [2,1,1,2,1,0]   -> differ on 0, 2          (2 CIEs)
    # {0,2}: [2,1,2,2,1,0]  {1,3}: [0,1,1,2,1,0]   -> differ on 0, 2          (2)
    # {0,3}: [0,1,2,2,1,0]  {1,2}: [2,1,1,2,0,0]   -> differ on 0, 2, 4       (3)
    floor = noise.cie_floor(PREDICTIONS, LABELS, 3, 2)
    assert floor["splits"] == 3 and floor["exhaustive"]
    assert floor["mean"] == pytest.approx(7 / 3) and (floor["min"], floor["max"]) == (2, 3)
    # true classes of the CIEs: split 1 -> {0, 1}, split 2 -> {0, 1}, split 3 -> {0, 1, 1}
    assert floor["per_class"] == pytest.approx([1.0, 4 / 3, 0.0])


def test_cie_floor_of_single_models_is_the_pairwise_disagreement():
    floor = noise.cie_floor(PREDICTIONS, LABELS, 3, 1)
    pairs = noise.pairwise_churn(PREDICTIONS) * PREDICTIONS.shape[1]
    assert floor["splits"] == 6 and floor["mean"] == pytest.approx(pairs.mean())
    assert (floor["min"], floor["max"]) == (round(pairs.min()), round(pairs.max()))


def test_floor_size_and_comparison():
    assert noise.floor_size(5, 3) == 2 and noise.floor_size(6, 3) == 3
    assert noise.floor_size(1, 1) == 0
    floor = {"size": 2, "mean": 2.5, "min": 2, "max": 3}
    row = noise.compare("p", 3, 4, floor, 5)
    assert row["excess"] == pytest.approx(1.5) and row["above_range"]
    assert "allow sets of 2, not 3" in row["note"]
    assert noise.compare("p", 2, 3, floor, 5)["above_range"] is False
    assert noise.compare("p", 2, 3, None, 1)["floor_size"] is None


def test_one_model_populations_have_no_pairs_and_do_not_crash():
    single = noise.population_noise("one", "seeds", PREDICTIONS[:1], LABELS, 3, ["a"],
                                    weights=lambda run: np.zeros(3))
    assert single["pairs"] == 0 and single["churn"] is None
    assert single["weight_distance"] is None and single["accuracy_std"] is None
    assert "no pairs" in single["note"]
    dense = [synthetic_predictions(seed=1, accuracy=0.9, run="dense-1")]
    sparse = synthetic_predictions(seed=2, accuracy=0.8, run="sparse-1")
    sparse.meta.update(method={"label": "m", "sparsity": 0.9})
    result = build(dense, [sparse], n_boot=0)
    floor = result.noise_floor
    assert [b.churn for b in floor.populations] == [None, None]
    assert floor.cie_floors == [] and floor.cie_comparison[0].floor_size is None
    assert "no CIE floor" in floor.cie_comparison[0].note
    assert "no CIE floor" in render(result)


def test_the_audit_carries_the_noise_floor_with_weights_and_threads():
    dense = [synthetic_predictions(seed=s, accuracy=0.95, run=f"dense-{s}") for s in range(4)]
    sparse = []
    for s in range(2):
        member = synthetic_predictions(seed=10 + s, accuracy=0.85, run=f"sparse-{s}")
        member.meta.update(method={"label": "m", "sparsity": 0.9}, seed=s)
        sparse.append(member)
    threads = [synthetic_predictions(seed=0, accuracy=0.95, run=f"threads-{n}")
               for n in (1, 2)]
    vectors = {f"dense-{s}": np.full(2, float(s)) for s in range(4)}
    vectors.update({"sparse-0": np.zeros(2), "sparse-1": np.ones(2),
                    "threads-1": np.zeros(2), "threads-2": np.zeros(2)})
    result = build(dense, sparse, n_boot=0, threads=threads, weights=vectors.__getitem__)
    floor = result.noise_floor
    assert [b.label for b in floor.populations] == ["dense", "m s=0.9", "dense, threads"]
    dense_noise, _, tooling = floor.populations
    churn = noise.pairwise_churn(np.stack([d.predicted for d in dense]))
    assert dense_noise.churn.mean == pytest.approx(churn.mean())
    # |i - j| * sqrt(2) over the 6 pairs of 4 models: 1,2,3,1,2,1
    assert dense_noise.weight_distance.mean == pytest.approx(10 / 6 * math.sqrt(2))
    assert tooling.kind == "threads" and tooling.churn.max == 0.0  # same seed, same outputs
    assert tooling.weight_distance.max == 0.0
    (cie_floor,) = floor.cie_floors
    stack = np.stack([d.predicted for d in dense])
    expected = noise.cie_floor(stack, dense[0].labels, 2, 2)
    assert cie_floor.size == 2 and cie_floor.mean == pytest.approx(expected["mean"])
    row = floor.cie_comparison[0]
    assert row.count == result.populations[0].cie.count and row.floor_size == 2
    assert "dense, threads" in render(result)


def test_noise_floor_round_trips_and_the_version_is_3():
    result = synthetic_audit(n_boot=0)
    assert int(VERSION.rpartition("/")[2]) >= 3 and isinstance(result.noise_floor, NoiseFloor)
    data = json.loads(result.to_json())
    assert set(data["noise_floor"]) == {"populations", "cie_floors", "cie_comparison"}
    back = AuditResult.from_json(result.to_json())
    assert back == result and back.noise_floor.cie_floors[0].size == 1
    html = render(back)
    assert "<h2>Noise floor</h2>" in html and "CIE noise floor (dense vs dense" in html


@pytest.mark.parametrize("threads", [[2], [2, 2], [0, 1]])
def test_thread_counts_need_two_distinct_positive_counts(threads):
    with pytest.raises(ConfigError, match="audit.threads") as exc:
        recipes.from_dict({"audit": {"threads": threads}})
    assert "\n" not in str(exc.value)


def test_thread_population_trains_each_member_under_its_thread_count(tmp_path, monkeypatch):
    recipe = recipes.from_dict({
        "data": {"name": "digits", "val_size": 100}, "model": {"name": "lenet300"},
        "train": {"epochs": 1, "batch_size": 128, "lr": 0.1},
        "audit": {"seeds": 1, "threads": [1, 2]}})
    main = experiment.run_for(recipe, tmp_path)
    seen = []
    original = experiment.Run.fit

    def fit(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(experiment.Run, "fit", fit)
    before = torch.get_num_threads()
    dirs = experiment.train_thread_population(recipe, main)
    assert seen == [1, 2] and torch.get_num_threads() == before
    assert dirs == [tmp_path / "populations" / f"threads{n}" / "dense" for n in (1, 2)]
    keys = [json.loads((d / "stage.json").read_text()) for d in dirs]
    assert [k["threads"] for k in keys] == [1, 2]
    first, second = (checkpoint.load(d / "model.safetensors").model for d in dirs)
    init = [checkpoint.load(d / "init.safetensors").model for d in dirs]
    assert all(torch.equal(init[0][k], init[1][k]) for k in init[0])  # same seed, same start
    assert first.keys() == second.keys()
    experiment.train_thread_population(recipe, main)  # finished stages are read back
    assert seen == [1, 2]
