"""Fixed-mask training on the sparse kernels (``sparse_kernels`` in fit, recipes and the CLI):
the same weights as the masked dense run, plain layers afterwards, the layer choice saved and
reused on resume, and a clear refusal where the mask is not fixed."""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_helpers import tiny_mlp, tiny_splits
from torch import nn

from prunescope import checkpoint, recipe
from prunescope.errors import ConfigError
from prunescope.kernels import backend, swap
from prunescope.kernels.training import PLAN
from prunescope.mask import Mask
from prunescope.schedules import OneShot
from prunescope.sparsifier import MaskHold, ScheduledPruning
from prunescope.train import TrainConfig, fit

CONFIG = TrainConfig(epochs=2, batch_size=16, lr=0.05, lr_schedule="constant",
                     weight_decay=1e-3)


def half_mask(model: nn.Module) -> Mask:
    generator = torch.Generator().manual_seed(3)
    return Mask({name: torch.rand(p.shape, generator=generator) < 0.5
                 for name, p in model.named_parameters() if name.endswith("weight")})


@pytest.fixture
def sparse_faster(monkeypatch):
    """Every layer measures faster sparse (the choice is then the kernels', not the clock's)."""
    if not backend().fast:
        pytest.skip("no fast kernels on this machine")
    monkeypatch.setattr(swap, "_time_pair", lambda *args: (1.0, 0.1))


def train(tmp_path, name: str, *, sparse: bool, epochs: int = 2) -> tuple[nn.Module, dict]:
    model = tiny_mlp()
    config = TrainConfig(**{**CONFIG.__dict__, "epochs": epochs, "sparse_kernels": sparse})
    record = fit(model, tiny_splits(), config, tmp_path / name, hook=MaskHold(half_mask(model)))
    return model, record


def assert_states_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        scale = max(b[key].abs().max().item(), 1e-12)
        assert (a[key] - b[key]).abs().max().item() <= 1e-5 * scale, key


def test_fine_tuning_on_sparse_layers_matches_the_masked_dense_run(tmp_path, sparse_faster):
    dense, dense_record = train(tmp_path, "dense", sparse=False)
    sparse, sparse_record = train(tmp_path, "sparse", sparse=True)
    assert all(type(m) in (nn.Flatten, nn.Linear, nn.ReLU) for m in sparse)  # plain again
    assert_states_close(sparse.state_dict(), dense.state_dict())
    assert sparse_record["sparsity"] == dense_record["sparsity"]
    plan = json.loads((tmp_path / "sparse" / PLAN).read_text())
    assert plan["sparse_layers"] == ["1", "3"] and "sparse (faster)" in plan["table"]
    saved = checkpoint.load(tmp_path / "sparse" / "model.safetensors")
    assert saved.mask.equal(half_mask(tiny_mlp()))
    for name, keep in saved.mask.items():
        assert torch.count_nonzero(saved.model[name][~keep]) == 0


def test_a_resumed_run_swaps_the_layers_it_started_with(tmp_path, sparse_faster, monkeypatch):
    whole, _ = train(tmp_path, "whole", sparse=True)
    train(tmp_path, "resumed", sparse=True, epochs=1)
    monkeypatch.setattr(swap, "_time_pair", lambda *args: (0.1, 1.0))  # now sparse "slower"
    resumed, _ = train(tmp_path, "resumed", sparse=True)  # the optimizer state fits only the plan
    assert_states_close(resumed.state_dict(), whole.state_dict())
    assert json.loads((tmp_path / "resumed" / PLAN).read_text())["sparse_layers"] == ["1", "3"]


def test_layers_measured_slower_stay_dense_and_keep_their_mask(tmp_path, monkeypatch):
    monkeypatch.setattr(swap, "_time_pair", lambda *args: (0.1, 1.0))
    dense, _ = train(tmp_path, "dense", sparse=False)
    kept, _ = train(tmp_path, "kept", sparse=True)
    assert json.loads((tmp_path / "kept" / PLAN).read_text())["sparse_layers"] == []
    assert_states_close(kept.state_dict(), dense.state_dict())


@pytest.mark.parametrize("hook", [None, "scheduled", "empty"])
def test_sparse_kernels_need_a_fixed_mask(tmp_path, hook):
    model = tiny_mlp()
    hooks = {None: None, "empty": MaskHold(None),
             "scheduled": ScheduledPruning(OneShot(0.5, step=0))}
    config = TrainConfig(**{**CONFIG.__dict__, "sparse_kernels": True})
    with pytest.raises(ConfigError, match="fixed mask"):
        fit(model, tiny_splits(), config, tmp_path / "run", hook=hooks[hook])
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_recipes_take_sparse_kernels_for_fine_tuning_only():
    base = {"data": {"name": "digits"}, "model": {"name": "lenet300"},
            "prune": {"sparsities": [0.9], "methods": [{"criterion": "magnitude"}]}}
    accepted = recipe.from_dict({**base, "finetune": {"epochs": 1, "sparse_kernels": True}})
    assert accepted.finetune.sparse_kernels is True
    with pytest.raises(ConfigError, match="finetune.sparse_kernels"):
        recipe.from_dict({**base, "train": {"sparse_kernels": True}})
