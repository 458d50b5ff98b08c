"""The group datasets built from the shipped MNIST, and the optional ``groups`` of a Subset."""

from __future__ import annotations

import pytest
import torch

from prunescope import data
from prunescope.data.groups import LT_TIERS, long_tailed_counts, tier_of_classes
from prunescope.errors import DataError


@pytest.fixture(scope="module")
def mnist_lt() -> data.Splits:
    return data.load("mnist_lt", val_size=500, seed=0)


@pytest.fixture(scope="module")
def colored() -> data.Splits:
    return data.load("colored_mnist", val_size=1000, seed=0)


@pytest.fixture(scope="module")
def mnist() -> data.Splits:
    return data.load("mnist", val_size=0)


def test_long_tailed_counts_follow_the_exponential_profile():
    counts = long_tailed_counts(5000, 100, 10)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert counts[0] / counts[-1] == 100
    assert tier_of_classes(counts).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_mnist_lt_pool_test_and_groups(mnist_lt):
    assert "mnist_lt" in data.names()
    pool = torch.cat([mnist_lt.train.y, mnist_lt.val.y])
    assert torch.bincount(pool).tolist() == long_tailed_counts(5000, 100, 10)
    assert len(mnist_lt.test) == 10_000 and len(mnist_lt.val) == 500
    assert mnist_lt.group_names == tuple(name for _, name in LT_TIERS)
    tiers = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    for part in (mnist_lt.train, mnist_lt.val, mnist_lt.test):
        assert torch.equal(part.groups, tiers[part.y])


def test_mnist_lt_is_deterministic_and_keeps_mnist_ids(mnist_lt, mnist):
    again = data.load("mnist_lt", val_size=500, seed=1)  # another validation split
    ids = lambda s: sorted(torch.cat([s.train.index, s.val.index]).tolist())  # noqa: E731
    assert ids(again) == ids(mnist_lt)
    picked = mnist_lt.train.index[:50]
    assert torch.equal(mnist.train.y[picked], mnist_lt.train.y[:50])


def test_colored_mnist_correlates_colour_and_label_in_training_only(colored):
    assert colored.classes == ("0-4", "5-9") and colored.input_shape == (2, 28, 28)
    assert colored.group_names == ("red", "green")
    train_agree = (colored.train.groups == colored.train.y).double().mean().item()
    test_agree = (colored.test.groups == colored.test.y).double().mean().item()
    assert abs(train_agree - 0.9) < 0.01 and abs(test_agree - 0.5) < 0.02


def test_colored_mnist_draws_each_digit_in_its_colour(colored, mnist):
    pixels = colored.unnormalise(colored.test.x[:200])
    ink = pixels.flatten(2).sum(dim=2)  # [n, 2]: ink per channel
    colour = colored.test.groups[:200]
    assert torch.all(ink[torch.arange(200), colour] > 1.0)
    assert torch.all(ink[torch.arange(200), 1 - colour] < 1e-3)
    digits = mnist.test.y[colored.test.index[:200]]
    assert torch.equal(colored.test.y[:200], (digits >= 5).long())


def test_colored_mnist_groups_do_not_depend_on_the_run_seed(colored):
    other = data.load("colored_mnist", val_size=1000, seed=3)  # another validation split
    assert torch.equal(other.test.groups, colored.test.groups)
    mine, theirs = torch.full((60_000,), -1), torch.full((60_000,), -1)
    mine[colored.train.index] = colored.train.groups
    theirs[other.train.index] = other.train.groups
    both = (mine >= 0) & (theirs >= 0)
    assert both.sum() > 50_000 and torch.equal(mine[both], theirs[both])


def test_subset_groups_are_optional_and_checked():
    x = torch.zeros(3, 1, 2, 2)
    y = torch.tensor([0, 1, 1])
    plain = data.Subset(x, y, torch.arange(3))
    assert plain.groups is None and plain.select(torch.tensor([0])).groups is None
    grouped = data.Subset(x, y, torch.arange(3), torch.tensor([1, 0, 1]))
    assert grouped.select(torch.tensor([2, 1])).groups.tolist() == [1, 0]
    with pytest.raises(DataError, match="Subset.groups must be int64"):
        data.Subset(x, y, torch.arange(3), torch.tensor([1, 0]))
