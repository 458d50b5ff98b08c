"""Data pruning (issue 12): DRoP's quotas against hand-computed vectors, EL2N and forgetting
against direct loops, the pruned training length, selection, and bad input."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from prunescope.data import Splits, Subset
from prunescope.data_pruning import (
    DataPruningSpec,
    capped_shares,
    class_weights,
    drop_quotas,
    el2n,
    forgetting_counts,
    forgetting_scores,
    prune_data,
    pruned_epochs,
    query_recall,
    select,
    train_on,
)
from prunescope.errors import ConfigError
from prunescope.hooks import Hook
from prunescope.methods import METHODS
from prunescope.run import Run
from prunescope.train import TrainConfig

# -- DRoP quotas: hand-computed ------------------------------------------------------------------


def test_balanced_classes_get_quotas_proportional_to_error_in_both_variants():
    # errors .1 .2 .5 .2 sum to 1: 100 kept -> 10 20 50 20; N_k equal, so the variants agree
    for variant in ("drop_code", "drop_paper"):
        quotas = drop_quotas(torch.tensor([0.9, 0.8, 0.5, 0.8]), torch.tensor([100] * 4), 100,
                             variant)
        assert quotas.tolist() == [10, 20, 50, 20]


def test_overflow_is_redistributed_in_proportion_to_the_rest():
    # code weights .1 .2 .5 .6 (sum 1.4), keep 70: shares 5 10 25 30; classes 2 and 3 (sizes 10
    # and 5) saturate, 55 left over classes 0 and 1 by .1:.2 -> 18.33, 36.67 -> 18, 37
    quotas = drop_quotas(torch.tensor([0.9, 0.8, 0.5, 0.4]), torch.tensor([100, 100, 10, 5]), 70)
    assert quotas.tolist() == [18, 37, 10, 5]


def test_redistribution_loops_until_no_class_overflows():
    # as above but class 1 has 20: its 36.67 overflows in the second round, so class 0 gets 35
    quotas = drop_quotas(torch.tensor([0.9, 0.8, 0.5, 0.4]), torch.tensor([100, 20, 10, 5]), 70)
    assert quotas.tolist() == [35, 20, 10, 5]


def test_paper_and_code_variants_differ_on_imbalanced_classes():
    recall, sizes = torch.tensor([0.9, 0.8, 0.5, 0.4]), torch.tensor([100, 20, 10, 5])
    # paper: weights N_k (1 - r_k) = 10 4 5 3 (sum 22), keep 44: 20 8 10 6; class 3 saturates
    # (5), 39 over 10:4:5 -> class 2 at 10.26 saturates (10), 29 over 10:4 -> 20.71, 8.29
    assert class_weights(recall, sizes, "drop_paper").tolist() == pytest.approx([10, 4, 5, 3])
    assert drop_quotas(recall, sizes, 44, "drop_paper").tolist() == [21, 8, 10, 5]
    # code: weights .1 .2 .5 .6: 3.14 6.29 15.71 18.86; classes 2, 3 saturate; 29 over .1:.2
    assert drop_quotas(recall, sizes, 44, "drop_code").tolist() == [10, 19, 10, 5]


def test_classes_with_recall_one_fill_what_the_others_cannot_take():
    quotas = drop_quotas(torch.tensor([1.0, 0.5]), torch.tensor([10, 4]), 8)
    assert quotas.tolist() == [4, 4]


def _authors_loop(weights, sizes, keep):
    """The redistribution loop of the authors' quoters/drop.py in real arithmetic (no floors)."""
    shares = [keep * w / sum(weights) for w in weights]
    error, active = 0.0, []
    for k, size in enumerate(sizes):
        if shares[k] > size:
            error += shares[k] - size
            shares[k] = size
        else:
            active.append(k)
    while error > 1e-9:
        total = sum(weights[k] for k in active)
        added = {k: error * weights[k] / total for k in active}
        for k in list(active):
            shares[k] += added[k]
            error -= added[k]
            if shares[k] > sizes[k]:
                error += shares[k] - sizes[k]
                shares[k] = sizes[k]
                active.remove(k)
    return shares


def test_capped_shares_equal_the_authors_redistribution_loop():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        sizes = torch.randint(1, 60, (6,), generator=generator)
        weights = torch.rand(6, generator=generator, dtype=torch.float64) + 0.01
        keep = int(torch.randint(1, int(sizes.sum()) + 1, (1,), generator=generator))
        expected = _authors_loop(weights.tolist(), sizes.tolist(), keep)
        assert capped_shares(weights, sizes, keep).tolist() == pytest.approx(expected, abs=1e-6)
        quotas = drop_quotas(1 - weights / 2, sizes, keep)
        assert int(quotas.sum()) == keep and bool((quotas <= sizes).all())


# -- the protocol's training length --------------------------------------------------------------


@pytest.mark.parametrize(("epochs", "density", "expected"),
                         [(10, 0.5, 15), (10, 0.3, 21), (10, 1.0, 10), (10, 0.1, 55),
                          (8, 0.3, 17), (1, 0.9, 1)])
def test_pruned_epochs(epochs, density, expected):
    # floor((0.5 + 0.5 d) E / d): 0.75*10/0.5, 0.65*10/0.3 = 21.67, 0.55*10/0.1, 0.65*8/0.3 = 17.3
    assert pruned_epochs(epochs, density) == expected


# -- scores against direct loops -----------------------------------------------------------------


def _subset(n: int, classes: int, seed: int) -> Subset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 2, 2, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    y[:classes] = torch.arange(classes)  # every class present
    return Subset(x, y, torch.arange(n))


def _model(seed: int, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, classes))


def test_el2n_equals_a_direct_loop_over_models_and_examples():
    subset, models = _subset(20, 3, 0), [_model(1), _model(2)]
    expected = []
    with torch.no_grad():
        for i in range(len(subset)):
            total = 0.0
            for model in models:
                logits = model(subset.x[i:i + 1])[0].double()
                probs = [math.exp(v) for v in logits.tolist()]
                probs = [p / sum(probs) for p in probs]
                total += math.sqrt(sum((p - (c == int(subset.y[i]))) ** 2
                                       for c, p in enumerate(probs)))
            expected.append(total / len(models))
    assert el2n(models, subset, batch_size=7).tolist() == pytest.approx(expected, rel=1e-6)


def test_forgetting_counts_equal_a_direct_loop():
    history = torch.rand(6, 40, generator=torch.Generator().manual_seed(3)) > 0.5
    history[:, 0] = False  # never learned
    history[:, 1] = True  # never forgotten
    expected = []
    for n in range(40):
        column = history[:, n].tolist()
        if not any(column):
            expected.append(6.0)
            continue
        expected.append(float(sum(a and not b for a, b in zip(column, column[1:], strict=False))))
    assert forgetting_counts(history).tolist() == expected
    assert expected[:2] == [6.0, 0.0]


def _splits(per_class=(30, 20, 6), classes=3, seed=0) -> Splits:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, 1, 2, 2, generator=generator) * 2

    def part(counts):
        y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        x = centres[y] + torch.randn(len(y), 1, 2, 2, generator=generator)
        return Subset(x, y, torch.arange(len(y)))

    return Splits("toy", part(per_class), part((4,) * classes), part((10,) * classes),
                  classes, (1, 2, 2), tuple(f"c{c}" for c in range(classes)), (0.0,), (1.0,))


def _run(tmp_path, splits=None, epochs=3) -> Run:
    splits = splits or _splits()
    classes = splits.num_classes

    def factory():
        return nn.Sequential(nn.Flatten(), nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, classes))

    return Run(splits, factory, tmp_path / "run", progress=False,
               train=TrainConfig(epochs=epochs, batch_size=8, lr=0.05))


class _Snapshots(Hook):
    def __init__(self, steps_per_epoch):
        self.steps_per_epoch, self.states = steps_per_epoch, []

    def after_optimizer_step(self, model, step, optimizer):
        if (step + 1) % self.steps_per_epoch == 0:
            self.states.append(copy.deepcopy(model.state_dict()))


def test_forgetting_scores_equal_a_direct_loop_over_epoch_snapshots(tmp_path):
    run = _run(tmp_path, epochs=4)
    scores = forgetting_scores(run, epochs=4)
    # the same training, snapshotted each epoch, then every example checked one at a time
    model, hook = run.fresh_model(), _Snapshots(run.steps_per_epoch)
    run.fit(model, tmp_path / "reference", dataclasses.replace(run.train, epochs=4), hook=hook,
            desc="reference", distill=False)
    assert len(hook.states) == 4
    rows = []
    with torch.no_grad():
        for state in hook.states:
            model.load_state_dict(state)
            model.eval()
            rows.append([int(model(run.splits.train.x[i:i + 1]).argmax()) ==
                         int(run.splits.train.y[i]) for i in range(len(run.splits.train))])
    expected = []
    for n in range(len(run.splits.train)):
        column = [row[n] for row in rows]
        learned = any(column)
        expected.append(float(sum(a and not b for a, b in zip(column, column[1:], strict=False)))
                        if learned else 4.0)
    assert scores.tolist() == expected
    assert forgetting_scores(run, epochs=4).tolist() == expected  # read back, not retrained


# -- selection and the whole protocol ------------------------------------------------------------


def test_select_keeps_the_highest_scores_within_each_quota():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.3, 0.2, 0.8, 0.4], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    kept = select(labels, 4, scores, torch.tensor([2, 1, 1]), generator)
    assert kept.tolist() in ([1, 2, 3, 6], [1, 2, 4, 6])  # class 1's 0.3 tie: either
    assert select(labels, 3, scores, None, generator).tolist() == [1, 2, 6]
    kept = select(labels, 4, None, torch.tensor([1, 2, 1]), generator)
    assert torch.bincount(labels[kept], minlength=3).tolist() == [1, 2, 1]


def test_select_breaks_ties_at_random_not_by_position():
    # forgetting counts are mostly ties; a fixed order would keep the first positions
    labels = torch.zeros(8, dtype=torch.int64)
    scores = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    kept = [tuple(select(labels, 3, scores, quotas, torch.Generator().manual_seed(seed)).tolist())
            for seed in range(40) for quotas in (None, torch.tensor([3]))]
    assert all(k[0] == 0 and len(k) == 3 for k in kept)  # the highest score is always kept
    picked = torch.bincount(torch.tensor([p for k in kept for p in k[1:]]), minlength=8)
    assert (picked[1:] > 0).all()  # every tied position is kept by some seed
    again = select(labels, 3, scores, None, torch.Generator().manual_seed(5))
    assert again.tolist() == list(kept[10])  # and the generator fixes the choice


def test_drop_keeps_the_quotas_of_the_averaged_query_recall(tmp_path):
    run = _run(tmp_path)
    recall = query_recall(run, models=2, epochs=2)
    kept = prune_data(run, 0.5, "random", "drop_paper", query_models=2, query_epochs=2)
    counts = torch.bincount(run.splits.train.y[kept], minlength=3)
    sizes = torch.bincount(run.splits.train.y, minlength=3)
    assert counts.tolist() == drop_quotas(recall, sizes, 28, "drop_paper").tolist()
    assert kept.tolist() == sorted(set(kept.tolist())) and len(kept) == 28


def test_train_on_uses_the_pruned_length_and_reports_the_worst_class(tmp_path):
    run = _run(tmp_path, epochs=2)
    kept = prune_data(run, 0.5, "el2n", score_models=2, score_epochs=1)
    result = train_on(run, kept, tmp_path / "pruned", density=0.5)
    assert result["epochs"] == 3 and result["kept"] == 28 == sum(result["kept_per_class"])
    assert result["worst_class_recall"] == min(result["per_class_recall"])
    assert result["actual_sparsity"] == 0.0
    # evaluated on the test half: 5 of each class's 10
    assert result["accuracy"] == pytest.approx(
        sum(r * 5 for r in result["per_class_recall"]) / 15)


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("changes", [{"density": 0}, {"density": 1.5}, {"density": float("nan")},
                                     {"density": True}, {"strategy": "loss"},
                                     {"quota": "drop"}, {"query_models": 0}])
def test_bad_specs_are_one_line_config_errors(changes):
    with pytest.raises(ConfigError) as info:
        DataPruningSpec(**{"density": 0.5, **changes})
    assert "\n" not in str(info.value)


def test_a_class_without_examples_is_refused_before_anything_is_written(tmp_path):
    splits = _splits()
    empty = splits.train.select(torch.nonzero(splits.train.y != 2).reshape(-1))
    run = _run(tmp_path, dataclasses.replace(splits, train=empty))
    with pytest.raises(ConfigError, match="class 2 has no training examples"):
        prune_data(run, 0.5, quota="drop_code")
    with pytest.raises(ConfigError, match="class 2 has no training examples"):
        METHODS.get("data_pruning")(density=0.5, quota="drop_code").check(run, (0.0,))
    assert not run.out.exists()
    with pytest.raises(ConfigError, match="class 1 has no training examples"):
        drop_quotas(torch.tensor([0.5, 0.5]), torch.tensor([3, 0]), 2)


def test_the_method_refuses_weight_sparsity(tmp_path):
    with pytest.raises(ConfigError, match=r"sparsities: \[0.0\]"):
        METHODS.get("data_pruning")(density=0.5).check(_run(tmp_path), (0.5,))


# -- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--density", "0"], ["--density", "1.2"],
                                  ["--density", "0.5", "--strategy", "loss"],
                                  ["--density", "0.5", "--quota", "drop"]])
def test_prune_data_bad_input_is_one_line_and_writes_nothing(args, tmp_path, capsys):
    from pipeline_helpers import assert_user_error, cli

    out = tmp_path / "out"
    code, _, err = cli(capsys, "prune-data", "--dataset", "digits", *args, "--out", out)
    assert_user_error(code, err)
    assert not out.exists()


def test_prune_data_command_writes_the_kept_examples_and_the_result(tmp_path, capsys):
    import json

    from pipeline_helpers import cli

    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "prune-data", "--dataset", "digits", "--density", "0.5",
                            "--quota", "drop_code", "--query-models", "1", "--query-epochs",
                            "1", "--epochs", "1", "--out", out)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    kept = json.loads((out / "kept.json").read_text())
    assert json.loads(stdout) == result
    assert result["epochs"] == 1 and result["kept"] == len(kept["positions"])
    assert result["worst_class_recall"] == min(result["per_class_recall"])
