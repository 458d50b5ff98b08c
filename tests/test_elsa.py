"""ELSA (issue 13): admission, frozen weights, every level from one nested checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_helpers import assert_user_error, cli, digits, recipe_dict, tiny_splits
from torch import nn

from prunescope import checkpoint, nested, recipe
from prunescope.errors import ConfigError
from prunescope.experiment import dense_stage, run_for
from prunescope.mask import Mask
from prunescope.methods.elsa import FreezeHold, admit
from prunescope.train import TrainConfig, evaluate, fit

T, F = True, False


def test_admission_keeps_the_frozen_weights_and_adds_the_largest_free_ones():
    frozen = Mask({"a": torch.tensor([T, F, F]), "b": torch.tensor([F, F, F])})
    scores = {"a": torch.tensor([0.0, 0.5, -3.0]), "b": torch.tensor([2.0, -0.5, 0.1])}
    mask = admit(frozen, scores, 0.5)  # 3 of 6 kept: a0 (frozen), then |a2| = 3, |b0| = 2
    assert mask["a"].tolist() == [T, F, T] and mask["b"].tolist() == [T, F, F]
    tie = admit(frozen, scores, 1 / 3 - 1e-9)  # 4 kept: |a1| = |b1| = 0.5 tie -> lower index
    assert tie["a"].tolist() == [T, T, T] and tie["b"].tolist() == [T, F, F]
    assert admit(frozen, scores, 0.0).num_kept == 6


def test_frozen_weights_stay_bit_identical_under_momentum_and_weight_decay(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    names = ["1.weight", "3.weight"]
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(1)
    frozen = Mask({n: torch.rand(params[n].shape, generator=generator) < 0.2 for n in names})
    keep = Mask({n: frozen[n] | (torch.rand(params[n].shape, generator=generator) < 0.4)
                 for n in names})
    keep.apply_(model)
    before = {n: params[n].detach().clone() for n in names}
    hook = FreezeHold(keep, frozen)
    config = TrainConfig(epochs=2, batch_size=16, lr=0.1, momentum=0.9, weight_decay=0.01)
    fit(model, tiny_splits(), config, tmp_path, hook=hook)
    state = checkpoint.load(tmp_path / "last.safetensors").optimizer["state"]
    for i, name in enumerate(names):
        after = params[name].detach()
        assert torch.equal(after[frozen[name]], before[name][frozen[name]])  # bit-identical
        assert not after[~keep[name]].any()  # still pruned
        admitted = keep[name] & ~frozen[name]
        assert not torch.equal(after[admitted], before[name][admitted])  # trained
        momentum = state[2 * i]["momentum_buffer"]  # weights are params 0 and 2
        assert not momentum[frozen[name]].any() and momentum[admitted].any()


def elsa_run(tmp_path, **options):
    method = {"method": "elsa", "levels": [0.9, 0.5, 0.0], "level_epochs": [1, 1],
              "top": {"method": "gmp", "start": 0, "end": 1, "every": 5, "unit": "epochs"},
              **options}
    raw = recipe_dict(prune={"methods": [method], "sparsities": [0.3, 0.6]},
                      train={"epochs": 2, "batch_size": 64, "lr": 0.05})
    loaded = recipe.from_dict(raw)
    run = run_for(loaded, tmp_path, progress=False, splits=digits())
    dense_stage(run)
    return run, loaded.prune.methods[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("elsa")
    run, method = elsa_run(out)
    return {"out": out, "run": run, "method": method, "results": method.run_one(run, 0.9)}


def test_the_recipe_sparsities_give_way_to_the_levels(finished):
    method = finished["method"]
    assert method.sparsities == (0.9,)
    assert method.outputs() == ("elsa@0.9", "elsa@0.5", "elsa@0")
    assert [d.name for d in method.directories(finished["run"], 0.9)] == ["s0.9", "s0.5", "s0"]


def test_every_level_is_a_result_and_a_level_of_the_nested_checkpoint(finished):
    results, path = finished["results"], finished["out"] / "elsa" / "nested.safetensors"
    assert [r["sparsity"] for r in results] == [0.9, 0.5, 0.0]
    splits = digits()
    for result in results:
        assert result["actual_sparsity"] == pytest.approx(result["level"], abs=1e-3)
        model, mask = nested.load_at_level(path, result["level"])
        assert mask.sparsity == result["actual_sparsity"]
        assert evaluate(model, splits.test)["accuracy"] == result["accuracy"]


def test_each_levels_weights_survive_the_later_levels_bit_identically(finished):
    out = finished["out"] / "elsa"
    state, nest, _, _ = nested.read(out / "nested.safetensors")
    trained_at = {0.9: out / "top" / "s0.9", 0.5: out / "s0.5", 0.0: out / "s0"}
    for index, level in enumerate(nest.levels):
        at_level = checkpoint.load(trained_at[level] / "model.safetensors").model
        for name, keep in nest.masks[index].items():
            assert torch.equal(state[name][keep], at_level[name][keep]), (level, name)
    for sparse, dense in zip(nest.masks, nest.masks[1:], strict=False):
        assert all(not (sparse[n] & ~dense[n]).any() for n in sparse)


def test_evaluate_and_inspect_take_a_level(finished, capsys):
    path = finished["out"] / "elsa" / "nested.safetensors"
    code, stdout, err = cli(capsys, "evaluate", "--checkpoint", path, "--level", "0.5")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["level"] == 0.5 and report["accuracy"] == finished["results"][1]["accuracy"]
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)
    code, stdout, err = cli(capsys, "inspect", path, "--level", "0.9")
    assert code == 0, err
    assert "level 0.9" in stdout and "prunescope.nested/2" in stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--level", "0.7"], "level 0.7 is not held; this nested mask holds 0.9, 0.5, 0"),
    ([], "pick one with --level"),
])
def test_evaluate_refuses_a_missing_or_absent_level(finished, capsys, args, message):
    path = finished["out"] / "elsa" / "nested.safetensors"
    code, stdout, err = cli(capsys, "evaluate", "--checkpoint", path, *args)
    assert message in assert_user_error(code, err) and stdout == ""


def test_a_level_of_a_plain_checkpoint_is_refused(finished, capsys):
    path = finished["out"] / "dense" / "model.safetensors"
    code, _, err = cli(capsys, "evaluate", "--checkpoint", path, "--level", "0.5")
    assert "is not a nested checkpoint" in assert_user_error(code, err)


def assert_nested_and_frozen(out, results, levels, top_dir):
    """Every level reaches its sparsity, each level's mask is a subset of the next denser one,
    and each level's weights are bit-identical in the nested checkpoint to the model that level
    trained (the sparsest: the top sparsifier's final model)."""
    assert [r["sparsity"] for r in results] == levels
    for result in results:
        assert result["actual_sparsity"] == pytest.approx(result["level"], abs=1e-3)
    state, nest, _, _ = nested.read(out / "elsa" / "nested.safetensors")
    trained_at = [top_dir] + [out / "elsa" / f"s{level:g}" for level in levels[1:]]
    for index, directory in enumerate(trained_at):
        at_level = checkpoint.load(directory / "model.safetensors").model
        for name, keep in nest.masks[index].items():
            assert torch.equal(state[name][keep], at_level[name][keep]), (index, name)
    for sparse, dense in zip(nest.masks, nest.masks[1:], strict=False):
        assert all(not (sparse[n] & ~dense[n]).any() for n in sparse)


@pytest.mark.parametrize("top", [
    {"method": "acdc", "warmup": 0.2, "compressed": 0.2, "decompressed": 0.2, "final": 0.2},
    {"method": "one_shot", "criterion": "woodfisher"},
], ids=["acdc", "woodfisher"])
def test_acdc_and_obs_as_the_top_sparsifier(tmp_path, top):
    run, method = elsa_run(tmp_path, top=top)
    results = method.run_one(run, 0.9)
    assert_nested_and_frozen(tmp_path, results, [0.9, 0.5, 0.0],
                             tmp_path / "elsa" / "top" / "s0.9")
    top_model = checkpoint.load(tmp_path / "elsa" / "top" / "s0.9" / "model.safetensors")
    assert top_model.meta["method"]["method"] == "elsa/top"
    assert top_model.mask.sparsity == pytest.approx(0.9, abs=1e-3)


def test_regrow_admission_and_frozen_rest(tmp_path):
    run, method = elsa_run(tmp_path, admission="regrow", regrow=0.5, rest="freeze")
    results = method.run_one(run, 0.9)
    levels = [0.9, 0.5, 0.0]
    assert_nested_and_frozen(tmp_path, results, levels, tmp_path / "elsa" / "top" / "s0.9")
    top = checkpoint.load(tmp_path / "elsa" / "top" / "s0.9" / "model.safetensors").model
    rest = [k for k in top if not k.endswith("weight")]
    assert rest
    for level in levels[1:]:  # biases kept the top level's values through every later level
        at_level = checkpoint.load(tmp_path / "elsa" / f"s{level:g}" / "model.safetensors").model
        assert all(torch.equal(at_level[k], top[k]) for k in rest), level
    _, _, rests, _ = nested.read(tmp_path / "elsa" / "nested.safetensors")
    assert not any(rests)  # nothing differs: no per-level copies


def test_regrow_from_init_never_reads_the_dense_model(tmp_path):
    run, method = elsa_run(tmp_path, admission="regrow", start="init", levels=[0.8, 0.0],
                           level_epochs=[1])
    dense = run.dense_path()
    dense.rename(dense.with_suffix(".moved"))  # reading it would fail
    results = method.run_one(run, 0.8)
    assert_nested_and_frozen(tmp_path, results, [0.8, 0.0], tmp_path / "elsa" / "top" / "s0.8")


def test_regrow_chooses_the_free_weights_by_their_own_magnitude_at_its_step():
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[5.0, -0.5, 2.0], [0.25, -4.0, 0.125]]))
    frozen = Mask({"0.weight": torch.tensor([[F, T, F], [F, F, F]])})  # -0.5 frozen though small
    hook = FreezeHold(None, frozen, admit_at=(3, 0.5))  # 3 of 6 kept: -0.5, then 5, -4
    hook.hold_(model)
    hook.on_step(model, 2)
    assert hook.mask is None and model[0].weight.count_nonzero() == 6  # still dense
    hook.on_step(model, 3)
    assert hook.mask["0.weight"].tolist() == [[T, T, F], [F, T, F]]
    assert model[0].weight.tolist() == [[5.0, -0.5, 0.0], [0.0, -4.0, 0.0]]
    hook.on_step(model, 4)  # chosen once
    assert hook.mask["0.weight"].tolist() == [[T, T, F], [F, T, F]]


def test_level_training_configs(tmp_path):
    run, method = elsa_run(tmp_path)
    config = method.train_config(run, 1)
    assert (config.epochs, config.lr) == (1, 0.05)  # the training config, level_epochs
    _, tuned = elsa_run(tmp_path, level_config="finetune")
    assert (tuned.train_config(run, 2).epochs, tuned.train_config(run, 2).lr) == (1, 0.01)
    _, other = elsa_run(tmp_path, level_config="train", level_lr=[0.2, 0.3],
                        level_epochs=[3, 2], budget=0.5)
    first, second = other.train_config(run, 1), other.train_config(run, 2)
    assert (first.epochs, first.lr, first.lr_schedule) == (2, 0.2, "cosine")  # round(1.5)
    assert (second.epochs, second.lr) == (1, 0.3)


def test_one_shot_fine_tuning_as_the_top_sparsifier(tmp_path):
    run, method = elsa_run(tmp_path, levels=[0.8, 0.0], level_epochs=[1],
                           top={"method": "one_shot"})
    results = method.run_one(run, 0.8)
    assert [r["sparsity"] for r in results] == [0.8, 0.0]
    assert results[0]["actual_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert results[1]["actual_sparsity"] == 0.0


@pytest.mark.parametrize(("options", "message"), [
    ({"levels": [0.5, 0.9]}, "strictly decreasing"),
    ({"level_epochs": [1]}, "one entry per level after the first"),
    ({"top": {"method": "lottery"}}, "top must be one of"),
    ({"sparsities": [0.5]}, "set levels"),
    ({"level_lr": [0.1]}, "level_lr needs one entry per level after the first"),
    ({"level_lr": [0.1, 0.0]}, "level_lr must be > 0"),
    ({"admission": "gradient"}, "admission must be one of dense, regrow"),
    ({"rest": "drop"}, "rest must be one of train, freeze"),
    ({"level_config": "dense"}, "level_config must be one of finetune, train"),
    ({"regrow": 1.0}, r"regrow .* must be in \(0, 1\)"),
    ({"start": "init"}, "start: init needs admission: regrow"),
    ({"start": "zero", "admission": "regrow"}, "start must be one of dense, init"),
])
def test_bad_elsa_configs_are_one_line(options, message):
    method = {"method": "elsa", "levels": [0.9, 0.5, 0.0], "level_epochs": [1, 1], **options}
    with pytest.raises(ConfigError, match=message) as info:
        recipe.from_dict(recipe_dict(prune={"methods": [method]}))
    assert "\n" not in str(info.value)


def test_elsa_cannot_run_at_other_sparsities(finished):
    with pytest.raises(ConfigError, match="runs once, at its top level 0.9"):
        finished["method"].check(finished["run"], (0.5, 0.9))
