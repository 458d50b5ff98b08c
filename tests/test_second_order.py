"""Tests of prunescope.second_order: OBS/WoodFisher against closed forms, SparseGPT's layer-wise
solver against magnitude pruning, patterns, and the bad-input errors (exact OBC:
test_exact_obc.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunescope import prune
from prunescope.criteria import CRITERIA, Context
from prunescope.errors import PruningError
from prunescope.mask import Mask
from prunescope.patterns import Pattern
from prunescope.second_order import SparseGPT, WoodFisher, hessians, prune_layers, reconstruct


def half_squared(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * (output - target).square().sum()


def quadratic_problem() -> tuple[nn.Linear, list, torch.Tensor]:
    """A bias-free Linear(4, 1) at the minimum of an exactly quadratic loss whose empirical
    Fisher equals its Hessian: every input appears twice, with residuals +1 and -1, so the mean
    gradient is 0 and each per-example gradient is +-x (``F = H = mean x x^T``)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=generator) @ torch.randn(4, 4, generator=generator)
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.9, -0.2, 0.5, 0.05]]))
        out = layer(x).squeeze(1)
    inputs = torch.cat([x, x])
    targets = torch.cat([out - 1.0, out + 1.0]).unsqueeze(1)
    return layer, [(inputs, targets)], inputs.T.double() @ inputs.double() / len(inputs)


def mean_loss(layer: nn.Linear, batches: list) -> float:
    (x, y), = batches
    residual = x.double() @ layer.weight.detach().double().T - y.double()
    return float(half_squared(residual, 0.0)) / len(x)


def test_obs_scores_are_the_closed_form() -> None:
    layer, batches, hessian = quadratic_problem()
    woodfisher = WoodFisher(block_size=4, dampening=0.1)
    scores = woodfisher.score(layer, ["weight"], Context(batches=batches, loss_fn=half_squared))
    damped = hessian + 0.1 * hessian.diagonal().mean() * torch.eye(4, dtype=torch.float64)
    w = layer.weight.detach().double()
    expected = w.square() / (2 * torch.linalg.inv(damped).diagonal())
    torch.testing.assert_close(scores["weight"], expected, rtol=1e-5, atol=1e-7)


def test_one_weight_obs_update_is_the_closed_form_and_the_loss_rises_by_its_score() -> None:
    layer, batches, hessian = quadratic_problem()
    w = layer.weight.detach().double().squeeze(0).clone()
    inverse = torch.linalg.inv(hessian)
    scores = w.square() / (2 * inverse.diagonal())
    q = int(scores.argmin())
    before = mean_loss(layer, batches)
    criterion = WoodFisher(block_size=4, dampening=1e-9).criterion()
    mask = prune(layer, criterion, "global", 0.25, batches, loss_fn=half_squared)
    assert mask["weight"].squeeze(0).tolist() == [i != q for i in range(4)]
    expected = w - w[q] * inverse[:, q] / inverse[q, q]
    torch.testing.assert_close(layer.weight.detach().double().squeeze(0), expected,
                               rtol=1e-5, atol=1e-6)
    assert layer.weight[0, q] == 0
    assert mean_loss(layer, batches) - before == pytest.approx(float(scores[q]), rel=1e-4)


def test_joint_obs_update_minimises_the_quadratic_with_the_pruned_set_at_zero() -> None:
    layer, batches, hessian = quadratic_problem()
    w = layer.weight.detach().double().squeeze(0).clone()
    criterion = WoodFisher(block_size=4, dampening=1e-9).criterion()
    mask = prune(layer, criterion, "global", 0.5, batches, loss_fn=half_squared)
    gone = ~mask["weight"].squeeze(0)
    kept = ~gone
    # independent closed form: delta_Q = -w_Q, and the kept coordinates solve H_KK d_K = -H_KQ d_Q
    delta = torch.zeros(4, dtype=torch.float64)
    delta[gone] = -w[gone]
    delta[kept] = torch.linalg.solve(hessian[kept][:, kept], hessian[kept][:, gone] @ w[gone])
    torch.testing.assert_close(layer.weight.detach().double().squeeze(0), w + delta,
                               rtol=1e-5, atol=1e-6)


def test_woodfisher_rounds_recompute_the_fisher_once_per_round(
    monkeypatch: pytest.MonkeyPatch, mlp8: nn.Module, batches8
) -> None:
    from prunescope.second_order import woodfisher

    calls = []
    original = woodfisher.empirical_fisher

    def counting(model, keep, *args):
        calls.append({n: int(k.sum()) for n, k in keep.items()})
        return original(model, keep, *args)

    monkeypatch.setattr(woodfisher, "empirical_fisher", counting)
    mask = prune(mlp8, "woodfisher", "global", 0.75, batches8, rounds=2)
    assert mask.num_kept == 24
    assert all(torch.all(mlp8.get_parameter(n)[~k] == 0) for n, k in mask.items())
    # one Fisher per round (solve reuses the score's), the second on the half-pruned weights
    assert [sum(c.values()) for c in calls] == [96, 48]


def test_block_size_must_divide_every_tensor(mlp8: nn.Module, batches8) -> None:
    criterion = WoodFisher(block_size=64).criterion()
    with pytest.raises(PruningError, match=r"block size 64 does not divide '2.weight' \(32 .*32"):
        prune(mlp8, criterion, "global", 0.5, batches8)


def test_a_block_size_that_would_not_fit_is_refused_before_allocating(batches8) -> None:
    model = nn.Sequential(nn.Linear(8, 4096), nn.ReLU(), nn.Linear(4096, 4096))
    criterion = WoodFisher(block_size=4096 * 4096).criterion()  # one block: 2 PiB of Fisher
    with pytest.raises(PruningError, match="needs .* GiB .* choose a smaller block size"):
        prune(model, criterion, "global", 0.5, batches8, exclude=["0.weight"])
    with pytest.raises(PruningError, match="needs"):
        prune(nn.Linear(8, 4), WoodFisher(block_size=32, memory_limit=1000).criterion(),
              "global", 0.5, batches8)


@pytest.mark.parametrize("criterion", ["woodfisher", "sparsegpt", "obc"])
def test_second_order_criteria_need_data(criterion: str, mlp8: nn.Module) -> None:
    with pytest.raises(PruningError, match="needs data"):
        prune(mlp8, criterion, "global", 0.5)


@pytest.mark.parametrize("criterion", ["sparsegpt", "obc"])
def test_layerwise_criteria_refuse_tensors_that_are_not_layer_weights(
    criterion: str, mlp8: nn.Module, batches8
) -> None:
    with pytest.raises(PruningError, match="Linear and ungrouped Conv2d"):
        prune(mlp8, criterion, "global", 0.5, batches8, include=["*"])


# -- the layer-wise solver -------------------------------------------------------------------
def random_layer_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights [16, 32] and correlated inputs [200, 32]; returns (W, X, H = X^T X / N)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(32, 32, generator=generator)
    x = torch.randn(200, 32, generator=generator) @ mixing
    w = torch.randn(16, 32, generator=generator)
    return w, x, x.T.double() @ x.double() / len(x)


def output_error(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (w - pruned).T).square().sum())


@pytest.mark.parametrize("seed", range(6))
def test_reconstruction_beats_magnitude_at_equal_sparsity(seed: int) -> None:
    w, x, hessian = random_layer_problem(seed)
    live = torch.ones_like(w, dtype=torch.bool)
    pruned, keep, _ = reconstruct(w, hessian, live=live, keep=128)
    assert int(keep.sum()) == 128 and torch.all(pruned[~keep] == 0)
    magnitude = torch.where(w.abs() >= w.abs().flatten().kthvalue(512 - 128 + 1).values, w, 0.0)
    assert int((magnitude != 0).sum()) == 128
    assert output_error(w, pruned, x) < 0.95 * output_error(w, magnitude, x)


def test_reconstruction_of_the_first_column_is_the_obs_closed_form() -> None:
    w, _, hessian = random_layer_problem()
    row = w[:1]
    fixed = torch.ones_like(row, dtype=torch.bool)
    fixed[0, 0] = False
    pruned, keep, _ = reconstruct(row, hessian, live=torch.ones_like(fixed), fixed=fixed,
                                  dampening=1e-12)
    inverse = torch.linalg.inv(hessian)
    expected = row.double()[0] - row.double()[0, 0] * inverse[:, 0] / inverse[0, 0]
    torch.testing.assert_close(pruned[0].double(), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(keep, fixed)


def test_reconstruction_under_two_four_keeps_two_of_every_four() -> None:
    w, x, hessian = random_layer_problem()
    pruned, keep, _ = reconstruct(w, hessian, live=torch.ones_like(w, dtype=torch.bool),
                                  nm=(2, 4))
    assert torch.all(keep.view(16, 8, 4).sum(2) == 2) and torch.all(pruned[~keep] == 0)
    nm = torch.zeros_like(keep).view(16, 8, 4).scatter_(
        2, w.abs().view(16, 8, 4).argsort(2, descending=True)[..., :2], True).view(16, 32)
    assert output_error(w, pruned, x) < output_error(w, w * nm, x)


def test_the_bias_absorbs_inputs_that_are_constant() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(100, 6, generator=generator)
    x[:, 3:] = -0.42  # a constant background, as in normalised MNIST
    layer = nn.Linear(6, 2)
    with torch.no_grad():
        before = layer(x)
    mask = prune_layers(layer_model := nn.Sequential(layer), Mask.ones(layer_model),
                        Pattern("unstructured"), [x], counts={"0.weight": 6}, dampening=1e-9)
    assert mask.num_kept == 6
    with torch.no_grad():
        torch.testing.assert_close(layer(x), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("criterion", ["sparsegpt", "obc"])
def test_layerwise_criteria_on_a_conv_net_with_two_four(criterion) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(),
                          nn.Linear(4 * 2 * 2, 4))
    batches = [(torch.randn(10, 4, 6, 6), torch.randint(0, 4, (10,)))]
    mask = prune(model, criterion, "global", None, batches, pattern="2:4")
    for keep in mask.values():
        assert torch.all(keep.movedim(1, -1).reshape(-1, 4).sum(1) == 2)


def test_layerwise_pruning_tracks_the_dense_network_better_than_magnitude() -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 5))
    x = torch.randn(300, 20)
    batches = [(x, torch.zeros(300, dtype=torch.long))]
    with torch.no_grad():
        reference = dense(x)
    errors = {}
    for name in ("magnitude", "sparsegpt", "obc"):
        model = copy.deepcopy(dense)
        prune(model, name, "uniform", 0.8, batches)
        with torch.no_grad():
            errors[name] = float((model(x) - reference).square().mean())
    non_sequential = copy.deepcopy(dense)
    prune(non_sequential, SparseGPT(sequential=False).criterion(), "uniform", 0.8, batches)
    with torch.no_grad():
        errors["non-sequential"] = float((non_sequential(x) - reference).square().mean())
    assert errors["sparsegpt"] < errors["non-sequential"] < errors["magnitude"]
    assert errors["sparsegpt"] < 0.5 * errors["magnitude"]
    assert errors["obc"] < 0.5 * errors["magnitude"]


def test_hessians_are_the_mean_input_outer_products_with_a_bias_column() -> None:
    layer = nn.Linear(3, 2)
    x = torch.randn(7, 3)
    (found,) = hessians(nn.Sequential(layer), {"0": layer}, [x[:4], x[4:]]).values()
    rows = torch.cat([x, torch.ones(7, 1)], dim=1).double()
    torch.testing.assert_close(found, rows.T @ rows / 7)


def test_second_order_criteria_are_registered() -> None:
    assert CRITERIA.get("woodfisher").solve is not None and CRITERIA.get("obc").needs_data
    assert CRITERIA.get("sparsegpt").solve is not None and CRITERIA.get("sparsegpt").needs_data


@pytest.mark.parametrize("criterion", ["sparsegpt", "obc", "woodfisher"])
def test_global_second_order_never_prunes_a_layer_away(criterion: str) -> None:
    import prunescope

    splits = prunescope.data.load("digits", seed=0)
    torch.manual_seed(0)
    model = prunescope.models.build("lenet300", image_size=8)
    x, y = splits.train.x[:256], splits.train.y[:256]
    mask = prune(model, criterion, "global", 0.9, [(x[:128], y[:128]), (x[128:], y[128:])])
    for name, keep in mask.items():
        assert keep.any(dim=1).all(), name  # every output unit keeps a weight
    assert mask.num_kept == round(0.1 * mask.num_total)
    for name, keep in mask.items():
        assert torch.all(model.get_parameter(name)[~keep] == 0)


def test_sparsegpt_keeps_each_rows_best_weight_when_asked() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 10, generator=generator)
    weight[2] *= 1e-3  # its weights score lowest: a plain exact count leaves the row empty
    x = torch.randn(10, 64, generator=generator).double()
    hessian = x @ x.T / 64
    live = torch.ones(6, 10, dtype=torch.bool)
    _, plain, _ = reconstruct(weight, hessian, live=live, keep=6, block=4)
    _, every, _ = reconstruct(weight, hessian, live=live, keep=6, block=4, every_row=True)
    assert not plain[2].any()
    assert every.sum() == 6 and every.any(dim=1).all()


def test_woodfisher_prunes_a_tied_weight_through_its_linear_alias() -> None:
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 5, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(tokens))

    torch.manual_seed(0)
    model = TiedLM()
    batches = [(torch.randint(0, 5, (16,)), torch.randint(0, 5, (16,)))]
    mask = prune(model, "woodfisher", "global", 0.5, batches)
    assert list(mask) == ["head.weight"]
    assert int(model.embed.weight.count_nonzero()) == mask.num_kept == 10
