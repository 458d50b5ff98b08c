"""Sparse transfer (``prunescope transfer``): what fits keeps its weights and mask, the rest
starts afresh and trains dense, bad input ends in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pipeline_helpers import assert_user_error, cli, files_under

from prunescope import checkpoint, models
from prunescope.commands import evaluate_checkpoint, transfer_checkpoint
from prunescope.errors import ConfigError
from prunescope.kernels.build import backend
from prunescope.kernels.training import PLAN
from prunescope.mask import Mask
from prunescope.sparsifier import prune

DIGITS = {"name": "digits", "root": None, "val_size": 100, "seed": 0}


def _source(path: Path, *, num_classes: int = 3, image_size: int = 8,
            layers: tuple[str, ...] = ("classifier.0.weight", "classifier.2.weight",
                                       "classifier.4.weight")) -> tuple[Path, Mask]:
    """A 80%-sparse lenet300 checkpoint for ``num_classes`` classes (digits' 10 do not fit)."""
    torch.manual_seed(1)
    model = models.build("lenet300", num_classes=num_classes, in_channels=1,
                         image_size=image_size)
    mask = prune(model, "magnitude", "uniform", 0.8)
    mask = Mask({name: mask[name] for name in layers})
    checkpoint.save(path, model, meta={"model": checkpoint.model_spec(model, num_classes),
                                       "data": DIGITS}, mask=mask)
    return path, mask


def test_transfer_keeps_the_mask_of_what_fits_and_trains_a_new_head(tmp_path):
    source, mask = _source(tmp_path / "source.safetensors")
    before = checkpoint.load(source).model
    result = transfer_checkpoint(source, "digits", tmp_path / "out", epochs=1, lr=0.05)
    assert result["reinitialised"] == ["classifier.4.bias", "classifier.4.weight"]
    assert result["transferred"] == 4
    saved = checkpoint.load(tmp_path / "out" / "model.safetensors")
    assert saved.mask.keys() == {"classifier.0.weight", "classifier.2.weight"}
    for name in saved.mask:
        assert torch.equal(saved.mask[name], mask[name])
        weight = saved.model[name]
        assert torch.all(weight[~mask[name]] == 0)  # held through training
        assert not torch.equal(weight[mask[name]], before[name][mask[name]])  # and trained
    head = saved.model["classifier.4.weight"]
    assert head.shape == (10, 100) and bool((head != 0).all())  # the new head is dense
    assert saved.meta["model"]["num_classes"] == 10
    assert saved.meta["method"]["transfer_from"] == str(source)
    assert json.loads((tmp_path / "out" / "result.json").read_text())["dataset"] == "digits"
    evaluated = evaluate_checkpoint(tmp_path / "out" / "model.safetensors")
    assert evaluated["accuracy"] == pytest.approx(result["accuracy"])
    assert evaluated["sparsity"] == pytest.approx(mask.sparsity, abs=0.02)


def test_transfer_on_the_sparse_kernels_holds_the_same_mask(tmp_path):
    if not backend().fast:
        pytest.skip("no fast kernels on this machine")
    source, mask = _source(tmp_path / "source.safetensors")
    transfer_checkpoint(source, "digits", tmp_path / "out", epochs=1, sparse_kernels=True)
    assert (tmp_path / "out" / PLAN).exists()
    saved = checkpoint.load(tmp_path / "out" / "model.safetensors")
    for name in saved.mask:
        assert torch.all(saved.model[name][~mask[name]] == 0)


def test_transfer_refuses_when_no_pruned_layer_fits(tmp_path):
    source, _ = _source(tmp_path / "source.safetensors", image_size=10,
                        layers=("classifier.0.weight",))
    with pytest.raises(ConfigError, match="none of the pruned layers"):
        transfer_checkpoint(source, "digits", tmp_path / "out", epochs=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("options", "word"), [
    (("--dataset", "imagenet"), "imagenet"),
    (("--dataset", "digits", "--epochs", "0"), "--epochs"),
    (("--dataset", "digits", "--lr", "-1"), "lr"),
])
def test_transfer_command_refuses_bad_options_and_writes_nothing(tmp_path, capsys, options,
                                                                  word):
    source, _ = _source(tmp_path / "source.safetensors")
    code, _, err = cli(capsys, "transfer", "--checkpoint", str(source), *options,
                       "--out", str(tmp_path / "out"))
    assert word in assert_user_error(code, err)
    assert files_under(tmp_path) == ["source.safetensors"]


def test_transfer_command_refuses_a_missing_checkpoint(tmp_path, capsys):
    code, _, err = cli(capsys, "transfer", "--checkpoint", str(tmp_path / "nope.safetensors"),
                       "--dataset", "digits", "--out", str(tmp_path / "out"))
    assert "nope.safetensors" in assert_user_error(code, err)
    assert not (tmp_path / "out").exists()


def test_transfer_command_prints_the_result(tmp_path, capsys):
    source, _ = _source(tmp_path / "source.safetensors")
    code, stdout, _ = cli(capsys, "transfer", "--checkpoint", str(source), "--dataset", "digits",
                          "--epochs", "1", "--out", str(tmp_path / "out"), "--no-progress")
    assert code == 0
    printed = json.loads(stdout)
    assert printed["reinitialised"] == ["classifier.4.bias", "classifier.4.weight"]
    assert 0.0 <= printed["accuracy"] <= 1.0


def test_a_layer_that_does_not_fit_starts_afresh_with_its_bias(tmp_path):
    """An input layer for another image size: its weight does not fit, so its bias (which
    would) is not copied either: the layer is one unit."""
    source, _ = _source(tmp_path / "source.safetensors", num_classes=10, image_size=10)
    result = transfer_checkpoint(source, "digits", tmp_path / "out", epochs=1)
    assert result["reinitialised"] == ["classifier.0.bias", "classifier.0.weight"]
    saved = checkpoint.load(tmp_path / "out" / "model.safetensors")
    assert saved.mask.keys() == {"classifier.2.weight", "classifier.4.weight"}
