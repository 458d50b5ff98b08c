"""Tests of prunescope.allocation: per-tensor keep counts, hand-computed."""

from __future__ import annotations

import math

import pytest
import torch

from prunescope.allocation import (
    ALLOCATIONS,
    allocate,
    check_sparsity,
    erk_densities,
    igq_densities,
    keep_count,
    lamp_scores,
)
from prunescope.errors import ConfigError, PruningError, UnknownNameError
from prunescope.patterns import topk_mask

INF = math.inf


def hand_scores() -> dict[str, torch.Tensor]:
    return {"a": torch.tensor([[3.0, 1.0], [2.0, 0.0]]), "b": torch.tensor([5.0, 0.5, 4.0, 1.0])}


def sized(**sizes: int) -> dict[str, torch.Tensor]:
    """Random scores of the given sizes (shape-based rules only look at the sizes)."""
    generator = torch.Generator().manual_seed(0)
    return {name: torch.rand(size, generator=generator) for name, size in sizes.items()}


# -- global ----------------------------------------------------------------------------------
# Ranking: 5(b) 4(b) 3(a) 2(a) 1(a, earlier tensor wins the tie) 1(b) 0.5(b) 0(a).
@pytest.mark.parametrize(
    ("keep", "a", "b"),
    [(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 1, 2), (4, 2, 2), (5, 3, 2), (6, 3, 3), (7, 3, 4),
     (8, 4, 4)],
)
def test_global_counts_by_hand(keep: int, a: int, b: int) -> None:
    assert ALLOCATIONS.get("global")(hand_scores(), keep) == {"a": a, "b": b}
    if keep > 0:  # sparsity 1.0 is refused
        assert allocate(hand_scores(), 1 - keep / 8, "global") == {"a": a, "b": b}


def test_global_ties_go_to_the_earlier_tensor_then_the_lower_index() -> None:
    scores = {"a": torch.ones(3), "b": torch.ones(3)}
    assert ALLOCATIONS.get("global")(scores, 4) == {"a": 3, "b": 1}
    assert ALLOCATIONS.get("global")(scores, 2) == {"a": 2, "b": 0}
    assert topk_mask(scores["b"], 1).tolist() == [True, False, False]


def test_global_never_counts_pruned_entries_while_live_ones_remain() -> None:
    scores = {"a": torch.tensor([-INF, 0.0, -1.0]), "b": torch.tensor([-INF, -INF])}
    assert ALLOCATIONS.get("global")(scores, 2) == {"a": 2, "b": 0}


# -- uniform ---------------------------------------------------------------------------------
def test_uniform_largest_remainder_by_hand() -> None:
    # density 7/15: targets 1.4, 2.33, 3.27 -> floors 1, 2, 3; the one left goes to a (0.4).
    assert ALLOCATIONS.get("uniform")(sized(a=3, b=5, c=7), 7) == {"a": 2, "b": 2, "c": 3}


@pytest.mark.parametrize("keep", range(0, 16))
def test_uniform_totals_exactly(keep: int) -> None:
    counts = ALLOCATIONS.get("uniform")(sized(a=3, b=5, c=7), keep)
    assert sum(counts.values()) == keep
    for name, size in {"a": 3, "b": 5, "c": 7}.items():
        assert abs(counts[name] - keep * size / 15) < 1


# -- ERK -------------------------------------------------------------------------------------
# Linear(8 -> 4) weight (4, 8): sum 12, prod 32, raw 0.375; Linear(4 -> 2) weight (2, 4): raw 0.75.
SHAPES = {"fc1": torch.Size([4, 8]), "fc2": torch.Size([2, 4])}


def test_erk_densities_by_hand() -> None:
    # eps = 12 / (0.375 * 32 + 0.75 * 8) = 2/3
    densities = erk_densities(SHAPES, 12)
    assert densities["fc1"] == pytest.approx(0.25)
    assert densities["fc2"] == pytest.approx(0.5)
    scores = {n: torch.rand(s) for n, s in SHAPES.items()}
    assert ALLOCATIONS.get("erk")(scores, 12) == {"fc1": 8, "fc2": 4}


def test_erk_caps_a_small_layer_at_density_one() -> None:
    # keep 30: eps = 30/18 would give fc2 1.25 > 1, so fc2 is dense (8) and fc1 gets the
    # rest: eps = 22 / 12, density 0.375 * 22 / 12 = 0.6875 = 22 / 32.
    densities = erk_densities(SHAPES, 30)
    assert densities == {"fc1": pytest.approx(0.6875), "fc2": 1.0}
    scores = {n: torch.rand(s) for n, s in SHAPES.items()}
    assert ALLOCATIONS.get("erk")(scores, 30) == {"fc1": 22, "fc2": 8}


def test_erk_keeping_everything_is_dense() -> None:
    assert erk_densities(SHAPES, 40) == {"fc1": 1.0, "fc2": 1.0}


# -- IGQ -------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [1, 40, 77, 124])
def test_igq_densities_meet_the_budget_with_one_force(keep: int) -> None:
    sizes = {"a": 100, "b": 20, "c": 5}
    densities = igq_densities(sizes, keep)
    assert sum(sizes[n] * d for n, d in densities.items()) == pytest.approx(keep, rel=1e-9)
    forces = [(1 / densities[n] - 1) / sizes[n] for n in sizes]  # d = 1 / (F n + 1)
    assert forces[0] > 0 and forces == pytest.approx([forces[0]] * 3, rel=1e-9)
    assert densities["a"] < densities["b"] < densities["c"]  # larger layers pruned more
    counts = ALLOCATIONS.get("igq")(sized(a=100, b=20, c=5), keep)
    assert sum(counts.values()) == keep


def test_igq_extremes() -> None:
    assert igq_densities({"a": 4, "b": 2}, 6) == {"a": 1.0, "b": 1.0}
    assert igq_densities({"a": 4, "b": 2}, 0) == {"a": 0.0, "b": 0.0}


# -- LAMP ------------------------------------------------------------------------------------
def test_lamp_scores_by_hand() -> None:
    # squares 1, 4, 9; suffix sums 14, 13, 9
    expected = [1 / 14, 4 / 13, 1.0]
    assert lamp_scores(torch.tensor([1.0, 2.0, 3.0])).tolist() == pytest.approx(expected)
    permuted = lamp_scores(torch.tensor([[3.0, 1.0], [2.0, -INF]]))
    assert permuted[0].tolist() == pytest.approx([1.0, 1 / 14])
    assert permuted[1, 0].item() == pytest.approx(4 / 13) and permuted[1, 1].item() == -INF


def test_lamp_refuses_negative_scores() -> None:
    with pytest.raises(PruningError, match="non-negative"):
        lamp_scores(torch.tensor([1.0, -2.0]))


def test_lamp_allocation_by_hand() -> None:
    # a = [1, 2, 3] -> [1/14, 4/13, 1]; b = [10, 20] -> squares 100, 400 -> [0.2, 1].
    # Ranking: 1 (a), 1 (b), 4/13 (a), 0.2 (b), 1/14 (a).
    scores = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([10.0, 20.0])}
    lamp = ALLOCATIONS.get("lamp")
    assert [lamp(scores, k) for k in (1, 2, 3, 4)] == [
        {"a": 1, "b": 0}, {"a": 1, "b": 1}, {"a": 2, "b": 1}, {"a": 2, "b": 2}]
    # global on the raw scores would keep b first
    assert ALLOCATIONS.get("global")(scores, 2) == {"a": 0, "b": 2}


# -- allocate: the budget and overrides ------------------------------------------------------
@pytest.mark.parametrize("allocation", ALLOCATIONS.names())
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_every_allocation_keeps_the_budget(allocation: str, sparsity: float) -> None:
    scores = sized(a=12, b=30, c=6)
    counts = allocate(scores, sparsity, allocation)
    assert sum(counts.values()) == keep_count(48, sparsity)
    assert all(0 <= counts[n] <= scores[n].numel() for n in scores)


@pytest.mark.parametrize("allocation", ALLOCATIONS.names())
def test_override_fixes_the_named_tensor_and_the_total(allocation: str) -> None:
    scores = sized(a=12, b=30, c=6)
    counts = allocate(scores, 0.5, allocation, overrides={"c": 0.5})
    assert counts["c"] == 3
    assert sum(counts.values()) == 24
    glob = allocate(scores, 0.5, allocation, overrides={"[ab]": 0.5})
    assert glob == {"a": 6, "b": 15, "c": 3}


def test_first_matching_override_wins() -> None:
    scores = sized(a=10, ab=10)
    counts = allocate(scores, 0.5, "global", overrides={"ab": 0.9, "a*": 0.1})
    assert counts == {"a": 9, "ab": 1}


def test_override_that_cannot_be_reconciled_raises() -> None:
    scores = sized(a=4, b=8)
    with pytest.raises(PruningError, match="cannot be reconciled"):
        allocate(scores, 0.9, "global", overrides={"a": 0.0})  # a keeps 4 > 1 in all
    with pytest.raises(PruningError, match="cannot be reconciled"):
        allocate(scores, 0.0, "global", overrides={"a": 0.5})  # b cannot hold 10


def test_override_matching_nothing_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="matches no prunable tensor"):
        allocate(sized(a=4, b=8), 0.5, "global", overrides={"fc*": 0.5})


def test_unknown_allocation_lists_the_choices() -> None:
    with pytest.raises(UnknownNameError, match="global"):
        allocate(sized(a=4), 0.5, "nope")


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True, None])
def test_check_sparsity_rejects(bad) -> None:
    with pytest.raises(ConfigError):
        check_sparsity(bad)
    with pytest.raises(ConfigError):
        allocate(sized(a=4), bad)


@pytest.mark.parametrize("good", [0, 0.0, 0.5, 0.999])
def test_check_sparsity_accepts(good) -> None:
    assert check_sparsity(good) == float(good) and isinstance(check_sparsity(good), float)


# -- floors ----------------------------------------------------------------------------------
def test_a_floor_moves_the_budget_to_the_other_tensors_by_hand(
        caplog: pytest.LogCaptureFixture) -> None:
    # global keeps the 4 highest: all in "a"; "b" (floor 2) would be pruned away
    scores = {"a": torch.tensor([[9.0, 8.0, 7.0], [6.0, 5.0, 4.0]]),
              "b": torch.tensor([[0.1, 0.2], [0.4, 0.3]])}
    assert allocate(scores, 0.6, "global") == {"a": 4, "b": 0}
    with caplog.at_level("WARNING", logger="prunescope.allocation"):
        counts = allocate(scores, 0.6, "global", floors={"a": 2, "b": 2})
    assert counts == {"a": 2, "b": 2}  # still 4 kept in all: the global sparsity holds
    assert "'b'" in caplog.text and "'a'" not in caplog.text


@pytest.mark.parametrize("allocation", ALLOCATIONS.names())
def test_floors_that_are_met_change_nothing(allocation: str) -> None:
    scores = sized(a=40, b=60, c=100)
    plain = allocate(scores, 0.7, allocation)
    assert allocate(scores, 0.7, allocation, floors={n: 1 for n in scores}) == plain


@pytest.mark.parametrize("allocation", ALLOCATIONS.names())
def test_every_allocation_meets_its_floors_and_the_budget(allocation: str) -> None:
    scores = sized(a=400, b=600, c=10)
    scores["c"] = scores["c"] * 1e-6  # lowest scores: global and lamp would prune it away
    floors = {"a": 3, "b": 5, "c": 10}
    counts = allocate(scores, 0.95, allocation, floors=floors)
    assert sum(counts.values()) == keep_count(1010, 0.95)
    assert all(counts[n] >= floors[n] for n in scores)


def test_floors_above_the_budget_raise() -> None:
    with pytest.raises(PruningError, match=r"at least 12 weights, more than the 10.*min_density"):
        allocate(sized(a=50, b=50), 0.9, "uniform", floors={"a": 6, "b": 6})


def test_an_override_below_its_floor_is_raised_to_it() -> None:
    counts = allocate(sized(a=50, b=50), 0.5, "global", {"a": 0.99}, floors={"a": 5, "b": 5})
    assert counts["a"] == 5 and sum(counts.values()) == 50
