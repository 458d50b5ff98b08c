"""The supervised contrastive loss (Khosla et al. 2020): against a direct loop over anchors and
positives and a hand-computed case, its hook into training, and a recipe that trains with it and
is audited."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from pipeline_helpers import digits, lenet
from torch import nn

from prunescope import losses, recipe
from prunescope.errors import ConfigError
from prunescope.train import TrainConfig, fit


def _direct(features: torch.Tensor, labels: list[int], temperature: float) -> float:
    """Eq. 2 of the paper, one anchor and one positive at a time, in Python floats; anchors
    without a positive have no term."""
    z = [[v / math.sqrt(sum(c * c for c in row)) for v in row] for row in features.tolist()]
    n, terms = len(z), []
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        sim = [sum(a * b for a, b in zip(z[i], z[j], strict=True)) / temperature
               for j in range(n)]
        denominator = sum(math.exp(sim[a]) for a in range(n) if a != i)
        terms.append(-sum(math.log(math.exp(sim[p]) / denominator) for p in positives)
                     / len(positives))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
def test_supcon_equals_a_direct_loop_over_anchors_and_positives(temperature):
    features = torch.tensor([[1.0, 2.0, -1.0], [0.5, 1.0, 0.0], [-1.0, 0.3, 2.0],
                             [-2.0, 0.1, 1.0], [0.0, -1.0, 0.5], [3.0, 0.2, 0.1]],
                            dtype=torch.float64)
    labels = [0, 0, 1, 1, 2, 0]  # class 2 (row 4) has no positive: no term of its own
    value = losses.supcon(features, torch.tensor(labels), temperature)
    assert value.item() == pytest.approx(_direct(features, labels, temperature), rel=1e-12)


def test_supcon_hand_computed_with_temperature_and_a_lone_anchor():
    # z0 = z1 = (1, 0), z2 = (0, 1); anchors 0 and 1 each have one positive at similarity 1
    # and one negative at 0, anchor 2 none: L = -log(e^(1/t) / (e^(1/t) + 1)) = log(1 + e^(-1/t))
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    for t in (0.1, 0.5, 1.0):
        assert losses.supcon(features, labels, t).item() == pytest.approx(
            math.log1p(math.exp(-1.0 / t)), rel=1e-12)


def test_supcon_without_any_positive_pair_is_zero_and_differentiable():
    features = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    value = losses.supcon(features, torch.tensor([0, 1, 2, 3]))
    value.backward()
    assert value.item() == 0.0 and features.grad is not None
    assert not features.grad.any()


def test_supcon_gradient_matches_finite_differences():
    features = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    assert torch.autograd.gradcheck(lambda f: losses.supcon(f, labels, 0.3), (features,))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_training_loss_adds_the_weighted_supcon_of_the_penultimate_representation():
    model, x, y = _Net(), torch.randn(8, 5), torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    config = TrainConfig(loss="supcon", temperature=0.2, supcon_weight=0.5)
    ce = lambda logits, targets, inputs: F.cross_entropy(logits, targets)  # noqa: E731
    with losses.training_loss(model, config, ce) as loss_fn:
        logits = model(x)
        value = loss_fn(logits, y, x)
    penultimate = torch.relu(model.body(x))
    expected = F.cross_entropy(logits, y) + 0.5 * losses.supcon(penultimate, y, 0.2)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not model.head._forward_pre_hooks  # removed on exit
    with losses.training_loss(model, TrainConfig(), ce) as loss_fn:
        assert loss_fn is ce  # cross-entropy: the loss is left alone


def test_penultimate_layer_of_a_zoo_model_is_its_classifier():
    model = lenet()
    assert losses.penultimate_layer(model) is [m for m in model.modules()
                                                if isinstance(m, nn.Linear)][-1]


def test_fit_with_supcon_trains_and_differs_from_cross_entropy(tmp_path):
    splits = digits()
    results = {}
    for loss in ("cross_entropy", "supcon"):
        model = lenet()
        config = TrainConfig(epochs=2, batch_size=64, lr=0.05, loss=loss)
        results[loss] = fit(model, splits, config, tmp_path / loss, progress=False)
        assert not any(h for m in model.modules() for h in m._forward_pre_hooks.values())
    # the record's train_loss includes the contrastive term, the accuracy is the classifier's
    assert results["supcon"]["train_loss"] != results["cross_entropy"]["train_loss"]
    assert results["supcon"]["val_accuracy"] > 0.8


@pytest.mark.parametrize("changes", [{"loss": "triplet"}, {"temperature": 0.0},
                                     {"temperature": -0.1}, {"temperature": float("nan")},
                                     {"supcon_weight": 0.0},
                                     {"loss": "supcon", "sparse_kernels": True}])
def test_bad_loss_settings_are_one_line_config_errors(changes):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**changes)
    assert "\n" not in str(info.value)


def test_a_recipe_with_supcon_trains_and_is_audited(tmp_path):
    import json

    from test_audit_fixtures import TINY_AUDIT_RECIPE

    from prunescope import experiment

    raw = copy.deepcopy(TINY_AUDIT_RECIPE)
    raw["train"] = {**raw["train"], "loss": "supcon", "temperature": 0.1}
    raw["finetune"] = {**raw["finetune"], "loss": "supcon"}
    parsed = recipe.from_dict(raw)
    assert parsed.train.loss == "supcon" and parsed.finetune.loss == "supcon"
    assert recipe.from_dict(recipe.to_dict(parsed)) == parsed
    experiment.run(parsed, tmp_path / "run", progress=False)
    audit = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert audit["dense"]["k"] == 2
    representations = audit["populations"][-1]["representations"]
    assert representations["q_score"]["count"] > 0
    with pytest.raises(ConfigError, match="train.loss"):
        recipe.from_dict({**raw, "train": {"loss": "contrastive"}})
