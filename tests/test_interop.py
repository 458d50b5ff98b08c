"""Tests of prunescope.interop: models still carrying torch.nn.utils.prune's reparametrisation
(``weight_orig`` + ``weight_mask`` + forward pre-hook) are accepted everywhere a model is."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import prunescope
from prunescope.interop import fold_torch_prune, torch_pruned
from prunescope.mask import Mask
from prunescope.sparsifier import MaskHold


@pytest.fixture
def lenet() -> nn.Module:
    torch.manual_seed(0)
    return prunescope.models.build("lenet300")


def torch_pruned_copy(model: nn.Module, mask: Mask) -> nn.Module:
    """The README flow: a prunescope mask installed with torch's reparametrisation."""
    pruned = copy.deepcopy(model)
    mask.to_torch_prune(pruned)
    return pruned


def test_torch_pruned_lists_the_reparametrised_tensors(lenet: nn.Module) -> None:
    assert torch_pruned(lenet) == {}
    torch_prune.l1_unstructured(lenet.classifier[0], "weight", amount=0.5)
    found = torch_pruned(lenet)
    assert list(found) == ["classifier.0.weight"]
    assert found["classifier.0.weight"] == (lenet.classifier[0], "weight")


def test_effective_sparsity_reads_a_torch_pruned_model_without_changing_it(lenet: nn.Module
                                                                           ) -> None:
    mask = prunescope.prune(lenet, "magnitude", "global", 0.9)
    expected = prunescope.effective_sparsity(lenet, mask)
    pruned = torch_pruned_copy(lenet, mask)
    keys = set(pruned.state_dict())
    assert prunescope.effective_sparsity(pruned, mask) == expected
    assert set(pruned.state_dict()) == keys  # still reparametrised: nothing was folded
    assert torch_pruned(pruned)


def test_mask_from_weights_reads_orig_times_mask(lenet: nn.Module) -> None:
    mask = prunescope.prune(copy.deepcopy(lenet), "random", "uniform", 0.5)
    pruned = torch_pruned_copy(lenet, mask)  # dense weight_orig, zeros only through the buffers
    assert Mask.from_weights(pruned).equal(mask)
    assert torch_pruned(pruned)


def test_prune_folds_keeps_torch_pruned_weights_and_logs(lenet: nn.Module,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    held = prunescope.prune(copy.deepcopy(lenet), "random", "uniform", 0.5)
    pruned = torch_pruned_copy(lenet, held)
    with caplog.at_level(logging.INFO, logger="prunescope"):
        mask = prunescope.prune(pruned, "magnitude", "global", 0.9)
    assert torch_pruned(pruned) == {}
    assert set(pruned.state_dict()) == set(lenet.state_dict())
    assert mask.sparsity == pytest.approx(0.9, abs=1e-5)
    assert all(not (mask[n] & ~held[n]).any() for n in mask)  # pruned weights stay pruned
    nonzero = Mask.from_weights(pruned, list(mask))
    assert all(not (nonzero[n] & ~mask[n]).any() for n in mask)  # the model is pruned by it
    assert sum("torch.nn.utils.prune" in r.getMessage() for r in caplog.records) == 1


def test_mask_hold_trains_a_torch_pruned_model(lenet: nn.Module) -> None:
    mask = prunescope.prune(copy.deepcopy(lenet), "magnitude", "global", 0.8)
    pruned = torch_pruned_copy(lenet, mask)
    hold = MaskHold(mask)
    optimizer = torch.optim.SGD(pruned.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    hold.hold_(pruned)
    for step in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(pruned(x), y).backward()
        hold.before_optimizer_step(pruned, step)
        optimizer.step()
        hold.after_optimizer_step(pruned, step)
    orig = pruned.classifier[0].weight_orig
    assert torch.all(orig[~mask["classifier.0.weight"]] == 0)
    assert orig.grad is not None


def test_mask_resolves_a_torch_pruned_name_to_weight_orig(lenet: nn.Module) -> None:
    mask = Mask.ones(lenet)
    mask.to_torch_prune(lenet)
    params = mask.resolve(lenet)
    assert params["classifier.0.weight"] is lenet.classifier[0].weight_orig


def test_fold_torch_prune_makes_it_permanent_and_returns_the_mask(lenet: nn.Module) -> None:
    assert fold_torch_prune(lenet) is None
    mask = prunescope.prune(copy.deepcopy(lenet), "random", "global", 0.7)
    pruned = torch_pruned_copy(lenet, mask)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = pruned(x)
    folded = fold_torch_prune(pruned)
    assert folded is not None and folded.equal(mask)
    assert torch_pruned(pruned) == {} and not pruned._forward_pre_hooks
    assert set(pruned.state_dict()) == set(lenet.state_dict())
    with torch.no_grad():
        assert torch.equal(pruned(x), before)
    assert fold_torch_prune(pruned) is None
