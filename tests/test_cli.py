"""The experiment runner and the ``prunescope`` command line, end to end on tiny data."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_helpers import assert_user_error, cli, files_under, write_recipe

from prunescope import checkpoint, data, experiment, models, pipeline, recipe
from prunescope import run as run_module
from prunescope.allocation import ALLOCATIONS
from prunescope.cli import main
from prunescope.criteria import CRITERIA
from prunescope.errors import ConfigError
from prunescope.mask import Mask
from prunescope.schedules import SCHEDULES
from prunescope.train import TrainConfig

RUN_FILES = ("config.yaml", "results.json", "accuracy_vs_sparsity.png")
SUBCOMMANDS = ("demo", "run", "train", "prune", "transfer", "evaluate", "inspect", "export",
               "list")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished ``prunescope run`` of the tiny recipe: dense, 2 methods x 2 sparsities."""
    root = tmp_path_factory.mktemp("finished")
    recipe_path, out = write_recipe(root / "tiny.yaml"), root / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["run", str(recipe_path), "--out", str(out), "--no-progress"])
    assert code == 0, stderr.getvalue()
    results = json.loads((out / "results.json").read_text())
    return {"recipe": recipe_path, "out": out, "stdout": stdout.getvalue(),
            "stderr": stderr.getvalue(), "results": results}


@pytest.fixture(scope="module", autouse=True)
def _restore_determinism():
    """``prunescope run`` switches deterministic algorithms on; give the setting back after."""
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


# -- prunescope run ------------------------------------------------------------------------------

def test_run_writes_results_for_dense_and_every_method_and_sparsity(finished):
    results = finished["results"]
    assert (results["dataset"], results["model"], results["recipe"]) == ("digits", "lenet300",
                                                                        "tiny")
    assert 0.5 < results["dense"]["accuracy"] <= 1  # lenet300 learns 8x8 digits in 2 epochs
    grid = [(r["criterion"], r["allocation"], r["sparsity"]) for r in results["runs"]]
    assert grid == [("magnitude", "global", 0.5), ("magnitude", "global", 0.9),
                    ("random", "erk", 0.5), ("random", "erk", 0.9)]
    for run in results["runs"]:
        for key in ("accuracy_before_finetune", "accuracy", "effective_sparsity",
                    "actual_sparsity"):
            assert 0 <= run[key] <= 1, (key, run)
        assert run["actual_sparsity"] == pytest.approx(run["sparsity"], abs=1e-3)
        assert run["effective_sparsity"] >= run["actual_sparsity"] - 1e-9


def test_run_writes_every_stage_to_its_directory(finished):
    out = finished["out"]
    for name in RUN_FILES:
        assert (out / name).is_file()
    for name in ("init.safetensors", "model.safetensors", "metrics.jsonl", "result.json"):
        assert (out / "dense" / name).is_file()
    for method in ("magnitude+global", "random+erk"):
        for sparsity in ("s0.5", "s0.9"):
            run_dir = out / method / sparsity
            for name in ("mask.safetensors", "model.safetensors", "result.json"):
                assert (run_dir / name).is_file(), run_dir / name


def test_pruned_models_hold_their_masks_with_exact_zeros(finished):
    for run in finished["results"]["runs"]:
        run_dir = finished["out"] / run["method"] / f"s{run['sparsity']:g}"
        mask = Mask.load(run_dir / "mask.safetensors")
        weights = checkpoint.load(run_dir / "model.safetensors").model
        assert mask.sparsity == pytest.approx(run["actual_sparsity"])
        for name, keep in mask.items():
            assert torch.count_nonzero(weights[name][~keep]) == 0


def test_run_saves_the_resolved_recipe(finished):
    saved = (finished["out"] / "config.yaml").read_text()
    assert saved == recipe.dump(recipe.load(finished["recipe"]))


def test_run_draws_the_plot_as_png(finished):
    png = (finished["out"] / "accuracy_vs_sparsity.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_run_prints_a_table_row_per_run(finished):
    stdout = finished["stdout"]
    assert f"dense test accuracy {finished['results']['dense']['accuracy']:.4f}" in stdout
    rows = [line.split() for line in stdout.splitlines()
            if line.startswith(("magnitude+global", "random+erk"))]
    expected = [(r["method"], r["sparsity"], f"{r['accuracy']:.4f}", "-")
                for r in finished["results"]["runs"]]  # one-shot runs have no own dense model
    assert [(row[0], float(row[1]), row[4], row[5]) for row in rows] == expected
    assert "results.json" in stdout and "accuracy_vs_sparsity.png" in stdout


def test_run_logs_progress_on_stderr_not_stdout(finished):
    assert "data: digits" in finished["stderr"] and "[4/4]" in finished["stderr"]
    assert "data: digits" not in finished["stdout"]


def test_running_the_same_recipe_again_reuses_every_finished_stage(finished, capsys,
                                                                   monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(run_module, "fit", no_work)  # every training of every stage
    monkeypatch.setattr(pipeline, "prune", no_work)
    out = finished["out"]
    stamp = (out / "dense" / "model.safetensors").stat().st_mtime_ns
    code, stdout, err = cli(capsys, "run", finished["recipe"], "--out", out, "--no-progress")
    assert code == 0, err
    assert (out / "dense" / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text()) == finished["results"]
    assert stdout == finished["stdout"]


def test_a_different_recipe_into_the_same_out_is_refused(finished, tmp_path, capsys):
    out = finished["out"]
    before = {name: (out / name).stat().st_mtime_ns for name in files_under(out)}
    other = write_recipe(tmp_path / "other.yaml", seed=1)
    code, stdout, err = cli(capsys, "run", other, "--out", out, "--no-progress")
    line = assert_user_error(code, err)
    assert str(out) in line and "--out" in line
    assert {name: (out / name).stat().st_mtime_ns for name in files_under(out)} == before
    assert stdout == ""


# -- prunescope train / evaluate / prune ---------------------------------------------------------

def test_train_command_trains_only_the_dense_model(tmp_path, capsys):
    out = tmp_path / "dense-only"
    code, stdout, err = cli(capsys, "train", write_recipe(tmp_path / "r.yaml"), "--out", out,
                            "--set", "train.epochs=1", "--no-progress")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["runs"] == [] and 0 <= results["dense"]["accuracy"] <= 1
    assert (out / "dense" / "model.safetensors").is_file()
    assert not (out / "accuracy_vs_sparsity.png").exists()
    saved = recipe.from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    assert saved.prune is None and saved.finetune is None and saved.train.epochs == 1
    assert files_under(out) == sorted(["config.yaml", "results.json", "dense/init.safetensors",
                                       "dense/last.safetensors", "dense/metrics.jsonl",
                                       "dense/model.safetensors", "dense/result.json",
                                       "dense/stage.json"])
    assert "dense test accuracy" in stdout


def test_seed_and_deterministic_options_override_the_recipe(tmp_path, capsys):
    out = tmp_path / "seeded"
    code, _, err = cli(capsys, "train", write_recipe(tmp_path / "r.yaml"), "--out", out,
                       "--set", "train.epochs=1", "--seed", "5", "--no-deterministic")
    assert code == 0, err
    saved = recipe.from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    assert saved.seed == 5 and saved.deterministic is False


def test_evaluate_reports_the_dense_accuracy_of_the_run(finished, capsys):
    path = finished["out"] / "dense" / "model.safetensors"
    code, stdout, err = cli(capsys, "evaluate", "--checkpoint", path)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["accuracy"] == finished["results"]["dense"]["accuracy"]
    assert report["split"] == "test" and report["sparsity"] == 0.0


def test_evaluate_reports_a_pruned_runs_accuracy_and_sparsity(finished, capsys):
    run = finished["results"]["runs"][1]
    path = finished["out"] / "magnitude+global" / "s0.9" / "model.safetensors"
    code, stdout, err = cli(capsys, "evaluate", "--checkpoint", path)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["accuracy"] == run["accuracy"]
    assert report["sparsity"] == pytest.approx(run["actual_sparsity"])
    assert report["effective_sparsity"] == pytest.approx(run["effective_sparsity"])


def test_evaluate_on_the_validation_split(finished, capsys):
    path = finished["out"] / "dense" / "model.safetensors"
    code, stdout, err = cli(capsys, "evaluate", "--checkpoint", path, "--split", "val")
    assert code == 0, err
    assert json.loads(stdout)["accuracy"] == finished["results"]["dense"]["val_accuracy"]


@pytest.mark.parametrize("finetune", [0, 1])
def test_prune_command_writes_mask_model_and_result(finished, tmp_path, capsys, finetune):
    out = tmp_path / "pruned"
    code, stdout, err = cli(capsys, "prune", "--checkpoint",
                            finished["out"] / "dense" / "model.safetensors",
                            "--criterion", "magnitude", "--allocation", "global",
                            "--sparsity", "0.8", "--out", out, "--finetune-epochs", finetune,
                            "--no-progress")
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    assert json.loads(stdout) == result
    assert result["sparsity"] == pytest.approx(0.8)
    assert result["effective_sparsity"] >= result["sparsity"] - 1e-9
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["accuracy_before_finetune"] <= 1
    mask = Mask.load(out / "mask.safetensors")
    assert mask.sparsity == pytest.approx(0.8)
    state = checkpoint.load(out / "model.safetensors")
    model = checkpoint.build_model(state, out / "model.safetensors")
    assert state.mask is not None and state.mask.equal(mask)
    params = dict(model.named_parameters())
    for name, keep in mask.items():
        assert torch.count_nonzero(params[name][~keep]) == 0
    if finetune:
        assert (out / "last.safetensors").is_file() and result["finetune"]["epochs"] == 1
    else:
        assert result["accuracy"] == result["accuracy_before_finetune"]
        assert result["finetune"] is None


def test_prune_stage_key_leaves_out_fields_added_later_at_their_default(finished, tmp_path,
                                                                        capsys):
    """The prune stage is keyed as Run.key keys configs (keys.key_fields): fine-tuning fields
    added after runs were first keyed (ADDED_LATER) stay out of the key at their default, so a
    stage written before they existed is still reused on resume; the result records them all.
    A stage keyed the way prunescope keyed it before (every field, at its default too) is
    reused as well, not refused as another configuration."""
    out = tmp_path / "pruned"
    args = ("prune", "--checkpoint", finished["out"] / "dense" / "model.safetensors",
            "--sparsity", "0.8", "--out", out, "--finetune-epochs", 1, "--no-progress")
    code, stdout, err = cli(capsys, *args)
    assert code == 0, err
    added_later = {f.name for f in dataclasses.fields(TrainConfig)
                   if f.metadata.get("added_later")}
    stage = json.loads((out / "stage.json").read_text())
    assert added_later and not added_later & set(stage["finetune"])
    assert stage["finetune"]["epochs"] == 1
    first = json.loads(stdout)
    assert added_later <= set(first["finetune"])
    code, stdout, err = cli(capsys, *args)  # the same stage again: read back, not recomputed
    assert code == 0, err
    assert json.loads(stdout) == first
    older = {**stage, "finetune": first["finetune"]}  # as prunescope keyed it before
    (out / "stage.json").write_text(json.dumps(older))
    code, stdout, err = cli(capsys, *args)
    assert code == 0, err
    assert json.loads(stdout) == first
    assert json.loads((out / "stage.json").read_text()) == older  # left as it was


def test_prune_and_evaluate_on_sparse_kernels_match_the_dense_path(finished, tmp_path, capsys,
                                                                    monkeypatch):
    from prunescope.kernels import backend, swap

    if not backend().fast:
        pytest.skip("no fast kernels on this machine")
    monkeypatch.setattr(swap, "_time_pair", lambda *args: (1.0, 0.1))  # every layer "faster"
    source = finished["out"] / "dense" / "model.safetensors"
    results = {}
    for flags in ((), ("--sparse-kernels",)):
        out = tmp_path / ("sparse" if flags else "dense")
        code, stdout, err = cli(capsys, "prune", "--checkpoint", source, "--criterion",
                                "magnitude", "--sparsity", "0.9", "--out", out,
                                "--finetune-epochs", "1", "--no-progress", *flags)
        assert code == 0, err
        results[bool(flags)] = checkpoint.load(out / "model.safetensors").model
    assert "sparse (faster)" in err  # the choice per layer is shown
    for key, value in results[False].items():
        scale = max(value.abs().max().item(), 1e-12)
        assert (results[True][key] - value).abs().max().item() <= 1e-5 * scale
    path = tmp_path / "sparse" / "model.safetensors"
    code, stdout, err = cli(capsys, "evaluate", "--checkpoint", path)
    plain = json.loads(stdout)
    code, stdout, err = cli(capsys, "evaluate", "--checkpoint", path, "--sparse-kernels")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["accuracy"] == pytest.approx(plain["accuracy"], abs=1e-4)
    assert report["sparse_layers"] and report["seconds"] > 0 and "inference" in err


def test_pruning_a_pruned_checkpoint_keeps_its_pruned_weights(finished, tmp_path, capsys):
    source = finished["out"] / "random+erk" / "s0.5"
    code, _, err = cli(capsys, "prune", "--checkpoint", source / "model.safetensors",
                       "--sparsity", "0.9", "--out", tmp_path / "more")
    assert code == 0, err
    before, after = Mask.load(source / "mask.safetensors"), Mask.load(
        tmp_path / "more" / "mask.safetensors")
    for name, keep in after.items():
        assert not (keep & ~before[name]).any()  # nothing regrew
    assert after.sparsity == pytest.approx(0.9)


def test_list_names_every_registered_component(capsys):
    code, stdout, _ = cli(capsys, "list")
    assert code == 0
    lines = {line.split()[0]: line for line in stdout.splitlines()}
    for title, names in (("models", models.names()), ("datasets", data.names()),
                         ("criteria", CRITERIA.names()), ("allocations", ALLOCATIONS.names()),
                         ("schedules", SCHEDULES.names())):
        assert names
        for name in names:
            assert name in lines[title].split(None, 1)[1].split(", ")


@pytest.mark.parametrize("command", [*SUBCOMMANDS, None])
def test_every_help_exits_0(capsys, command):
    code, stdout, _ = cli(capsys, *([command] if command else []), "--help")
    assert code == 0 and "usage:" in stdout


# -- bad input: one line, exit 2, nothing written --------------------------------------------

BAD_RECIPES = {
    "unknown model": ("--set", "model.name=resnet9000"),
    "unknown dataset": ("--set", "data.name=imagenet22k"),
    "unknown criterion": ("--set", "prune.methods=[{criterion: psychic}]"),
    "unknown allocation": ("--set", "prune.methods=[{criterion: magnitude, allocation: lottery}]"),
    "unknown pattern": ("--set", "prune.methods=[{pattern: diagonal}]"),
    "sparsity 1.0": ("--set", "prune.sparsities=[0.5, 1.0]"),
    "sparsity -0.1": ("--set", "prune.sparsities=[-0.1]"),
    "wrong type": ("--set", "train.epochs=ten"),
    "unknown key by --set": ("--set", "train.epochz=1"),
    "malformed --set": ("--set", "noequals"),
}


@pytest.mark.parametrize("command", ["run", "train"])
@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipe_values_fail_before_anything_is_written(tmp_path, capsys, command, case):
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, command, write_recipe(tmp_path / "r.yaml"), "--out", out,
                            *BAD_RECIPES[case])
    assert_user_error(code, err)
    assert not out.exists() and stdout == ""


@pytest.mark.parametrize(("case", "content", "word"), [
    ("invalid yaml", b"name: x\ntrain: epochs: 2\n", "line 2"),
    ("unknown key", b"name: x\ndata: {name: digits}\nepochs: 3\n", "valid keys"),
    ("not text", b"\xff\xfe\x00name", "UTF-8"),
    ("not a mapping", b"- 1\n- 2\n", "mapping"),
])
def test_bad_recipe_files_fail_with_one_line(tmp_path, capsys, case, content, word):
    (tmp_path / "r.yaml").write_bytes(content)
    code, _, err = cli(capsys, "run", tmp_path / "r.yaml", "--out", tmp_path / "out")
    assert word in assert_user_error(code, err)
    assert not (tmp_path / "out").exists()


def test_a_bad_dataset_setting_fails_before_the_run_directory_exists(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = cli(capsys, "run", write_recipe(tmp_path / "r.yaml"), "--out", out,
                       "--set", "data.val_size=100000")
    assert "val_size" in assert_user_error(code, err)
    assert not out.exists()


@pytest.mark.parametrize("command", ["run", "prune"])
def test_an_out_path_that_is_a_file_fails_with_one_line(finished, tmp_path, capsys, command):
    (tmp_path / "taken").write_text("precious")
    if command == "run":
        argv = ["run", write_recipe(tmp_path / "r.yaml"), "--set", "prune=null"]
    else:
        argv = ["prune", "--checkpoint", finished["out"] / "dense" / "model.safetensors",
                "--sparsity", "0.5"]
    code, _, err = cli(capsys, *argv, "--out", tmp_path / "taken")
    assert "taken" in assert_user_error(code, err)
    assert (tmp_path / "taken").read_text() == "precious"


def test_missing_recipe_fails_with_one_line(tmp_path, capsys):
    code, _, err = cli(capsys, "run", tmp_path / "nope.yaml", "--out", tmp_path / "out")
    assert "nope.yaml" in assert_user_error(code, err)
    assert not (tmp_path / "out").exists()


def _bad_checkpoint(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "model.safetensors"
    if kind == "random bytes":
        path.write_bytes(torch.randint(0, 256, (2048,), dtype=torch.uint8,
                                       generator=torch.Generator().manual_seed(0)).numpy()
                         .tobytes())
    elif kind == "pickle":
        torch.save(models.build("lenet300", image_size=8).state_dict(), path)
    elif kind == "mask file":
        Mask({"w": torch.ones(3, dtype=torch.bool)}).save(path)
    elif kind == "empty":
        path.write_bytes(b"")
    return path  # "missing": never written


CHECKPOINT_CASES = ["missing", "random bytes", "pickle", "mask file", "empty"]


@pytest.mark.parametrize("kind", CHECKPOINT_CASES)
def test_evaluate_refuses_a_bad_checkpoint(tmp_path, capsys, kind):
    code, stdout, err = cli(capsys, "evaluate", "--checkpoint", _bad_checkpoint(tmp_path, kind))
    assert "model.safetensors" in assert_user_error(code, err)
    assert stdout == ""


@pytest.mark.parametrize("kind", CHECKPOINT_CASES)
def test_prune_refuses_a_bad_checkpoint_and_writes_nothing(tmp_path, capsys, kind):
    out = tmp_path / "out"
    code, _, err = cli(capsys, "prune", "--checkpoint", _bad_checkpoint(tmp_path, kind),
                       "--sparsity", "0.5", "--out", out)
    assert_user_error(code, err)
    assert not out.exists()


@pytest.mark.parametrize(("options", "word"), [
    (("--sparsity", "1.5"), "[0, 1)"),
    (("--sparsity", "-0.2"), "[0, 1)"),
    (("--sparsity", "0.5", "--criterion", "psychic"), "psychic"),
    (("--sparsity", "0.5", "--allocation", "lottery"), "lottery"),
    (("--pattern", "3:5"), "3:5"),  # lenet300 on 8x8 digits has 64 inputs, not a multiple of 5
    (("--pattern", "2:4", "--sparsity", "0.9"), "2:4"),
    (("--sparsity", "0.5", "--finetune-epochs", "-1"), "finetune-epochs"),
    ((), "sparsity"),
])
def test_prune_refuses_bad_options_and_writes_nothing(finished, tmp_path, capsys, options, word):
    out = tmp_path / "out"
    code, _, err = cli(capsys, "prune", "--checkpoint",
                       finished["out"] / "dense" / "model.safetensors", "--out", out, *options)
    assert word in assert_user_error(code, err)
    assert not out.exists()


MID_RUN_FAILURES = {
    "no prunable tensor": (("--set", 'prune.include=["nothing*"]'), "prunable"),
    "N:M that does not divide": (("--set", 'prune.methods=[{pattern: "3:5"}]', "--set",
                                  "prune.sparsities=[0.4]"), "3:5"),
    "non-finite loss": (("--set", "train.lr=1e30"), "lower the learning rate"),
}


@pytest.mark.parametrize("case", list(MID_RUN_FAILURES))
def test_failures_after_data_loading_are_one_line_without_results(tmp_path, capsys, case):
    options, word = MID_RUN_FAILURES[case]
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "run", write_recipe(tmp_path / "r.yaml"), "--out", out,
                            "--set", "train.epochs=1", *options, "--no-progress")
    assert word in assert_user_error(code, err, only_line=False)
    assert not (out / "results.json").exists() and not (out / "accuracy_vs_sparsity.png").exists()
    assert not [name for name in files_under(out) if "s0." in name]  # no pruned run written
    if case == "non-finite loss":
        assert not (out / "dense" / "model.safetensors").exists()
        assert not (out / "dense" / "result.json").exists()
    else:  # caught before the dense model trains: the run directory is never claimed
        assert not out.exists()
    assert "dense test accuracy" not in stdout


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["run"],
    ["prune", "--sparsity", "0.5"],
    ["prune", "--checkpoint", "x", "--out", "y", "--sparsity", "lots"],
    ["evaluate", "--checkpoint", "x", "--split", "holdout"],
    ["run", "r.yaml", "--bogus"],
])
def test_usage_errors_are_one_line(capsys, argv):
    code, stdout, err = cli(capsys, *argv)
    line = assert_user_error(code, err)
    assert "--help" in line and stdout == ""


def test_interrupt_says_how_to_resume(capsys, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run", interrupted)
    code, _, err = cli(capsys, "run", write_recipe(tmp_path / "r.yaml"), "--out", tmp_path)
    assert code == 130 and "run the same command again" in err and "Traceback" not in err


def test_the_installed_command_exits_2_with_one_error_line(tmp_path):
    missing = tmp_path / "missing.safetensors"
    done = subprocess.run([sys.executable, "-m", "prunescope", "evaluate", "--checkpoint",
                           str(missing)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]
    assert "Traceback" not in done.stderr


# -- the command surface: version, help, speed of recipe errors, --device ----------------------

def test_version_is_the_package_version(capsys):
    import prunescope

    code, stdout, _ = cli(capsys, "--version")
    assert code == 0 and stdout.strip() == f"prunescope {prunescope.__version__}"


def test_the_package_version_is_the_installed_distributions():
    from importlib.metadata import version

    import prunescope

    assert prunescope.__version__ == version("prunescope")


def _subparser(name: str):
    from prunescope.cli import _build_parser

    commands = next(a for a in _build_parser()._actions if a.dest == "command")
    return commands.choices[name]


@pytest.mark.parametrize("command", ["prune", "evaluate", "transfer", "run", "train", "inspect",
                                     "export"])
def test_help_explains_every_option_and_its_default(command):
    parser = _subparser(command)
    formatter = parser._get_formatter()
    assert "(default: " in parser.format_help()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        shown = formatter._expand_help(action)  # the text --help prints for the option
        assert action.required or "default" in shown, (command, action.option_strings, shown)


RECIPE_FAILURES = {"missing": None, "bad YAML": "a: [1, 2", "not UTF-8": b"\xff\xfe"}


@pytest.mark.parametrize("command", ["run", "train"])
@pytest.mark.parametrize("case", RECIPE_FAILURES)
def test_a_bad_recipe_file_fails_before_torch_is_imported(tmp_path, command, case):
    path = tmp_path / "recipe.yaml"
    content = RECIPE_FAILURES[case]
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_bytes(content)
    script = ("import sys\nfrom prunescope.cli import main\n"
              f"code = main([{command!r}, {str(path)!r}])\n"
              "print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "recipe.yaml" in lines[0]


def test_the_recipe_file_errors_are_recipe_loads_errors(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("a: [1, 2")
    with pytest.raises(ConfigError) as from_load:
        recipe.load(path)
    done = subprocess.run([sys.executable, "-m", "prunescope", "run", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == f"error: {from_load.value}"


def test_device_option_of_recipe_commands_sets_the_recipe_device(tmp_path, capsys, monkeypatch):
    seen = {}

    def fake_run(loaded, out, progress=None):
        seen["device"] = loaded.device
        return {"runs": [], "dense": {}}

    monkeypatch.setattr(experiment, "run", fake_run)
    monkeypatch.setattr("prunescope.tables.format_results", lambda results: "")
    code, _, err = cli(capsys, "run", write_recipe(tmp_path / "r.yaml"), "--device", "cpu",
                       "--out", tmp_path / "out")
    assert code == 0, err
    assert seen["device"] == "cpu"


@pytest.mark.parametrize("command, function", [
    (["prune", "--sparsity", "0.5", "--out", "o"], "prune_checkpoint"),
    (["transfer", "--dataset", "digits", "--out", "o"], "transfer_checkpoint"),
    (["evaluate"], "evaluate_checkpoint"),
])
def test_device_option_of_checkpoint_commands_reaches_the_command(capsys, monkeypatch, command,
                                                                   function):
    from prunescope import commands

    calls = []
    monkeypatch.setattr(commands, function, lambda *a, **kw: calls.append(kw) or {})
    for device in ("cuda:1", None):
        argv = [*command, "--checkpoint", "c.safetensors",
                *(["--device", device] if device else [])]
        code, _, err = cli(capsys, *argv)
        assert code == 0, err
    assert [kw["device"] for kw in calls] == ["cuda:1", None]


def test_the_command_line_shows_the_pipelines_fine_tuning_defaults():
    from prunescope import cli

    shown = (cli.FINETUNE_LR, cli.FINETUNE_EPOCHS)
    assert shown == (pipeline.FINETUNE.lr, pipeline.FINETUNE.epochs)
