"""K-seed populations of a recipe, and the audit stage of an experiment.

Hooker et al. compare *populations* of independently trained models (30 per sparsity in the
paper) so that what the compressed models lose is told apart from seed-to-seed noise. For a
recipe with an ``audit`` section (:class:`prunescope.recipe.AuditConfig`), seed 0 is the
experiment's own run (``OUT/dense`` and ``OUT/<method>/s<sparsity>``) and seed k = 1..K-1 reruns
the same recipe with ``seed = recipe.seed + k`` (initialisation, validation split, shuffling and
pruning batches all change) through the experiment's own stages::

    OUT/populations/seed<s>/dense/...                 as OUT/dense
    OUT/populations/seed<s>/<method>/s<sparsity>/...  as the sweep's runs

Every stage resumes and is skipped when finished, like the sweep's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from prunescope.audit.predictions import CHECKPOINT
from prunescope.recipe import PruneConfig, Recipe

POPULATIONS = "populations"
Log = Callable[[str], None]


def population_recipe(recipe: Recipe, offset: int) -> Recipe:
    """``recipe`` with its seed moved by ``offset`` and its prune section narrowed to the
    audit's methods and sparsities."""
    assert recipe.audit is not None
    prune = dataclasses.replace(recipe.prune or PruneConfig(), methods=recipe.audit.methods,
                                sparsities=recipe.audit.sparsities)
    return dataclasses.replace(recipe, seed=recipe.seed + offset, prune=prune)


def seed_dir(out: Path, recipe: Recipe, offset: int) -> Path:
    """Where population member ``offset`` lives (``out`` itself for offset 0)."""
    return out if offset == 0 else out / POPULATIONS / f"seed{recipe.seed + offset}"


def train_populations(recipe: Recipe, out: Path, *, splits=None, progress: bool | None = None,
                      log: Log = print) -> tuple[list[Path], list[Path]]:
    """Train (or resume, or reuse) every population member; returns (dense run dirs, compressed
    run dirs of the audit's methods x sparsities), seed 0 first."""
    from prunescope import experiment
    from prunescope.methods.base import Context, run_dir

    assert recipe.audit is not None
    dense, compressed = [], []
    for offset in range(recipe.audit.seeds):
        member = population_recipe(recipe, offset)
        member_splits = splits if offset == 0 and splits is not None else (
            experiment.load_data(member))
        where = seed_dir(out, recipe, offset)
        result = experiment.train_dense(member, member_splits, where / "dense", progress, log)
        dense.append(where / "dense")
        line = [f"population seed {member.seed}: dense {result['accuracy']:.4f}"]
        context = Context(member, member_splits, where, progress, log)
        for method in recipe.audit.methods:
            for sparsity in recipe.audit.sparsities:
                done = experiment.prune_and_finetune(member, member_splits, where, method,
                                                     sparsity, progress)
                compressed.append(run_dir(context, method.label, sparsity))
                line.append(f"{method.label} s={sparsity:g} {done['accuracy']:.4f}")
        log("; ".join(line))
    return dense, compressed


def sweep_runs(out: Path) -> list[Path]:
    """The finished compressed runs of the sweep itself (``OUT/<label>/s<sparsity>``)."""
    return sorted(p.parent for p in out.glob(f"*/s*/{CHECKPOINT}")
                  if p.parent.parent.name not in ("dense", POPULATIONS))


def audit_recipe(recipe: Recipe, out: Path, *, splits=None, progress: bool | None = None,
                 log: Log = print) -> dict | None:
    """The experiment's audit stage: populations, then ``OUT/audit.json`` and
    ``OUT/report.html`` over the whole sweep plus the populations. Skipped (returns None) when
    both files exist."""
    from prunescope.audit.audit import run_audit

    assert recipe.audit is not None
    if (out / "audit.json").is_file() and (out / "report.html").is_file():
        log(f"audit: {out / 'audit.json'} exists; delete it to audit again")
        return None
    dense, population = train_populations(recipe, out, splits=splits, progress=progress, log=log)
    compressed = list(dict.fromkeys([*sweep_runs(out), *population]))
    result = run_audit(dense, compressed, out, split=recipe.audit.split,
                       n_boot=recipe.audit.bootstrap, log=log)
    for line in figures(result):
        log(line)
    return result


def figures(result: dict) -> list[str]:
    """One line per focus population: CIE count and the dense accuracy on CIEs vs the rest."""
    lines = []
    for block in result["populations"]:
        if block["label"] in result["focus"]:
            cie = block["cie"]
            if not cie["count"]:
                lines.append(f"audit {block['label']} ({block['k']} seeds): no CIEs")
                continue
            lines.append(f"audit {block['label']} ({block['k']} seeds): {cie['count']} CIEs "
                         f"({100 * cie['fraction']:.2f}%); dense accuracy on CIEs "
                         f"{100 * cie['dense_accuracy_cie']:.1f}% vs "
                         f"{100 * cie['dense_accuracy_rest']:.1f}% on the rest")
    return lines
