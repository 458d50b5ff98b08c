"""The orchestration layer (issue 15): the Run from Python, stages that reuse only the same run,
devices and mixed precision, logging, and honest timings."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch
from pipeline_helpers import assert_user_error, cli, digits, files_under, recipe_dict, write_recipe

from prunescope import commands, devices, experiment, recipe, stages
from prunescope.errors import ConfigError
from prunescope.logs import TensorBoardLogger
from prunescope.mask import Mask
from prunescope.methods.one_shot import OneShot
from prunescope.run import Run
from prunescope.train import TrainConfig, _Loop, fit

FAST = {"batch_size": 64, "lr": 0.05}


@pytest.fixture(autouse=True)
def _restore_determinism():
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A dense digits LeNet-300-100 checkpoint trained for one epoch."""
    root = tmp_path_factory.mktemp("dense")
    run = Run.from_dataset("digits", "lenet300", root, val_size=100,
                           train=TrainConfig(epochs=1, **FAST), progress=False)
    experiment.dense_stage(run)
    return root / "dense" / "model.safetensors"


def tiny(**changes):
    return recipe.from_dict(recipe_dict(train={"epochs": 1, **FAST}, **changes))


# -- a Run from Python ----------------------------------------------------------------------------

def test_a_method_runs_on_a_run_built_in_python_without_a_recipe(tmp_path):
    run = Run.from_dataset("digits", "lenet300", tmp_path, val_size=100,
                           train=TrainConfig(epochs=1, **FAST), progress=False)
    experiment.dense_stage(run)
    (result,) = OneShot(criterion="magnitude", allocation="global").run_one(run, 0.8)
    assert result["actual_sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert (tmp_path / "magnitude+global" / "s0.8" / "model.safetensors").is_file()


# -- stages: reuse only the same run -------------------------------------------------------------

def test_prune_into_a_finished_run_of_another_sparsity_is_refused_naming_the_key(dense, tmp_path,
                                                                                 capsys):
    # issue 15: the second run said 0.5 in result.json and the mask while the model was 0.95
    out = tmp_path / "pruned"
    first = commands.prune_checkpoint(dense, out, sparsity=0.95)
    before = {name: (out / name).read_bytes() for name in files_under(out)}
    code, _, err = cli(capsys, "prune", "--checkpoint", dense, "--sparsity", "0.5", "--out", out)
    line = assert_user_error(code, err)
    assert "sparsity=0.95" in line and "sparsity=0.5" in line and str(out) in line
    assert {name: (out / name).read_bytes() for name in files_under(out)} == before
    assert Mask.load(out / "mask.safetensors").sparsity == pytest.approx(0.95, abs=1e-4)
    assert commands.prune_checkpoint(dense, out, sparsity=0.95) == first  # same run: reused


def test_prune_refuses_a_directory_of_other_files_and_removes_nothing(dense, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="no stage key"):
        commands.prune_checkpoint(dense, out, sparsity=0.5)
    assert files_under(out) == ["notes.txt"]


def test_an_unfinished_stage_of_another_configuration_starts_over(dense, tmp_path, caplog):
    out = tmp_path / "pruned"
    stages.run([out], {"sparsity": 0.3}, lambda: [{"stale": True}])
    (out / "result.json").unlink()  # as if it had stopped (e.g. a NaN loss) before finishing
    (out / "leftover.safetensors").write_bytes(b"old")
    with caplog.at_level(logging.WARNING, logger="prunescope"):
        result = commands.prune_checkpoint(dense, out, sparsity=0.5)
    assert "starting it over" in caplog.text and "sparsity" in caplog.text
    assert not (out / "leftover.safetensors").exists() and "stale" not in result
    assert result["sparsity"] == pytest.approx(0.5, abs=1e-4)


def test_adding_a_sparsity_to_a_finished_sweep_reuses_the_dense_model(tmp_path):
    experiment.run(tiny(prune={"methods": [{}], "sparsities": [0.5]}), tmp_path, progress=False)
    dense_model = (tmp_path / "dense" / "model.safetensors").read_bytes()
    trained = (tmp_path / "magnitude+global" / "s0.5" / "result.json").read_text()
    results = experiment.run(tiny(prune={"methods": [{}], "sparsities": [0.5, 0.9]}), tmp_path,
                             progress=False)
    assert [r["sparsity"] for r in results["runs"]] == [0.5, 0.9]
    assert (tmp_path / "dense" / "model.safetensors").read_bytes() == dense_model
    assert (tmp_path / "magnitude+global" / "s0.5" / "result.json").read_text() == trained


def test_a_finished_sweep_refuses_another_training_naming_the_key(tmp_path):
    experiment.run(tiny(prune=None, finetune=None), tmp_path, progress=False)
    config = (tmp_path / "config.yaml").read_text()
    changed = recipe.from_dict(recipe_dict(train={"epochs": 1, "batch_size": 64, "lr": 0.01},
                                           prune=None, finetune=None))
    with pytest.raises(ConfigError, match=r"train\.lr=0\.05.*train\.lr=0\.01"):
        experiment.run(changed, tmp_path, progress=False)
    assert (tmp_path / "config.yaml").read_text() == config  # nothing written


def test_a_method_directory_of_another_config_is_refused(tmp_path):
    methods = [{"method": "gmp", "start": 0.1, "end": 0.5, "every": 5}]
    experiment.run(tiny(prune={"methods": methods, "sparsities": [0.5]}), tmp_path,
                   progress=False)
    methods[0]["end"] = 0.6
    with pytest.raises(ConfigError, match=r"end=0\.5.*end=0\.6"):
        experiment.run(tiny(prune={"methods": methods, "sparsities": [0.9]}), tmp_path,
                       progress=False)


def test_seconds_count_every_segment_of_a_resumed_stage(tmp_path, monkeypatch):
    # issue 15: after a resume, "seconds" counted only the last segment
    real_epoch, real_step = _Loop.train_epoch, _Loop._step

    def stop_at_the_second_epoch(self, epoch, progress, desc):
        if epoch == 1:
            raise KeyboardInterrupt
        real_epoch(self, epoch, progress, desc)

    def slow_step(self, inputs, targets, epoch):
        if self.step == 0:
            time.sleep(0.5)  # the first segment's epoch takes at least 0.5 s
        return real_step(self, inputs, targets, epoch)

    raw = tiny(prune=None, finetune=None)
    raw = recipe.from_dict({**recipe.to_dict(raw), "train": {"epochs": 2, **FAST}})
    monkeypatch.setattr(_Loop, "train_epoch", stop_at_the_second_epoch)
    monkeypatch.setattr(_Loop, "_step", slow_step)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(raw, tmp_path, progress=False)
    monkeypatch.setattr(_Loop, "train_epoch", real_epoch)
    monkeypatch.setattr(_Loop, "_step", real_step)
    started = time.perf_counter()
    experiment.run(raw, tmp_path, progress=False)
    second_segment = time.perf_counter() - started
    result = json.loads((tmp_path / "dense" / "result.json").read_text())
    assert result["seconds"] > 0.5 and second_segment < result["seconds"]


# -- devices and precision -------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_device_that_is_not_there_is_one_line_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = cli(capsys, "run", write_recipe(tmp_path / "r.yaml"), "--out", out,
                       "--set", "device=cuda")
    line = assert_user_error(code, err)
    assert "cuda" in line and "device: cpu" in line
    assert not out.exists()


@pytest.mark.parametrize("name, message", [("tpu", "unknown device"), ("cuda:x", "unknown")])
def test_unknown_devices_are_refused(name, message):
    with pytest.raises(ConfigError, match=message):
        devices.resolve(name)


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu():
    assert devices.resolve("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bf16_mixed_precision_trains_on_the_cpu(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    record = fit(model, digits(), TrainConfig(epochs=1, precision="bf16", **FAST), tmp_path,
                 progress=False, device="cpu")
    assert record["train_accuracy"] > 0.3 and model[1].weight.dtype == torch.float32


def test_fp16_needs_a_cuda_device():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        devices.check_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="precision must be one of"):
        TrainConfig(precision="fp8")


def test_data_moves_to_the_model_device_batch_by_batch(tmp_path, monkeypatch):
    moved = []
    real = devices.batch_to

    def spy(device, inputs, targets):
        moved.append(device)
        return real(device, inputs, targets)

    monkeypatch.setattr(devices, "batch_to", spy)
    run = Run.from_dataset("digits", "lenet300", tmp_path, val_size=100, device="cpu",
                           train=TrainConfig(epochs=1, **FAST), progress=False)
    experiment.dense_stage(run)
    assert moved and set(moved) == {torch.device("cpu")}


# -- logging ---------------------------------------------------------------------------------

def test_every_epoch_logs_one_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="prunescope"):
        fit(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), digits(),
            TrainConfig(epochs=2, **FAST), tmp_path, progress=False, desc="probe")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("probe epoch")]
    assert [line.split(":")[0] for line in lines] == ["probe epoch 1/2", "probe epoch 2/2"]


def test_tensorboard_gets_metrics_and_per_layer_sparsity(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    experiment.run(tiny(prune={"methods": [{}], "sparsities": [0.5]},
                        log={"tensorboard": True}), tmp_path, progress=False)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "dense/val_accuracy" in tags and "dense/lr" in tags
    assert "magnitude+global s=0.5/sparsity/classifier.0.weight" in tags
    (point,) = events.Scalars("magnitude+global s=0.5/sparsity/classifier.0.weight")
    assert point.value == pytest.approx(Mask.load(
        tmp_path / "magnitude+global" / "s0.5" / "mask.safetensors").sparsities()[
        "classifier.0.weight"])


def test_tensorboard_without_the_package_is_one_line(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match=r"prunescope\[tensorboard\]"):
        TensorBoardLogger(tmp_path)


def test_training_fields_added_later_stay_out_of_the_key_at_their_default():
    """Runs finished before train.loss existed keep their key; choosing SupCon changes it."""
    splits = digits()
    plain = Run(splits, lambda: torch.nn.Linear(64, 10), "unused", train=TrainConfig(epochs=1))
    assert not {"loss", "temperature", "supcon_weight"} & set(plain.key()["train"])
    supcon = Run(splits, lambda: torch.nn.Linear(64, 10), "unused",
                 train=TrainConfig(epochs=1, loss="supcon"))
    assert supcon.key()["train"]["loss"] == "supcon"
    assert stages.difference(plain.key(), supcon.key())[0] == "train.loss"
