"""Tests of prunescope.spade: trace, maps, AUC, report and ``prunescope explain``."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from prunescope import checkpoint, models
from prunescope.cli import main
from prunescope.errors import ConfigError, PruningError
from prunescope.spade import (
    Augmentations,
    SpadeConfig,
    explain,
    localisation_auc,
    trace,
    write_report,
)

FAST = SpadeConfig(sparsity=0.9, augmentations=Augmentations(count=16))


@pytest.fixture
def digits_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build("lenet300", num_classes=10, in_channels=1, image_size=8)


def image(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_explain_leaves_the_model_untouched_and_maps_have_the_input_shape(digits_model) -> None:
    digits_model.train()
    before = copy.deepcopy(digits_model.state_dict())
    x = image()
    explanation = explain(digits_model, x, config=FAST)
    assert digits_model.training
    assert all(torch.equal(before[k], v) for k, v in digits_model.state_dict().items())
    assert all(p.grad is None for p in digits_model.parameters())
    for maps in explanation.maps.values():
        assert maps["original"].shape == maps["spade"].shape == x.shape
        assert torch.isfinite(maps["spade"]).all()
    assert set(explanation.maps) == {"gradient", "integrated_gradients", "input_x_gradient",
                                     "guided_backprop", "smoothgrad"}
    with torch.no_grad():
        assert explanation.target == int(digits_model.eval()(x.unsqueeze(0)).argmax())


def test_the_trace_prunes_every_layer_but_the_output_layer(digits_model) -> None:
    pruned, mask = trace(digits_model, image(), FAST)
    assert list(mask) == ["classifier.0.weight", "classifier.2.weight"]
    assert all(s == pytest.approx(0.9, abs=1e-3) for s in mask.sparsities().values())
    assert torch.equal(pruned.classifier[4].weight, digits_model.classifier[4].weight)
    assert all(torch.all(pruned.get_parameter(n)[~k] == 0) for n, k in mask.items())


def test_the_trace_reproduces_the_networks_output_on_its_batch(digits_model) -> None:
    x = image(1)
    pruned, _ = trace(digits_model, x, SpadeConfig(sparsity=0.5, augmentations=Augmentations(16)))
    with torch.no_grad():
        dense, sparse = digits_model.eval()(x[None]), pruned(x[None])
    assert torch.allclose(dense, sparse, rtol=0.05, atol=0.05)


def test_a_wrong_input_shape_is_one_clear_error(digits_model) -> None:
    with pytest.raises(ConfigError, match=r"shape \[1, 7, 8\] but the model expects \[1, 8, 8\]"):
        explain(digits_model, torch.zeros(1, 7, 8), config=FAST)


def test_a_sparsity_that_empties_a_layer_is_refused(digits_model) -> None:
    with pytest.raises(PruningError, match="keeps no weight of 'classifier.0.weight'"):
        trace(digits_model, image(), SpadeConfig(sparsity=0.99999))


def test_augmentations_start_with_the_image_and_are_seeded() -> None:
    x = image()
    augment = Augmentations(count=8, noise=0.1)
    first = augment(x, torch.Generator().manual_seed(3))
    assert first.shape == (8, 1, 8, 8) and torch.equal(first[0], x)
    assert torch.equal(first, augment(x, torch.Generator().manual_seed(3)))
    still = Augmentations(count=4, shift=0, rotate=0, scale=0)(x, torch.Generator())
    torch.testing.assert_close(still, x.expand(4, 1, 8, 8), atol=1e-5, rtol=0)


def test_localisation_auc_by_hand_and_against_sklearn() -> None:
    evidence = torch.tensor([[True, False], [False, False]])
    assert localisation_auc(torch.tensor([[[3.0, 1.0], [2.0, 0.5]]]), evidence) == 1.0
    assert localisation_auc(torch.tensor([[[0.1, 1.0], [2.0, 0.5]]]), evidence) == 0.0
    assert localisation_auc(torch.ones(1, 2, 2), evidence) == 0.5
    assert localisation_auc(torch.tensor([[[-3.0, 1.0], [-3.0, 0.5]]]), evidence) == 5 / 6
    generator = torch.Generator().manual_seed(0)
    saliency = torch.randint(0, 5, (3, 6, 6), generator=generator).float()
    mask = torch.rand(6, 6, generator=generator) < 0.3
    expected = roc_auc_score(mask.flatten().numpy(), saliency.abs().sum(0).flatten().numpy())
    assert localisation_auc(saliency, mask) == pytest.approx(expected)
    with pytest.raises(ConfigError):
        localisation_auc(saliency, torch.zeros(6, 6, dtype=torch.bool))


def test_the_report_writes_pngs_and_a_page(digits_model, tmp_path) -> None:
    explanation = explain(digits_model, image(), methods=("gradient",), config=FAST)
    page = write_report(explanation, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"index.html", "input.png", "overview.png", "gradient-original.png",
            "gradient-spade.png", "explanation.json"} <= names
    assert 'src="gradient-spade.png"' in page.read_text()
    assert json.loads((tmp_path / "explanation.json").read_text())["methods"] == ["gradient"]


@pytest.fixture
def digits_checkpoint(digits_model, tmp_path):
    path = tmp_path / "model.safetensors"
    checkpoint.save(path, digits_model, meta={
        "model": checkpoint.model_spec(digits_model, 10),
        "data": {"name": "digits", "root": None, "val_size": 100, "seed": 0}})
    return path


def test_explain_command_writes_the_page(digits_checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "explained"
    code = main(["explain", "--checkpoint", str(digits_checkpoint), "--input", "test:3",
                 "--out", str(out), "--methods", "gradient", "integrated_gradients",
                 "--augmentations", "16"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["input"].startswith("test example 3") and (out / "index.html").is_file()
    assert result["trace_sparsity"] == pytest.approx(SpadeConfig().sparsity, abs=1e-3)


@pytest.mark.parametrize(("make_input", "sparsity", "message"), [
    (lambda d: np.save(d / "x.npy", np.zeros((7, 8), np.float32)) or d / "x.npy", None,
     "shape [1, 7, 8] but the model expects [1, 8, 8]"),
    (lambda d: "test:0", "0.99999", "keeps no weight"),
    (lambda d: "test:99999", None, "the test split has"),
])
def test_explain_command_bad_input_is_one_line_and_exit_2(digits_checkpoint, tmp_path, capsys,
                                                          make_input, sparsity, message) -> None:
    args = ["explain", "--checkpoint", str(digits_checkpoint), "--input",
            str(make_input(tmp_path)), "--out", str(tmp_path / "x")]
    code = main(args + (["--sparsity", sparsity] if sparsity else []))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_image_inputs_are_mapped_to_the_model_channels():
    from prunescope.spade.command import _match_channels

    rgba = torch.rand(4, 5, 5)
    assert torch.equal(_match_channels(rgba, 3), rgba[:3])  # alpha dropped, colour kept
    rgb = torch.rand(3, 5, 5)
    assert torch.equal(_match_channels(rgb, 2), rgb[:2])  # Colored MNIST: red and green
    assert torch.allclose(_match_channels(rgb, 1), rgb.mean(0, keepdim=True))
    assert _match_channels(torch.rand(1, 5, 5), 3).shape == (3, 5, 5)


def test_two_channel_pictures_are_drawable():
    from prunescope.spade.report import _picture

    picture = _picture(torch.rand(2, 6, 6), lambda x: x)
    assert picture.shape == (6, 6, 3) and torch.all(picture[..., 2] == 0)
