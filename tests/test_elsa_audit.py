"""The audit of every ELSA level at once (issue 13, item 3): each level its own population of
compressed models of the one dense network, grouped in the report beside the separately
trained populations at the same sparsities."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from test_audit_fixtures import synthetic_predictions

from prunescope import checkpoint, experiment, nested, recipe
from prunescope.audit import build
from prunescope.audit.schema import AuditResult, NestedLevel, NestedNetwork
from prunescope.report import render

LEVELS = [0.9, 0.5, 0.0]
GMP = {"method": "gmp", "start": 0, "end": 1, "every": 5, "unit": "epochs"}
ELSA = {"method": "elsa", "levels": LEVELS, "level_epochs": [1, 1], "top": GMP}
RECIPE = {
    "name": "tiny-elsa-audit", "seed": 0,
    "data": {"name": "digits", "val_size": 100}, "model": {"name": "lenet300"},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.05},
    "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
    "prune": {"methods": [ELSA, GMP], "sparsities": [0.5, 0.9]},
    "audit": {"seeds": 2, "methods": [ELSA, GMP], "sparsities": [0.5, 0.9], "bootstrap": 0},
}
RECIPE_FILE = Path(__file__).resolve().parent.parent / "recipes" / "elsa-audit.yaml"


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """A finished run of :data:`RECIPE`: the sweep, the seed-1 populations and the audit."""
    out = tmp_path_factory.mktemp("elsa-audit") / "run"
    experiment.run(recipe.from_dict(copy.deepcopy(RECIPE)), out, progress=False)
    return out


@pytest.fixture(scope="module")
def audit(out) -> AuditResult:
    return AuditResult.from_json((out / "audit.json").read_text())


def test_every_level_is_its_own_population_with_its_sparsity(out, audit):
    blocks = {block.label: block for block in audit.populations}
    assert set(blocks) == {"elsa s=0.9", "elsa s=0.5", "elsa s=0", "gmp s=0.5", "gmp s=0.9"}
    for level in LEVELS:
        block = blocks[f"elsa s={level:g}"]
        assert (block.method, block.sparsity, block.k) == ("elsa", level, 2)
        assert {Path(m.run) for m in block.models} == {
            out / "elsa" / f"s{level:g}", out / "populations" / "seed1" / "elsa" / f"s{level:g}"}
        assert block.direct_sparsity == pytest.approx(level, abs=1e-4)  # each model's mask


def test_each_audited_level_is_exactly_that_level_of_the_nested_checkpoint(out):
    for seed_dir in (out, out / "populations" / "seed1"):
        path = seed_dir / "elsa" / "nested.safetensors"
        for level in LEVELS:
            state = checkpoint.load(seed_dir / "elsa" / f"s{level:g}" / "model.safetensors")
            assert state.meta["method"] == {"method": "elsa", "sparsity": level,
                                            "levels": LEVELS}
            model, _ = nested.load_at_level(path, level)
            deployed = model.state_dict()
            assert set(deployed) == set(state.model)
            assert all(torch.equal(deployed[k], state.model[k]) for k in deployed), level
    top = checkpoint.load(out / "elsa" / "top" / "s0.9" / "model.safetensors").model
    level = checkpoint.load(out / "elsa" / "s0.9" / "model.safetensors").model
    assert all(torch.equal(top[k], level[k]) for k in top)  # the top sparsifier's model


def test_the_grouping_lists_every_level_beside_the_separate_populations(audit):
    assert audit.nested == [NestedNetwork("elsa", [
        NestedLevel(0.9, "elsa s=0.9", ["gmp s=0.9"]),
        NestedLevel(0.5, "elsa s=0.5", ["gmp s=0.5"]),
        NestedLevel(0.0, "elsa s=0", ["dense"])])]


def test_the_report_table_shows_each_level_and_its_gap(out, audit):
    page = (out / "report.html").read_text()
    section = page[page.index("<h2>Levels of one dense network"):page.index("<h2>Noise floor")]
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", row)
            for row in re.findall(r"<tr>(.*?)</tr>", section) if "<td" in row]
    blocks = {b.label: b for b in [audit.dense, *audit.populations]}
    assert [row[:2] for row in rows] == [["0.9", "elsa s=0.9"], ["0.5", "elsa s=0.5"],
                                         ["0", "elsa s=0"]]
    assert [row[8] for row in rows] == ["gmp s=0.9", "gmp s=0.5", "dense"]
    for row in rows:
        gap = blocks[row[1]].accuracy.mean - blocks[row[8]].accuracy.mean
        assert row[-1] == f"{100 * gap:+.2f}"
        assert row[3] == f"{100 * blocks[row[1]].accuracy.mean:.1f}%"


def nested_member(label: str, sparsity: float, seed: int, levels=None):
    member = synthetic_predictions(seed=10 + seed, accuracy=0.85, groups=False,
                                   run=f"{label}-{sparsity}-{seed}")
    method = {"label": label, "sparsity": sparsity, **({"levels": levels} if levels else {})}
    member.meta.update(method=method, seed=seed)
    return member


def test_a_level_the_audit_lacks_is_listed_as_not_audited():
    dense = [synthetic_predictions(seed=s, accuracy=0.95, groups=False) for s in range(2)]
    compressed = [nested_member("elsa", 0.9, s, [0.9, 0.5, 0.0]) for s in range(2)]
    compressed += [nested_member("gmp", 0.9 + 1e-12, s) for s in range(2)]
    compressed += [nested_member("magnitude", 0.5, s) for s in range(2)]
    result = AuditResult.from_json(build(dense, compressed, n_boot=0).to_json())
    assert result.nested == [NestedNetwork("elsa", [
        NestedLevel(0.9, "elsa s=0.9", ["gmp s=0.9"]),
        NestedLevel(0.5, None, ["magnitude s=0.5"]),
        NestedLevel(0.0, None, ["dense"])])]
    assert re.search(r"<td[^>]*>0.5</td><td[^>]*>not audited</td>", render(result))


def test_an_audit_without_nested_populations_keeps_its_layout():
    dense = [synthetic_predictions(seed=s, accuracy=0.95, groups=False) for s in range(2)]
    result = build(dense, [nested_member("gmp", 0.9, s) for s in range(2)], n_boot=0)
    assert result.nested is None and "nested" not in json.loads(result.to_json())
    assert "Levels of one dense network" not in render(result)


def test_the_recipe_audits_elsa_levels_at_gmps_sparsities():
    loaded = recipe.load(RECIPE_FILE)
    assert loaded.data.name == "digits"
    plan = dict((m.method, s) for m, s in experiment.audit_plan(loaded))
    elsa = next(m for m in loaded.audit.methods if m.method == "elsa")
    assert plan == {"elsa": (0.98,), "gmp": (0.9, 0.95, 0.98)}
    assert set(elsa.levels) == {*plan["gmp"], 0.0}
