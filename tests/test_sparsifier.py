"""Tests of prunescope.sparsifier: prune(), the registry matrix and the training-loop hooks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunescope
from prunescope import sparsifier
from prunescope.allocation import ALLOCATIONS, keep_count
from prunescope.connectivity import effective_sparsity
from prunescope.criteria import CRITERIA
from prunescope.errors import PruningError
from prunescope.mask import Mask
from prunescope.schedules import Gradual
from prunescope.sparsifier import MaskHold, ScheduledPruning, prune
from prunescope.targets import default_targets, select


def random_mask(model: nn.Module, density: float, seed: int = 0) -> Mask:
    generator = torch.Generator().manual_seed(seed)
    return Mask({n: torch.rand(model.get_parameter(n).shape, generator=generator) < density
                 for n in default_targets(model)})


def assert_applied(model: nn.Module, mask: Mask, original: nn.Module) -> None:
    """Pruned weights are exactly zero, kept weights untouched."""
    for name, keep in mask.items():
        weight, before = model.get_parameter(name), original.get_parameter(name)
        assert torch.all(weight[~keep] == 0)
        assert torch.equal(weight[keep], before[keep])


# -- the registry matrix ---------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "block:1x2"])
@pytest.mark.parametrize("allocation", ALLOCATIONS.names())
@pytest.mark.parametrize("criterion", CRITERIA.names())
def test_every_criterion_allocation_and_pattern(
    criterion: str, allocation: str, pattern: str, mlp8: nn.Module, batches8: list
) -> None:
    original = copy.deepcopy(mlp8)
    spec = CRITERIA.get(criterion)
    sparsity = None if pattern == "2:4" else 0.75
    options = {"data": batches8 if spec.needs_data else None, "pattern": pattern,
               "rounds": 3 if criterion == "synflow" else None}
    if spec.signed and allocation == "lamp" and pattern != "2:4":  # N:M ignores the allocation
        with pytest.raises(PruningError, match="non-negative"):
            prune(mlp8, criterion, allocation, sparsity, **options)
        return
    if criterion == "obc" and pattern.startswith("block"):  # exact OBC is per weight
        with pytest.raises(PruningError, match="use criterion 'sparsegpt'"):
            prune(mlp8, criterion, allocation, sparsity, **options)
        return
    mask = prune(mlp8, criterion, allocation, sparsity, **options)
    assert list(mask) == default_targets(mlp8) == ["0.weight", "2.weight"]
    if spec.solve is None:
        assert_applied(mlp8, mask, original)
    else:  # second-order criteria correct the weights they keep
        assert all(torch.all(mlp8.get_parameter(n)[~keep] == 0) for n, keep in mask.items())
    if pattern == "unstructured":
        assert mask.num_kept == keep_count(96, 0.75) == 24
    elif pattern == "2:4":
        assert mask.sparsity == 0.5
        for keep in mask.values():
            assert torch.all(keep.view(-1, 4).sum(1) == 2)
    else:  # whole 1x2 blocks, each tensor within one block of its count
        for keep in mask.values():
            pairs = keep.view(-1, 2)
            assert torch.all(pairs[:, 0] == pairs[:, 1])
        assert abs(mask.num_kept - 24) <= 2


def test_prune_is_reproducible_by_seed(mlp8: nn.Module) -> None:
    first = prune(copy.deepcopy(mlp8), "random", sparsity=0.5, seed=1)
    assert prune(copy.deepcopy(mlp8), "random", sparsity=0.5, seed=1).equal(first)
    assert not prune(copy.deepcopy(mlp8), "random", sparsity=0.5, seed=2).equal(first)


# -- rounds and starting masks ---------------------------------------------------------------
def chain(*weights: list[float]) -> nn.Module:
    """A bias-free linear layer with the given weights (one output)."""
    layer = nn.Linear(len(weights[0]), len(weights), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weights))
    return nn.Sequential(layer)


def spy_rounds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, dict]]:
    """Record the (sparsity, overrides) of every pruning round."""
    calls: list[tuple[float, dict]] = []
    once = sparsifier._Plan.once

    def spy(self, model, current, sparsity, overrides):
        calls.append((sparsity, dict(overrides)))
        return once(self, model, current, sparsity, overrides)

    monkeypatch.setattr(sparsifier._Plan, "once", spy)
    return calls


def test_iterative_magnitude_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    model = chain([0.1, -0.8, 0.3, 0.5, -0.2, 0.9, 0.05, -0.4])
    calls = spy_rounds(monkeypatch)
    mask = prune(model, "magnitude", sparsity=0.75, rounds=2)
    # geometric rounds: density 1 -> 0.5 -> 0.25; keeps |w| 0.9, 0.8 (then 0.5, 0.4 in round 1)
    assert [sparsity for sparsity, _ in calls] == pytest.approx([0.5, 0.75])
    assert mask["0.weight"].tolist() == [[False, True, False, False, False, True, False, False]]
    assert torch.equal(model[0].weight, torch.tensor([[0.0, -0.8, 0.0, 0.0, 0.0, 0.9, 0.0, 0.0]]))


def test_rounds_shrink_geometrically_from_the_starting_mask(
    monkeypatch: pytest.MonkeyPatch, mlp8: nn.Module
) -> None:
    start = random_mask(mlp8, 0.5, seed=4)
    calls = spy_rounds(monkeypatch)
    prune(mlp8, "magnitude", sparsity=0.9, rounds=3, mask=start, min_density=0.0)
    d0 = start.density
    expected = [1 - d0 * (0.1 / d0) ** (r / 3) for r in (1, 2, 3)]
    assert [sparsity for sparsity, _ in calls] == pytest.approx(expected)


def test_overrides_shrink_geometrically_over_rounds(
    monkeypatch: pytest.MonkeyPatch, mlp8: nn.Module
) -> None:
    calls = spy_rounds(monkeypatch)
    mask = prune(mlp8, "magnitude", sparsity=0.8, rounds=2, overrides={"2.weight": 0.75})
    assert [o["2.weight"] for _, o in calls] == pytest.approx([0.5, 0.75])
    assert mask.sparsities()["2.weight"] == 0.75 and mask.num_kept == keep_count(96, 0.8)


@pytest.mark.parametrize("criterion", ["magnitude", "synflow", "random"])
def test_iterative_masks_are_nested_in_the_starting_mask(criterion: str, mlp8: nn.Module) -> None:
    start = random_mask(mlp8, 0.6, seed=1)
    mask = prune(mlp8, criterion, sparsity=0.9, rounds=3, mask=start, min_density=0.0)
    assert all(not (mask[n] & ~start[n]).any() for n in mask)
    assert mask.num_kept == keep_count(96, 0.9)


def test_start_mask_sparser_than_the_target_raises(mlp8: nn.Module) -> None:
    start = random_mask(mlp8, 0.5)
    with pytest.raises(PruningError, match="cannot regrow"):
        prune(mlp8, "magnitude", sparsity=0.3, mask=start)


def test_start_mask_must_fit_the_model(mlp8: nn.Module) -> None:
    with pytest.raises(PruningError):
        prune(mlp8, mask=Mask({"0.weight": torch.ones(3, 3, dtype=torch.bool)}))


@pytest.mark.parametrize("rounds", [0, -1, 1.5, True])
def test_bad_rounds_raise(rounds, mlp8: nn.Module) -> None:
    with pytest.raises(PruningError, match="rounds"):
        prune(mlp8, sparsity=0.5, rounds=rounds)


# -- N:M sparsity and targets ----------------------------------------------------------------
def test_n_m_with_an_inconsistent_sparsity_raises(mlp8: nn.Module) -> None:
    with pytest.raises(PruningError, match="fixes sparsity at 0.5"):
        prune(mlp8, pattern="2:4", sparsity=0.9)


@pytest.mark.parametrize("sparsity", [None, 0.5])
def test_n_m_with_none_or_its_own_sparsity_works(sparsity, mlp8: nn.Module) -> None:
    assert prune(mlp8, pattern="2:4", sparsity=sparsity).sparsity == 0.5


def test_unstructured_needs_a_sparsity(mlp8: nn.Module) -> None:
    with pytest.raises(PruningError, match="give a sparsity"):
        prune(mlp8, sparsity=None)


def test_model_without_linear_or_conv_raises() -> None:
    with pytest.raises(PruningError, match="no prunable tensor"):
        prune(nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()), sparsity=0.5)


def test_include_and_exclude_globs_select_names(tiny_mlp: nn.Module) -> None:
    assert select(tiny_mlp) == ["1.weight", "3.weight"]
    assert select(tiny_mlp, ["1.*"]) == ["1.weight", "1.bias"]
    assert select(tiny_mlp, ["*"], ["*.bias"]) == ["1.weight", "3.weight"]
    assert select(tiny_mlp, exclude=["3.*"]) == ["1.weight"]
    with pytest.raises(PruningError, match="no prunable tensor"):
        select(tiny_mlp, ["fc*"])
    mask = prune(tiny_mlp, sparsity=0.5, include=["*.weight"], exclude=["3.weight"])
    assert list(mask) == ["1.weight"] and mask.num_kept == 6
    assert torch.count_nonzero(tiny_mlp[3].weight) == 6  # untouched


def test_overrides_fix_a_tensor_and_keep_the_global_sparsity(mlp8: nn.Module) -> None:
    mask = prune(mlp8, sparsity=0.75, overrides={"2.weight": 0.5})
    assert mask.sparsities()["2.weight"] == 0.5 and mask.num_kept == 24


def test_nan_scores_raise(mlp8: nn.Module) -> None:
    with torch.no_grad():
        mlp8[0].weight[0, 0] = float("nan")
    with pytest.raises(PruningError, match="NaN"):
        prune(mlp8, "magnitude", sparsity=0.5)


# -- effective sparsity ----------------------------------------------------------------------
def deep_mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


@pytest.mark.parametrize("target", [0.7, 0.85, 0.95])
def test_effective_target_keeps_the_most_weights_that_reach_it(target: float) -> None:
    model = deep_mlp()
    original = copy.deepcopy(model)
    mask = prune(model, "magnitude", sparsity=target, effective=True, min_density=0.0)
    assert effective_sparsity(model, mask) >= target
    assert mask.sparsity <= target + 1e-12
    assert_applied(model, mask, original)
    if mask.num_kept < mask.num_total:  # keeping one more weight falls below the target
        more = prune(copy.deepcopy(original), "magnitude",
                     sparsity=1 - (mask.num_kept + 1) / mask.num_total, min_density=0.0)
        assert more.num_kept == mask.num_kept + 1
        assert effective_sparsity(model, more) < target


@pytest.mark.parametrize("target", [0.64, 0.66, 0.75])
def test_effective_target_is_reached_when_the_keep_count_would_round_up(target: float) -> None:
    # One layer: every kept weight is effective, so effective == direct sparsity, and
    # 10 * (1 - 0.64) = 3.6 kept weights must round down to 3, not up to 4.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 1))
    mask = prune(model, "magnitude", sparsity=target, effective=True)
    assert effective_sparsity(model, mask) == mask.sparsity >= target
    assert mask.num_kept == int(10 * (1 - target) + 1e-9)


def test_effective_target_with_a_random_criterion_prunes_the_model_by_its_mask() -> None:
    model = deep_mlp()
    original = copy.deepcopy(model)
    mask = prune(model, "random", sparsity=0.85, effective=True, seed=5)
    assert effective_sparsity(model, mask) >= 0.85
    assert_applied(model, mask, original)
    # every attempt drew the same scores as a plain prune with that seed
    same = prune(copy.deepcopy(original), "random", sparsity=mask.sparsity, seed=5)
    assert same.equal(mask)
    more = prune(copy.deepcopy(original), "random", seed=5,
                 sparsity=1 - (mask.num_kept + 1) / mask.num_total)
    assert effective_sparsity(model, more) < 0.85


def test_effective_target_may_keep_the_whole_starting_mask() -> None:
    model = deep_mlp()
    ones = Mask.ones(model)
    cut = ones["0.weight"].clone()
    cut[0] = False  # hidden unit 0 loses its 6 inbound weights ...
    start = Mask({**ones, "0.weight": cut})
    # ... so its 4 outbound weights are dead: effective sparsity 10 / 62, direct 6 / 62
    target = 1 - (start.num_kept - 4) / start.num_total
    assert effective_sparsity(model, start) == pytest.approx(target)
    mask = prune(model, "magnitude", sparsity=target, effective=True, mask=start)
    assert mask.equal(start)


# -- the training-loop hooks -----------------------------------------------------------------
def train(model: nn.Module, hook: MaskHold, optimizer: torch.optim.Optimizer, steps: int,
          check=None) -> None:
    """The order prunescope.train.fit calls a hook in (its methods are optional)."""
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        if hasattr(hook, "on_step"):
            hook.on_step(model, step, optimizer)
        x = torch.randn(16, 8, generator=generator)
        y = torch.randint(0, 4, (16,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        hook.before_optimizer_step(model, step, optimizer, None)
        optimizer.step()
        hook.after_optimizer_step(model, step, optimizer)
        if check is not None:
            check(step)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ],
    ids=["sgd-nesterov", "adamw"],
)
def test_mask_hold_keeps_pruned_weights_exactly_zero(make_optimizer, mlp8: nn.Module) -> None:
    mask = random_mask(mlp8, 0.3, seed=5)
    mask.apply_(mlp8)
    before = copy.deepcopy(mlp8)

    def check(step: int) -> None:
        for name, keep in mask.items():
            assert torch.all(mlp8.get_parameter(name)[~keep] == 0), (name, step)

    optimizer = make_optimizer(mlp8.parameters())
    train(mlp8, MaskHold(mask), optimizer, 50, check)
    for name, keep in mask.items():
        param = mlp8.get_parameter(name)
        changed = param[keep] != before.get_parameter(name)[keep]
        assert changed.float().mean() > 0.9
        # masked gradients: no momentum or moment estimate builds up behind the zeros
        buffers = [v for v in optimizer.state[param].values() if v.shape == param.shape]
        assert buffers and all(torch.all(b[~keep] == 0) for b in buffers)


def test_mask_hold_follows_a_replaced_mask_and_another_model(mlp8: nn.Module) -> None:
    """The parameters are looked up once per (mask, model): a new mask or model is looked up
    afresh, never held on the parameters of the old one."""
    hook = MaskHold(random_mask(mlp8, 0.3, seed=1))
    hook.after_optimizer_step(mlp8, 0)
    hook.mask = random_mask(mlp8, 0.6, seed=2)
    hook.after_optimizer_step(mlp8, 1)
    for name, keep in hook.mask.items():
        assert torch.all(mlp8.get_parameter(name)[~keep] == 0)
    other = copy.deepcopy(mlp8)
    with torch.no_grad():
        for param in other.parameters():
            param.fill_(1.0)
    hook.after_optimizer_step(other, 2)
    for name, keep in hook.mask.items():
        assert torch.all(other.get_parameter(name)[~keep] == 0)
        assert torch.all(other.get_parameter(name)[keep] == 1)


def test_scheduled_pruning_follows_a_gradual_schedule(mlp8: nn.Module) -> None:
    schedule = Gradual(final=0.8, start=2, end=20, every=5)
    hook = ScheduledPruning(schedule, "magnitude", "global")
    masks: list[Mask] = []

    def check(step: int) -> None:
        if step < 2:
            assert hook.mask is None
            return
        assert hook.mask.num_kept == keep_count(96, schedule.sparsity_at(step)), step
        for name, keep in hook.mask.items():
            assert torch.all(mlp8.get_parameter(name)[~keep] == 0)
        if masks:  # masks only shrink
            assert all(not (hook.mask[n] & ~masks[-1][n]).any() for n in hook.mask)
        masks.append(hook.mask)

    train(mlp8, hook, torch.optim.SGD(mlp8.parameters(), lr=0.1, momentum=0.9), 30, check)
    assert hook.mask.num_kept == keep_count(96, 0.8)
    distinct = {m.num_kept for m in masks}
    assert distinct == {keep_count(96, schedule.sparsity_at(s)) for s in (2, 7, 12, 17, 20)}


def test_effective_target_with_a_weight_correcting_criterion_returns_the_model_it_leaves() -> None:
    """Every bisection attempt starts from the original weights and biases (OBC corrects both),
    and the returned mask is the one the model's weights were pruned with."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                          nn.Linear(12, 4))
    model.input_shape = (20,)
    data = [(torch.randn(64, 20), torch.randint(0, 4, (64,)))]
    reference = copy.deepcopy(model)
    mask = prune(model, "obc", "uniform", 0.6, data, effective=True)
    for name, keep in mask.items():
        assert torch.all(model.get_parameter(name)[~keep] == 0), name
    direct = prune(reference, "obc", "uniform", 1 - mask.num_kept / mask.num_total, data)
    assert direct.equal(mask)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, msg=name)


# -- min_density: no layer pruned away -------------------------------------------------------
def test_global_magnitude_at_95_keeps_a_weight_per_class_of_resnet20(
        caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = prunescope.models.build("resnet20")
    with caplog.at_level("WARNING", logger="prunescope"):
        mask = prune(model, "magnitude", "global", 0.95)
    fc = mask["fc.weight"]
    assert fc.sum() >= 10 and fc.any(dim=1).all()  # one weight per class at least
    assert mask.num_kept == keep_count(mask.num_total, 0.95)
    assert "'fc.weight'" in caplog.text


def test_min_density_zero_lets_a_layer_go_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = prunescope.models.build("resnet20")
    with caplog.at_level("WARNING", logger="prunescope"):
        mask = prune(model, "magnitude", "global", 0.95, min_density=0.0)
    assert not mask["fc.weight"].any()
    assert "'fc.weight' is pruned entirely" in caplog.text


def test_unstructured_selection_keeps_every_output_unit(mlp8: nn.Module) -> None:
    with torch.no_grad():
        mlp8[2].weight[1].mul_(1e-3)  # the second output's weights are the smallest of the layer
    counts = {"0.weight": 60, "2.weight": 8}
    mask = prune(copy.deepcopy(mlp8), "magnitude", "global", 1 - 68 / 96,
                 overrides={"2.weight": 0.75})
    assert mask["2.weight"].sum() == counts["2.weight"] and mask["2.weight"].any(dim=1).all()
    plain = prune(mlp8, "magnitude", "global", 1 - 68 / 96, overrides={"2.weight": 0.75},
                  min_density=0.0)
    assert not plain["2.weight"][1].any()


def test_a_min_density_floor_per_layer(mlp8: nn.Module) -> None:
    mask = prune(mlp8, "magnitude", "global", 0.6, min_density=0.35)
    assert mask["2.weight"].sum() >= math.ceil(0.35 * 32) and mask["0.weight"].sum() >= 23
    assert mask.num_kept == keep_count(96, 0.6)


def test_floors_above_the_budget_raise_in_prune_and_check(mlp8: nn.Module) -> None:
    with pytest.raises(PruningError, match="min_density"):
        sparsifier.check(mlp8, "magnitude", "global", 0.95)
    with pytest.raises(PruningError, match="min_density"):
        prune(mlp8, "magnitude", "global", 0.95)
    sparsifier.check(mlp8, "magnitude", "global", 0.95, min_density=0.0)


def test_n_m_keeps_its_rows_and_refuses_a_higher_floor(mlp8: nn.Module) -> None:
    mask = prune(copy.deepcopy(mlp8), "magnitude", pattern="2:4", sparsity=None)
    assert mask.sparsity == 0.5
    with pytest.raises(PruningError, match="min_density"):
        prune(mlp8, "magnitude", pattern="2:4", sparsity=None, min_density=0.6)


# -- a new criterion and allocation from this file alone -------------------------------------
@pytest.fixture
def registered():
    """A criterion ("last_input": keep the weights on the highest input indices) and an
    allocation ("all_in_first": the whole budget to the first tensor that can take it),
    registered here and removed afterwards."""
    from prunescope.criteria import register

    @register("last_input")
    def last_input(model, names, context):
        params = {n: model.get_parameter(n) for n in names}
        return {n: torch.arange(p.shape[1]).expand_as(p).double() for n, p in params.items()}

    @ALLOCATIONS.register("all_in_first")
    def all_in_first(scores, keep):
        counts = {}
        for name, score in scores.items():
            counts[name] = min(keep, score.numel())
            keep -= counts[name]
        return counts

    yield
    CRITERIA.unregister("last_input")
    ALLOCATIONS.unregister("all_in_first")


def test_a_criterion_and_an_allocation_registered_in_one_file_prune(registered,
                                                                    mlp8: nn.Module) -> None:
    mask = prune(copy.deepcopy(mlp8), "last_input", "all_in_first", 1 - 64 / 96,
                 min_density=0.0)
    assert mask["0.weight"].all() and not mask["2.weight"].any()
    mask = prune(mlp8, "last_input", "all_in_first", 1 - 64 / 96)  # one weight per output kept
    assert mask["0.weight"].sum() == 60 and mask["0.weight"][:, 4:].all()
    assert mask["2.weight"].sum() == 4 and mask["2.weight"][:, -1].all()
