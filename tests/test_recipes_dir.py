"""Every recipe shipped in recipes/ (and the demo's) loads and runs end to end on tiny data."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from prunescope import recipe
from prunescope.cli import main

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
TINY = ["data.name=digits", "data.val_size=100", "train.epochs=1", "finetune.epochs=1"]


def test_there_is_a_recipe_per_method():
    from prunescope.methods import METHODS

    loaded = [recipe.load(path) for path in RECIPES]
    assert {m.method for r in loaded for m in r.prune.methods} == set(METHODS.names())


def test_there_is_a_recipe_per_criterion_and_allocation():
    loaded = [recipe.load(path) for path in RECIPES]
    methods = [m for r in loaded for m in r.prune.methods if m.method == "one_shot"]
    from prunescope.allocation import ALLOCATIONS
    from prunescope.criteria import CRITERIA

    assert {m.criterion for m in methods} == set(CRITERIA.names())
    assert {m.allocation for m in methods} == set(ALLOCATIONS.names())
    assert any(m.pattern == "2:4" for m in methods)
    assert any(m.pattern.startswith("block:") for m in methods)


def test_demo_recipe_is_the_documented_main_job():
    with resources.as_file(resources.files("prunescope") / "recipes" / "demo.yaml") as path:
        demo = recipe.load(path)
    assert (demo.data.name, demo.model.name) == ("mnist", "lenet300")
    assert demo.prune.sparsities == (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
    assert [m.label for m in demo.prune.methods] == [
        "magnitude+global", "magnitude+uniform", "random+uniform", "random+erk", "random+igq",
        "snip+global", "grasp+global", "synflow+global", "woodfisher+global", "sparsegpt+global",
    ]


def _tiny_hub(tmp_path) -> list[str]:
    """Overrides running a Hugging Face recipe on a tiny BERT and a few dozen tweets."""
    from hub_helpers import tiny_model, tiny_tweets

    folder = tiny_model(tmp_path / "model")
    csv = tiny_tweets(tmp_path / "tweets.csv", 60)
    return [f"model.path={folder}", f"data.root={csv}", "data.val_size=9", "data.max_length=10",
            "data.train_size=null", "data.test_size=null", "train.epochs=1", "finetune.epochs=1",
            "audit.seeds=2", "audit.bootstrap=10"]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_on_tiny_data(path, tmp_path, capsys):
    hub = recipe.load(path).model.source == "huggingface"
    overrides = _tiny_hub(tmp_path) if hub else list(TINY)
    sparsities = recipe.load(path).prune.sparsities
    overrides.append(f"prune.sparsities=[{sparsities[-1]}]")
    args = ["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    methods = recipe.load(path).prune.methods
    assert len(results["runs"]) == sum(len(m.sparsities or [sparsities[-1]])
                                       * m.results_per_sparsity for m in methods)
    for run in results["runs"]:
        effective = "effective" in run["method"]
        reached = run["effective_sparsity"] if effective else run["actual_sparsity"]
        assert abs(reached - run["sparsity"]) < 0.01
        if hub:  # effective sparsity is not defined for a transformer
            assert run["effective_sparsity"] is None
            continue
        assert run["effective_sparsity"] >= run["actual_sparsity"] - 1e-9
