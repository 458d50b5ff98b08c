"""Running a recipe: train the dense baseline, then every method at its sparsities.

Each stage reads and writes files in the run directory, so each can be resumed and a finished
stage is skipped when the same recipe runs again::

    OUT/config.yaml                      the resolved recipe
    OUT/dense/{init,last,model}.safetensors, metrics.jsonl, result.json
    OUT/<method label>/s<sparsity>/...   each method's runs (see prunescope.methods)
    OUT/results.json                     dense + one entry per method and sparsity
    OUT/accuracy_vs_sparsity.png         the plot
    OUT/populations/, audit.json, report.html   with an ``audit`` section (prunescope.audit)

Everything a recipe could get wrong (names, ranges, a pattern that does not fit the model, a
schedule that does not fit the training, a teacher for other classes, an unavailable
distributed backend) is checked before the first file is written.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunescope import checkpoint, data, distributed
from prunescope import recipe as recipes
from prunescope.errors import ConfigError
from prunescope.files import atomic_write_bytes, write_json
from prunescope.methods import Context, Method
from prunescope.methods.base import build_model as _build_model
from prunescope.recipe import Recipe
from prunescope.train import fit

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    if distributed.is_writer():
        print(message, file=sys.stderr, flush=True)


def run(recipe: Recipe, out: str | Path, *, progress: bool | None = None,
        log: Log = _stderr) -> dict[str, Any]:
    """Run ``recipe`` into ``out`` (resuming whatever is there) and return ``results.json``."""
    out = Path(out)
    distributed.setup(recipe.distributed.backend)
    torch.use_deterministic_algorithms(recipe.deterministic)
    splits = load_data(recipe)
    context = Context(recipe, splits, out, progress, log)
    preflight(context)  # before claiming ``out``: a bad recipe leaves nothing behind
    _claim(out, recipe)
    log(f"data: {splits.name}, {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test" + (f"; {distributed.world_size()} processes"
                                      if distributed.active() else ""))
    dense = train_dense(recipe, splits, out / "dense", progress, log)
    runs: list[dict[str, Any]] = []
    plan = _plan(recipe)
    total = sum(len(sparsities) * m.results_per_sparsity for m, sparsities in plan)
    for method, sparsities in plan:
        for result in method.run(context, sparsities):
            runs.append(result)
            log(f"[{len(runs)}/{total}] {_summary(result)}")
    results = {"recipe": recipe.name, "dataset": recipe.data.name, "model": recipe.model.name,
               "dense": dense, "runs": runs}
    write_json(out / "results.json", results)
    if runs:
        from prunescope.plots import plot_accuracy_vs_sparsity

        plot_accuracy_vs_sparsity(results, out / "accuracy_vs_sparsity.png")
    if recipe.audit is not None:  # populations, then OUT/audit.json and OUT/report.html
        from prunescope.audit.populations import audit_recipe

        audit_recipe(recipe, out, splits=splits, progress=progress, log=log)
    distributed.barrier()
    return results


def preflight(context: Context) -> None:
    """Raise what the recipe would fail on, before any training."""
    distill = context.recipe.distill
    if distill is not None and distill.teacher != "dense":
        context.loss_fn()  # loads the teacher: a missing file or other classes fails here
    for method, sparsities in _plan(context.recipe):
        method.check(context, sparsities)
    for method in context.recipe.audit.methods if context.recipe.audit else ():
        method.check(context, context.recipe.audit.sparsities)


def _plan(recipe: Recipe) -> list[tuple[Method, tuple[float, ...]]]:
    if recipe.prune is None:
        return []
    return [(m, m.sparsities or recipe.prune.sparsities) for m in recipe.prune.methods]


def _summary(result: dict[str, Any]) -> str:
    line = f"{result['method']} s={result['sparsity']:g}: test accuracy {result['accuracy']:.4f}"
    if "accuracy_before_finetune" in result:
        line += f" (one-shot {result['accuracy_before_finetune']:.4f})"
    if result.get("dense_accuracy") is not None:
        line += f", its dense model {result['dense_accuracy']:.4f}"
    if "effective_sparsity" in result:
        line += f", effective sparsity {result['effective_sparsity']:.4f}"
    return line


def load_data(recipe: Recipe) -> data.Splits:
    """The recipe's dataset, split with the recipe's seed."""
    return data.load(recipe.data.name, root=recipe.data.root, val_size=recipe.data.val_size,
                     seed=recipe.seed)


def build_model(recipe: Recipe, splits: data.Splits) -> nn.Module:
    """The recipe's model, sized for the dataset, initialised from the recipe's seed."""
    return _build_model(recipe, splits)


def train_dense(recipe: Recipe, splits: data.Splits, run_dir: Path, progress: bool | None,
                log: Log = _stderr) -> dict[str, Any]:
    """Train (or resume, or reuse) the dense baseline; returns its ``result.json``."""
    context = Context(recipe, splits, run_dir.parent, progress, log)
    if (done := context.cached(run_dir)) is not None:
        return done
    model = build_model(recipe, splits)
    if not (run_dir / "init.safetensors").exists():
        checkpoint.save(run_dir / "init.safetensors", model, meta={**context.meta(model),
                                                                   "epoch": 0})
    started = time.perf_counter()
    fit(model, splits, recipe.train, run_dir, seed=recipe.seed, meta=context.meta(model),
        progress=progress, desc="dense")
    result = context.finish(run_dir, model, None, started)
    log(f"dense {recipe.model.name}: test accuracy {result['accuracy']:.4f}")
    return result


def prune_and_finetune(recipe: Recipe, splits: data.Splits, out: Path, method: Method,
                       sparsity: float, progress: bool | None = None) -> dict[str, Any]:
    """One one-shot method at one sparsity (see :class:`prunescope.methods.one_shot.OneShot`)."""
    return method.run(Context(recipe, splits, out, progress, _stderr), (sparsity,))[0]


def _claim(out: Path, recipe: Recipe) -> None:
    """Save the resolved recipe, or check that ``out`` holds a run of the same recipe."""
    text = recipes.dump(recipe)
    config = out / "config.yaml"
    if config.exists() and config.read_text(encoding="utf-8") != text:
        raise ConfigError(
            f"{out} holds a run of a different recipe ({config}); pass another --out, or delete "
            "the directory to start over"
        )
    atomic_write_bytes(config, text.encode())
