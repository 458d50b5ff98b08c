"""Recipes: YAML -> typed frozen configs, with overrides and validation."""

from __future__ import annotations

import dataclasses
from importlib import resources

import pytest
import yaml
from pipeline_helpers import recipe_dict, write_recipe

from prunescope import data, models, recipe
from prunescope.allocation import ALLOCATIONS
from prunescope.criteria import CRITERIA
from prunescope.errors import ConfigError, UnknownNameError
from prunescope.methods.one_shot import OneShot
from prunescope.pipeline import FinetuneConfig
from prunescope.recipe import DataConfig, PruneConfig, Recipe
from prunescope.train import TrainConfig


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _error(raw: dict, overrides=()) -> str:
    with pytest.raises(ConfigError) as exc:
        recipe.from_dict(raw, overrides)
    message = str(exc.value)
    assert message and "\n" not in message
    return message


# -- the bundled demo recipe -------------------------------------------------------------------

def test_demo_recipe_loads_with_its_documented_values():
    source = resources.files("prunescope") / "recipes" / "demo.yaml"
    with resources.as_file(source) as path:
        demo = recipe.load(path)
    assert demo.name == "demo" and demo.seed == 0 and demo.deterministic is True
    assert demo.data == DataConfig(name="mnist", root=None, val_size=5000)
    assert demo.model.name == "lenet300"
    assert demo.train == TrainConfig(epochs=10, batch_size=128, optimizer="sgd", lr=0.1,
                                     momentum=0.9, nesterov=True, weight_decay=1e-4,
                                     lr_schedule="cosine")
    assert [m.label for m in demo.prune.methods] == [
        "magnitude+global", "magnitude+uniform", "random+uniform", "random+erk", "random+igq",
        "snip+global", "grasp+global", "synflow+global", "woodfisher+global", "sparsegpt+global",
    ]
    assert demo.prune.sparsities == (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
    assert (demo.prune.batches, demo.prune.batch_size, demo.prune.start) == (10, 100, "trained")
    assert demo.finetune == FinetuneConfig(epochs=2, batch_size=128, lr=0.01, weight_decay=1e-4)


def test_missing_sections_take_their_defaults():
    loaded = recipe.from_dict({"data": {"name": "digits"}})
    assert loaded == Recipe(data=DataConfig(name="digits"))
    assert loaded.prune is None and loaded.finetune is None


def test_load_reads_a_yaml_file(tmp_path):
    loaded = recipe.load(write_recipe(tmp_path / "r.yaml"))
    assert loaded.name == "tiny" and loaded.data.val_size == 100
    assert loaded.train.epochs == 2 and loaded.finetune.epochs == 1
    assert [m.label for m in loaded.prune.methods] == ["magnitude+global", "random+erk"]


def test_an_empty_file_is_the_default_recipe(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert recipe.load(tmp_path / "empty.yaml") == Recipe()


def test_int_is_accepted_where_a_float_is_expected():
    loaded = recipe.from_dict(recipe_dict(train={"lr": 1}))
    assert loaded.train.lr == 1.0 and isinstance(loaded.train.lr, float)


@pytest.mark.parametrize(("text", "value"), [("1e-3", 0.001), ("5E-4", 5e-4), ("1e30", 1e30),
                                             ("2.5e+1", 25.0)])
def test_exponent_floats_that_yaml_reads_as_strings_are_numbers(tmp_path, text, value):
    (tmp_path / "r.yaml").write_text(f"data: {{name: digits}}\ntrain: {{lr: {text}}}\n")
    assert recipe.load(tmp_path / "r.yaml").train.lr == value
    assert recipe.from_dict({}, [f"train.weight_decay={text}"]).train.weight_decay == value


def test_a_negative_exponent_float_is_refused_as_a_number():
    assert "train.lr must be a positive number" in _error({}, ["train.lr=-1e-3"])


def test_label_names_pattern_and_effective():
    method = OneShot(criterion="magnitude", allocation="global", pattern="2:4", effective=True)
    assert method.label == "magnitude+global+2:4+effective"


# -- unknown keys, syntax, missing files ---------------------------------------------------------

def test_unknown_top_level_key_lists_the_valid_keys():
    message = _error(recipe_dict(epochs=3))
    assert "'epochs'" in message
    for name in _field_names(Recipe):
        assert name in message


def test_unknown_nested_key_names_its_path_and_lists_the_valid_keys():
    message = _error(recipe_dict(train={"epochs": 2, "learning_rate": 0.1}))
    assert "train.learning_rate" in message
    for name in _field_names(TrainConfig):
        assert name in message


def test_unknown_key_inside_a_method_is_reported():
    raw = recipe_dict()
    raw["prune"]["methods"][1]["sparsity"] = 0.5
    message = _error(raw)
    assert "prune.methods[1].sparsity" in message
    for name in _field_names(OneShot):
        assert name in message


def test_invalid_yaml_is_a_config_error_with_the_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\nseed: 1\ntrain: epochs: 2\n")
    with pytest.raises(ConfigError) as exc:
        recipe.load(tmp_path / "bad.yaml")
    assert "line 3" in str(exc.value) and "bad.yaml" in str(exc.value)


def test_a_recipe_that_is_not_text_is_a_config_error(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"name: \xff\xfe\x00\x81 binary\n")
    with pytest.raises(ConfigError, match="binary.yaml"):
        recipe.load(tmp_path / "binary.yaml")


def test_missing_recipe_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        recipe.load(tmp_path / "nope.yaml")


def test_a_directory_is_not_a_recipe(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        recipe.load(tmp_path)


@pytest.mark.parametrize("top", ["[1, 2]", "just text", "3"])
def test_top_level_must_be_a_mapping(tmp_path, top):
    (tmp_path / "r.yaml").write_text(top + "\n")
    with pytest.raises(ConfigError, match="mapping"):
        recipe.load(tmp_path / "r.yaml")


# -- types ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("section", "key", "value", "where"), [
    ("train", "epochs", "ten", "train.epochs"),
    (None, "seed", 1.5, "seed"),
    ("prune", "sparsities", 0.9, "prune.sparsities"),
    ("train", "batch_size", True, "train.batch_size"),
    ("finetune", "epochs", False, "finetune.epochs"),
    (None, "deterministic", 1, "deterministic"),
    ("train", "lr", "fast", "train.lr"),
    ("data", "val_size", 10.5, "data.val_size"),
    ("prune", "methods", {"criterion": "magnitude"}, "prune.methods"),
    ("prune", "batches", None, "prune.batches"),
])
def test_wrong_types_name_the_key(section, key, value, where):
    raw = recipe_dict()
    (raw if section is None else raw[section])[key] = value
    message = _error(raw)
    assert where in message


def test_a_section_that_is_not_a_mapping_is_refused():
    assert "train" in _error(recipe_dict(train=[1, 2]))


# -- --set overrides -------------------------------------------------------------------------------

def test_override_replaces_a_value():
    assert recipe.from_dict(recipe_dict(), ["train.epochs=5"]).train.epochs == 5


def test_override_parses_its_value_as_yaml():
    loaded = recipe.from_dict(recipe_dict(), ["prune.sparsities=[0.5, 0.9]", "seed=3",
                                             "prune.methods=[{criterion: snip, allocation: igq}]"])
    assert loaded.prune.sparsities == (0.5, 0.9) and loaded.seed == 3
    assert loaded.prune.methods == (OneShot(criterion="snip", allocation="igq"),)


def test_override_adds_a_new_key_to_an_existing_section():
    raw = recipe_dict(data={"name": "digits"})
    assert recipe.from_dict(raw, ["data.val_size=50"]).data.val_size == 50


def test_override_creates_a_missing_section():
    loaded = recipe.from_dict(recipe_dict(finetune=None), ["finetune.epochs=3"])
    assert loaded.finetune == FinetuneConfig(epochs=3)  # the fine-tuning defaults: lr 0.01


def test_later_overrides_win():
    assert recipe.from_dict(recipe_dict(), ["seed=1", "seed=2"]).seed == 2


@pytest.mark.parametrize("item", ["noequals", "=3", " =3"])
def test_malformed_override_is_a_config_error(item):
    assert "key.path=value" in _error(recipe_dict(), [item])


def test_override_of_an_unknown_key_is_refused():
    assert "train.epoch" in _error(recipe_dict(), ["train.epoch=3"])


def test_override_through_a_scalar_is_refused():
    assert "not a section" in _error(recipe_dict(), ["seed.value=3"])


def test_override_with_invalid_yaml_value_is_refused():
    assert "not valid YAML" in _error(recipe_dict(), ["prune.sparsities=[0.5"])


# -- names and ranges ---------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "bad", "choices"), [
    ("model.name=resnet9000", "resnet9000", models.names),
    ("data.name=imagenet22k", "imagenet22k", data.names),
    ("prune.methods=[{criterion: psychic}]", "psychic", CRITERIA.names),
    ("prune.methods=[{allocation: lottery}]", "lottery", ALLOCATIONS.names),
])
def test_unknown_names_list_the_choices(override, bad, choices):
    with pytest.raises(UnknownNameError) as exc:
        recipe.from_dict(recipe_dict(), [override])
    message = str(exc.value)
    assert repr(bad) in message and "\n" not in message
    for name in choices():
        assert name in message


def test_unknown_pattern_lists_the_valid_forms():
    message = _error(recipe_dict(), ["prune.methods=[{pattern: diagonal}]"])
    assert "diagonal" in message and "unstructured" in message and "N:M" in message


@pytest.mark.parametrize("sparsities", [[1.0], [-0.1], [0.5, 1.5], [0.5, float("nan")]])
def test_sparsities_outside_zero_one_are_refused(sparsities):
    message = _error(recipe_dict(), [f"prune.sparsities={sparsities}".replace("nan", ".nan")])
    assert "prune.sparsities" in message


def test_override_sparsities_outside_zero_one_are_refused():
    raw = recipe_dict()
    raw["prune"]["methods"][0]["overrides"] = {"classifier.0.*": 1.0}
    assert "classifier.0.*" in _error(raw)


@pytest.mark.parametrize(("override", "word"), [
    ("prune.sparsities=[]", "must not be empty"), ("prune.methods=[]", "must not be empty"),
    ("prune.start=halfway", "prune.start"), ("prune.batches=0", "prune.batches"),
    ("train.lr=0", "train.lr"), ("finetune.optimizer=adam", "adamw"),
    ("train.label_smoothing=1.0", "label_smoothing"),
])
def test_out_of_range_values_are_refused(override, word):
    assert word in _error(recipe_dict(), [override])


# -- saving ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    recipe_dict(),
    recipe_dict(prune=None, finetune=None),
    {"name": "rich", "seed": 4, "deterministic": False,
     "data": {"name": "digits", "root": "/data", "val_size": 0},
     "train": {"milestones": [3, 6], "lr_schedule": "step", "optimizer": "adamw",
               "label_smoothing": 0.1, "lr": 1e-30},
     "prune": {"methods": [{"criterion": "synflow", "rounds": 3, "effective": True,
                            "overrides": {"classifier.0.*": 0.5}},
                           {"criterion": "magnitude", "pattern": "2:4"}],
               "include": ["classifier.*"], "exclude": ["*.bias"], "start": "init"}},
])
def test_dump_round_trips_to_an_equal_recipe(raw):
    original = recipe.from_dict(raw)
    text = recipe.dump(original)
    assert recipe.from_dict(yaml.safe_load(text)) == original
    assert recipe.dump(recipe.from_dict(yaml.safe_load(text))) == text


def test_dump_writes_plain_yaml_lists():
    text = recipe.dump(recipe.from_dict(recipe_dict()))
    assert "!!python" not in text
    assert yaml.safe_load(text)["prune"]["sparsities"] == [0.5, 0.9]


def test_loaded_recipe_is_frozen():
    loaded = recipe.from_dict(recipe_dict())
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.seed = 3  # type: ignore[misc]
    assert isinstance(loaded.prune, PruneConfig)


def test_robust_distillation_on_sparse_kernels_is_refused_before_anything_runs():
    raw = recipe_dict(distill={"teacher": "dense", "robust": True},
                      finetune={"epochs": 1, "sparse_kernels": True})
    with pytest.raises(ConfigError, match="finetune.sparse_kernels"):
        recipe.from_dict(raw)
