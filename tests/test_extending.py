"""A new method is one file (issue 15): a registered dataclass with ``run_one(run, sparsity)``
is picked up by recipes, runs through the experiment's stages (reuse, refusal) and needs no
change anywhere else. (New criteria and allocations: tests/test_criteria.py and
tests/test_allocation.py; a new audit metric: tests/test_audit_metrics.py.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from pipeline_helpers import recipe_dict

from prunescope import experiment, recipe
from prunescope.errors import ConfigError
from prunescope.methods import METHODS
from prunescope.methods.base import Method, register
from prunescope.pipeline import PruneSpec, compress
from prunescope.run import Run


@pytest.fixture
def keep_last_layer():
    """A method of our own: magnitude pruning of every layer but the last, no fine-tuning."""

    @register("all_but_last")
    @dataclass(frozen=True)
    class AllButLast(Method):
        method: str = "all_but_last"
        criterion: str = "magnitude"

        def run_one(self, run: Run, sparsity: float) -> list[dict[str, Any]]:
            model = run.load(run.dense_path())
            last = [n for n, p in model.named_parameters() if p.dim() > 1][-1]
            spec = PruneSpec(self.criterion, "global", overrides={last: 0.0})
            return [compress(run, model, self.directories(run, sparsity)[0], spec=spec,
                             sparsity=sparsity, fields={"method": self.label,
                                                        "sparsity": sparsity}, desc=self.label)]

    yield AllButLast
    METHODS.unregister("all_but_last")


def _recipe(**method):
    enabled = torch.are_deterministic_algorithms_enabled()
    loaded = recipe.from_dict(recipe_dict(
        train={"epochs": 1, "batch_size": 64, "lr": 0.05}, finetune=None,
        prune={"methods": [{"method": "all_but_last", **method}], "sparsities": [0.8]}))
    torch.use_deterministic_algorithms(enabled)
    return loaded


def test_a_method_registered_in_one_file_runs_from_a_recipe(keep_last_layer, tmp_path):
    results = experiment.run(_recipe(), tmp_path, progress=False)
    (result,) = results["runs"]
    assert result["method"] == "all_but_last" and result["finetuned"] is False
    assert result["layers"]["classifier.4.weight"]["direct"] == 0.0
    assert result["actual_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert experiment.run(_recipe(), tmp_path, progress=False)["runs"] == [result]  # reused


def test_its_keys_are_checked_and_its_stages_keyed(keep_last_layer, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'prune.methods\\[0\\].rate'"):
        _recipe(rate=0.5)
    experiment.run(_recipe(), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="criterion"):
        experiment.run(_recipe(criterion="random"), tmp_path, progress=False)
