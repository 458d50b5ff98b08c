"""The training loop: learning-rate schedules, config checks, checkpoints, resume, NaN."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pipeline_helpers import digits, lenet, state_equal, tiny_mlp, tiny_splits
from torch import nn

from prunescope import checkpoint, train
from prunescope.errors import ConfigError, TrainingError
from prunescope.files import read_jsonl
from prunescope.mask import Mask
from prunescope.sparsifier import MaskHold, prune
from prunescope.train import FINAL, LAST, METRICS, TrainConfig, _Loop, fit, lr_at

FAST = {"batch_size": 64, "lr": 0.1}


def _losses(records: list[dict]) -> list[tuple]:
    """What must match between two runs: everything but the wall-clock time."""
    return [tuple(sorted((k, v) for k, v in r.items() if k != "seconds")) for r in records]


def _magnitude_mask(model: nn.Module, sparsity: float = 0.7) -> Mask:
    """A per-layer magnitude mask of ``model``, computed on a copy (``model`` stays dense)."""
    copy = lenet()
    copy.load_state_dict(model.state_dict())
    return prune(copy, "magnitude", "uniform", sparsity)


# -- learning-rate schedules -----------------------------------------------------------------

def test_constant_lr_never_changes():
    config = TrainConfig(epochs=3, lr=0.05, lr_schedule="constant")
    assert [lr_at(config, s, 10) for s in (0, 7, 15, 29, 30)] == [0.05] * 5


def test_step_lr_drops_by_gamma_at_each_milestone_epoch():
    config = TrainConfig(epochs=10, lr=0.1, lr_schedule="step", milestones=(3, 6), gamma=0.1)
    steps_per_epoch = 5
    assert lr_at(config, 0, steps_per_epoch) == pytest.approx(0.1)
    assert lr_at(config, 14, steps_per_epoch) == pytest.approx(0.1)  # last step of epoch 2
    assert lr_at(config, 15, steps_per_epoch) == pytest.approx(0.01)  # first step of epoch 3
    assert lr_at(config, 29, steps_per_epoch) == pytest.approx(0.01)
    assert lr_at(config, 30, steps_per_epoch) == pytest.approx(0.001)
    assert lr_at(config, 49, steps_per_epoch) == pytest.approx(0.001)


def test_cosine_lr_starts_at_lr_halves_midway_and_ends_at_zero():
    config = TrainConfig(epochs=2, lr=0.2, lr_schedule="cosine")
    assert lr_at(config, 0, 10) == pytest.approx(0.2)
    assert lr_at(config, 5, 10) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(config, 10, 10) == pytest.approx(0.1)
    assert lr_at(config, 20, 10) == pytest.approx(0.0, abs=1e-12)


def test_onecycle_warms_up_from_lr_over_25_peaks_at_30_percent_and_anneals():
    config = TrainConfig(epochs=10, lr=0.5, lr_schedule="onecycle")
    lrs = [lr_at(config, s, 10) for s in range(101)]
    assert lrs[0] == pytest.approx(0.5 / 25)
    assert lrs[30] == pytest.approx(0.5)
    assert max(lrs) == pytest.approx(0.5) and lrs.index(max(lrs)) == 30
    assert lrs[100] == pytest.approx(0.5 / 25 / 1e4)
    assert all(a <= b for a, b in zip(lrs[:31], lrs[1:31], strict=False))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[30:], lrs[31:], strict=False))  # then falls


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_make_optimizer_uses_the_fused_form_and_updates_as_the_plain_loop(optimizer):
    config = TrainConfig(optimizer=optimizer, lr=0.05, weight_decay=1e-3)
    fused_model, plain_model = tiny_mlp(), tiny_mlp()
    plain_model.load_state_dict(fused_model.state_dict())
    fused = train.make_optimizer(fused_model, config)
    assert fused.defaults["fused"]
    plain = (torch.optim.AdamW(plain_model.parameters(), lr=0.05, weight_decay=1e-3,
                               foreach=False) if optimizer == "adamw" else
             torch.optim.SGD(plain_model.parameters(), lr=0.05, momentum=config.momentum,
                             nesterov=True, weight_decay=1e-3, foreach=False))
    for step in range(4):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [
    {"optimizer": "adam"}, {"lr": 0}, {"lr": -0.1}, {"lr": math.inf}, {"lr": math.nan},
    {"epochs": -1}, {"batch_size": 0}, {"label_smoothing": 1.0}, {"label_smoothing": -0.1},
    {"lr_schedule": "triangle"}, {"momentum": 1.0}, {"weight_decay": -1e-4},
])
def test_train_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError) as exc:
        TrainConfig(**bad)
    assert "\n" not in str(exc.value)


def test_train_config_error_names_the_bad_field():
    with pytest.raises(ConfigError, match="label_smoothing"):
        TrainConfig(label_smoothing=1.0)
    with pytest.raises(ConfigError, match="sgd, adamw"):
        TrainConfig(optimizer="adam")


# -- fit: files --------------------------------------------------------------------------------

def test_fit_writes_checkpoints_and_one_metrics_line_per_epoch(tmp_path):
    model = lenet()
    record = fit(model, digits(), TrainConfig(epochs=2, **FAST), tmp_path, progress=False)
    assert (tmp_path / LAST).is_file() and (tmp_path / FINAL).is_file()
    records = read_jsonl(tmp_path / METRICS)
    assert [r["epoch"] for r in records] == [0, 1]
    assert {**records[-1], "resumed_seconds": 0.0} == record
    assert 0 <= record["val_accuracy"] <= 1 and record["val_accuracy"] > 0.5  # it learns
    final = checkpoint.load(tmp_path / FINAL)
    assert state_equal(final.model, model.state_dict())
    assert final.optimizer is None and final.meta["epoch"] == 2
    last = checkpoint.load(tmp_path / LAST)
    assert last.optimizer is not None and set(last.rng) == {"torch", "loader"}


def test_fit_stores_the_callers_meta_in_every_checkpoint(tmp_path):
    meta = {"model": checkpoint.model_spec(lenet(), 10), "data": {"name": "digits"}}
    fit(lenet(), digits(), TrainConfig(epochs=1, **FAST), tmp_path, meta=meta, progress=False)
    for name in (LAST, FINAL):
        stored = checkpoint.load(tmp_path / name).meta
        assert stored["model"] == meta["model"] and stored["data"] == meta["data"]


@pytest.mark.parametrize("epochs", [0, -3])
def test_training_for_no_epoch_is_refused(epochs):
    # issue 15: train.epochs: 0 ran and reported chance accuracy with exit 0
    with pytest.raises(ConfigError, match="train.epochs must be positive"):
        TrainConfig(epochs=epochs)


def test_fit_refuses_an_empty_training_set(tmp_path):
    splits = tiny_splits(n_train=0)
    with pytest.raises(ConfigError, match="empty"):
        fit(tiny_mlp(), splits, TrainConfig(epochs=1), tmp_path, progress=False)


# -- fit: determinism and resume -----------------------------------------------------------------

def test_two_runs_with_the_same_seed_are_identical(tmp_path):
    config = TrainConfig(epochs=2, **FAST)
    a, b = lenet(), lenet()
    fit(a, digits(), config, tmp_path / "a", seed=7, progress=False)
    fit(b, digits(), config, tmp_path / "b", seed=7, progress=False)
    assert state_equal(a.state_dict(), b.state_dict())
    assert _losses(read_jsonl(tmp_path / "a" / METRICS)) == _losses(
        read_jsonl(tmp_path / "b" / METRICS))


def test_runs_with_different_seeds_differ(tmp_path):
    config = TrainConfig(epochs=1, **FAST)
    a, b = lenet(), lenet()
    fit(a, digits(), config, tmp_path / "a", seed=1, progress=False)
    fit(b, digits(), config, tmp_path / "b", seed=2, progress=False)
    assert not state_equal(a.state_dict(), b.state_dict())


def _interrupt_after_checkpoint(monkeypatch, epoch: int) -> None:
    """Kill the run right after the checkpoint at the end of (0-based) ``epoch`` is written."""
    original = _Loop._save

    def save_then_die(self, path, *, with_state):
        original(self, path, with_state=with_state)
        if path.name == LAST and self.epoch == epoch + 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(_Loop, "_save", save_then_die)


def _interrupt_mid_epoch(monkeypatch, step: int) -> None:
    """Kill the run in the middle of an epoch, before optimizer step ``step``."""
    original = _Loop._step

    def step_or_die(self, inputs, targets, epoch):
        if self.step == step:
            raise KeyboardInterrupt
        return original(self, inputs, targets, epoch)

    monkeypatch.setattr(_Loop, "_step", step_or_die)


def _interrupt_metrics_write(monkeypatch, call: int, torn: bool = False) -> None:
    """Make the ``call``-th metrics append (1-based) fail, after half a line when ``torn``."""
    original, calls = train.append_jsonl, []

    def append_or_die(path, record):
        calls.append(record)
        if len(calls) == call:
            if torn:
                with open(path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record)[:20])
                raise KeyboardInterrupt
            raise OSError("disk full")
        return original(path, record)

    monkeypatch.setattr(train, "append_jsonl", append_or_die)


INTERRUPTIONS = {
    "after epoch 2 checkpoint": lambda mp: _interrupt_after_checkpoint(mp, epoch=1),
    "after epoch 1 checkpoint": lambda mp: _interrupt_after_checkpoint(mp, epoch=0),
    "mid epoch 2": lambda mp: _interrupt_mid_epoch(mp, step=len(digits().train) // 64 + 5),
    "second metrics line": lambda mp: _interrupt_metrics_write(mp, call=2),
    "torn third metrics line": lambda mp: _interrupt_metrics_write(mp, call=3, torn=True),
}


def _resume_config(optimizer: str) -> TrainConfig:
    return TrainConfig(epochs=3, optimizer=optimizer, batch_size=64,
                       lr=0.1 if optimizer == "sgd" else 0.003, weight_decay=1e-3)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``get(optimizer)``: the directory and model of a 3-epoch run done in one go (cached)."""
    runs = {}

    def get(optimizer: str):
        if optimizer not in runs:
            run_dir, model = tmp_path_factory.mktemp(f"whole-{optimizer}"), lenet()
            fit(model, digits(), _resume_config(optimizer), run_dir, seed=3, progress=False)
            runs[optimizer] = run_dir, model
        return runs[optimizer]

    return get


@pytest.mark.parametrize(("interruption", "optimizer"), [
    *[(name, "sgd") for name in INTERRUPTIONS], ("mid epoch 2", "adamw"),
    ("after epoch 2 checkpoint", "adamw"),
])
def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch, uninterrupted,
                                              interruption, optimizer):
    config = _resume_config(optimizer)
    whole_dir, whole = uninterrupted(optimizer)

    with monkeypatch.context() as patch:
        INTERRUPTIONS[interruption](patch)
        with pytest.raises((KeyboardInterrupt, OSError)):
            fit(lenet(), digits(), config, tmp_path, seed=3, progress=False)
    assert not (tmp_path / FINAL).exists()
    resumed = lenet()
    fit(resumed, digits(), config, tmp_path, seed=3, progress=False)

    assert state_equal(resumed.state_dict(), whole.state_dict())
    assert state_equal(checkpoint.load(tmp_path / FINAL).model,
                       checkpoint.load(whole_dir / FINAL).model)
    records = read_jsonl(tmp_path / METRICS)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert _losses(records) == _losses(read_jsonl(whole_dir / METRICS))


def test_resumed_run_with_a_held_mask_equals_uninterrupted_run(tmp_path, monkeypatch):
    config = TrainConfig(epochs=3, **FAST, weight_decay=1e-3)
    start = lenet()
    mask = _magnitude_mask(start)

    whole = lenet()
    whole_hook = MaskHold(mask)
    fit(whole, digits(), config, tmp_path / "a", hook=whole_hook, progress=False)

    with monkeypatch.context() as patch:
        _interrupt_mid_epoch(patch, step=len(digits().train) // 64 + 3)
        with pytest.raises(KeyboardInterrupt):
            fit(lenet(), digits(), config, tmp_path / "b", hook=MaskHold(mask), progress=False)
    resumed, resumed_hook = lenet(), MaskHold(mask)
    fit(resumed, digits(), config, tmp_path / "b", hook=resumed_hook, progress=False)

    assert state_equal(resumed.state_dict(), whole.state_dict())
    assert resumed_hook.mask.equal(whole_hook.mask) and resumed_hook.mask.equal(mask)
    params = dict(resumed.named_parameters())
    for name, keep in mask.items():
        assert torch.count_nonzero(params[name][~keep]) == 0
    saved = checkpoint.load(tmp_path / "b" / FINAL)
    assert saved.mask is not None and saved.mask.equal(mask)
    assert _losses(read_jsonl(tmp_path / "b" / METRICS)) == _losses(
        read_jsonl(tmp_path / "a" / METRICS))


def test_finished_run_is_not_trained_again(tmp_path, monkeypatch):
    config = TrainConfig(epochs=2, **FAST)
    first = lenet()
    record = fit(first, digits(), config, tmp_path, progress=False)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(_Loop, "train_epoch", no_training)
    again = lenet(seed=99)
    resumed = fit(again, digits(), config, tmp_path, progress=False)
    assert resumed == {**record, "resumed_seconds": pytest.approx(
        sum(r["seconds"] for r in read_jsonl(tmp_path / METRICS)))}
    assert state_equal(again.state_dict(), first.state_dict())
    assert [r["epoch"] for r in read_jsonl(tmp_path / METRICS)] == [0, 1]


# -- fit: masks ------------------------------------------------------------------------------------

def test_masked_weights_stay_exactly_zero_with_momentum_and_weight_decay(tmp_path):
    model = lenet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = _magnitude_mask(model, sparsity=0.8)
    config = TrainConfig(epochs=2, batch_size=64, lr=0.1, momentum=0.9, nesterov=True,
                         weight_decay=0.05)
    record = fit(model, digits(), config, tmp_path, hook=MaskHold(mask), progress=False)

    params = dict(model.named_parameters())
    saved = checkpoint.load(tmp_path / FINAL)
    for name, keep in mask.items():
        assert torch.count_nonzero(params[name][~keep]) == 0
        assert torch.count_nonzero(saved.model[name][~keep]) == 0
        assert not torch.equal(params[name][keep], before[name][keep])  # the rest trained
    assert record["sparsity"] == pytest.approx(mask.sparsity)


# -- fit: divergence -------------------------------------------------------------------------------

class _NaNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)) * math.nan


def test_non_finite_loss_raises_training_error_saying_lower_the_lr(tmp_path):
    with pytest.raises(TrainingError) as exc:
        fit(_NaNModel(), tiny_splits(), TrainConfig(epochs=1, batch_size=16), tmp_path,
            progress=False)
    message = str(exc.value)
    assert "lower the learning rate" in message and "\n" not in message
    assert "checkpoint" not in message  # none was written before the first epoch ended
    assert not (tmp_path / FINAL).exists() and not (tmp_path / LAST).exists()


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    # epoch 1 trains normally; from epoch 2 the step schedule multiplies the rate by 1e30
    config = TrainConfig(epochs=3, batch_size=64, lr=0.1, lr_schedule="step", milestones=(1,),
                         gamma=1e30)
    with pytest.raises(TrainingError, match="lower the learning rate") as exc:
        fit(lenet(), digits(), config, tmp_path, progress=False)
    assert f"last good checkpoint is kept in {tmp_path}" in str(exc.value)
    last = checkpoint.load(tmp_path / LAST)
    assert last.meta["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in last.model.values())
    assert [r["epoch"] for r in read_jsonl(tmp_path / METRICS)] == [0]
    assert not (tmp_path / FINAL).exists()


def test_fit_accepts_a_torch_pruned_model_and_holds_its_mask(tmp_path):
    # issue 15: a model still carrying torch.nn.utils.prune's weight_orig / weight_mask was
    # refused ("the mask names 'classifier.0.weight', which the model does not have")
    from torch.nn.utils import prune as torch_prune

    model = lenet()
    torch_prune.l1_unstructured(model.classifier[0], "weight", amount=0.5)
    keep = model.classifier[0].weight_mask.bool().clone()
    fit(model, digits(), TrainConfig(epochs=1, **FAST), tmp_path, progress=False)
    weight = dict(model.named_parameters())["classifier.0.weight"]  # plain again
    assert not hasattr(model.classifier[0], "weight_orig")
    assert torch.count_nonzero(weight[~keep]) == 0 and torch.count_nonzero(weight[keep]) > 0
