"""Running a recipe: train dense, prune with every method at every sparsity, fine-tune, evaluate.

Each stage reads and writes files in the run directory, so each can be resumed and a finished
stage is skipped when the same recipe runs again::

    OUT/config.yaml                      the resolved recipe
    OUT/dense/{init,last,model}.safetensors, metrics.jsonl, result.json
    OUT/<method>/s<sparsity>/{mask,last,model}.safetensors, metrics.jsonl, result.json
    OUT/results.json                     dense + one entry per method and sparsity
    OUT/accuracy_vs_sparsity.png         the plot
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunescope import checkpoint, data, models
from prunescope import recipe as recipes
from prunescope.connectivity import effective_mask
from prunescope.errors import ConfigError
from prunescope.files import atomic_write_bytes, write_json
from prunescope.mask import Mask
from prunescope.recipe import MethodConfig, Recipe
from prunescope.sparsifier import MaskHold, check, prune
from prunescope.train import FINAL, evaluate, fit

RESULT = "result.json"
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(recipe: Recipe, out: str | Path, *, progress: bool | None = None,
        log: Log = _stderr) -> dict[str, Any]:
    """Run ``recipe`` into ``out`` (resuming whatever is there) and return ``results.json``."""
    out = Path(out)
    torch.use_deterministic_algorithms(recipe.deterministic)
    splits = load_data(recipe)  # before claiming ``out``: a bad recipe leaves nothing behind
    _check_pruning(recipe, splits)
    _claim(out, recipe)
    log(f"data: {splits.name}, {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test")
    dense = train_dense(recipe, splits, out / "dense", progress, log)
    runs = []
    if recipe.prune is not None:
        grid = [(m, s) for m in recipe.prune.methods for s in recipe.prune.sparsities]
        for number, (method, sparsity) in enumerate(grid, 1):
            result = prune_and_finetune(recipe, splits, out, method, sparsity, progress)
            log(f"[{number}/{len(grid)}] {method.label} s={sparsity:g}: accuracy "
                f"{result['accuracy_before_finetune']:.4f} -> {result['accuracy']:.4f}, "
                f"effective sparsity {result['effective_sparsity']:.4f}")
            runs.append(result)
    results = {"recipe": recipe.name, "dataset": recipe.data.name, "model": recipe.model.name,
               "dense": dense, "runs": runs}
    write_json(out / "results.json", results)
    if runs:
        from prunescope.plots import plot_accuracy_vs_sparsity

        plot_accuracy_vs_sparsity(results, out / "accuracy_vs_sparsity.png")
    return results


def load_data(recipe: Recipe) -> data.Splits:
    """The recipe's dataset, split with the recipe's seed."""
    return data.load(recipe.data.name, root=recipe.data.root, val_size=recipe.data.val_size,
                     seed=recipe.seed)


def build_model(recipe: Recipe, splits: data.Splits) -> nn.Module:
    """The recipe's model, sized for the dataset, initialised from the recipe's seed."""
    torch.manual_seed(recipe.seed)
    channels, size = splits.input_shape[0], splits.input_shape[-1]
    return models.build(recipe.model.name, num_classes=splits.num_classes,
                        in_channels=channels, image_size=size)


def _check_pruning(recipe: Recipe, splits: data.Splits) -> None:
    """Fail before training when a pruning method cannot apply to the model."""
    if recipe.prune is None:
        return
    model = build_model(recipe, splits)
    for method in recipe.prune.methods:
        for sparsity in recipe.prune.sparsities:
            check(model, method.criterion, method.allocation, sparsity, pattern=method.pattern,
                  include=recipe.prune.include, exclude=recipe.prune.exclude,
                  overrides=method.overrides)


def train_dense(recipe: Recipe, splits: data.Splits, run_dir: Path, progress: bool | None,
                log: Log) -> dict[str, Any]:
    """Train (or resume, or reuse) the dense model; returns its ``result.json``."""
    if (run_dir / RESULT).exists():
        return _read_json(run_dir / RESULT)
    model = build_model(recipe, splits)
    meta = _meta(recipe, model, splits)
    if not (run_dir / "init.safetensors").exists():
        checkpoint.save(run_dir / "init.safetensors", model, meta={**meta, "epoch": 0})
    started = time.perf_counter()
    fit(model, splits, recipe.train, run_dir, seed=recipe.seed, meta=meta, progress=progress,
        desc="dense")
    result = {**_scores(model, splits, recipe), "seconds": time.perf_counter() - started}
    write_json(run_dir / RESULT, result)
    log(f"dense {recipe.model.name}: test accuracy {result['accuracy']:.4f}")
    return result


def prune_and_finetune(recipe: Recipe, splits: data.Splits, out: Path, method: MethodConfig,
                       sparsity: float, progress: bool | None) -> dict[str, Any]:
    """One method at one sparsity: prune the dense model, fine-tune with the mask held."""
    run_dir = out / run_name(method, sparsity)
    if (run_dir / RESULT).exists():
        return _read_json(run_dir / RESULT)
    assert recipe.prune is not None
    started = time.perf_counter()
    model = _starting_model(recipe, splits, out)
    mask = prune(model, method.criterion, method.allocation, sparsity,
                 data=_scoring_batches(recipe, splits), pattern=method.pattern,
                 include=recipe.prune.include, exclude=recipe.prune.exclude,
                 overrides=method.overrides, rounds=method.rounds, effective=method.effective,
                 seed=recipe.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    mask.save(run_dir / "mask.safetensors")
    before = evaluate(model, splits.test)["accuracy"]
    meta = {**_meta(recipe, model, splits), "method": _method_meta(method, sparsity)}
    if recipe.finetune is not None and recipe.finetune.epochs > 0:
        fit(model, splits, recipe.finetune, run_dir, hook=MaskHold(mask), seed=recipe.seed,
            meta=meta, progress=progress, desc=f"{method.label} s={sparsity:g}")
    else:
        checkpoint.save(run_dir / FINAL, model, meta=meta, mask=mask)
    result = {**_method_meta(method, sparsity), **_sparsity_report(model, mask),
              "accuracy_before_finetune": before, **_scores(model, splits, recipe),
              "seconds": time.perf_counter() - started}
    write_json(run_dir / RESULT, result)
    return result


def run_name(method: MethodConfig, sparsity: float) -> str:
    """Directory of one run, e.g. ``magnitude+global/s0.9`` (``:`` of N:M becomes ``-``)."""
    return f"{method.label.replace(':', '-')}/s{sparsity:g}"


def _starting_model(recipe: Recipe, splits: data.Splits, out: Path) -> nn.Module:
    assert recipe.prune is not None
    source = out / "dense" / (FINAL if recipe.prune.start == "trained" else "init.safetensors")
    model = build_model(recipe, splits)
    checkpoint.load_model_state(model, checkpoint.load(source).model, source)
    return model


def _scoring_batches(recipe: Recipe, splits: data.Splits
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``prune.batches`` shuffled training batches, the same for every method."""
    assert recipe.prune is not None
    generator = torch.Generator().manual_seed(recipe.seed)
    loader = data.Loader(splits.train, recipe.prune.batch_size, shuffle=True, generator=generator)
    return [batch for batch, _ in zip(loader, range(recipe.prune.batches), strict=False)]


def _scores(model: nn.Module, splits: data.Splits, recipe: Recipe) -> dict[str, float]:
    batch = recipe.train.eval_batch_size
    test = evaluate(model, splits.test, batch)
    return {"accuracy": test["accuracy"], "loss": test["loss"],
            "val_accuracy": evaluate(model, splits.val, batch)["accuracy"]}


def _sparsity_report(model: nn.Module, mask: Mask) -> dict[str, Any]:
    effective = effective_mask(model, mask)
    layers = {name: {"direct": direct, "effective": effective.sparsities()[name]}
              for name, direct in mask.sparsities().items()}
    return {"actual_sparsity": mask.sparsity, "effective_sparsity": effective.sparsity,
            "layers": layers}


def _method_meta(method: MethodConfig, sparsity: float) -> dict[str, Any]:
    return {"method": method.label, "criterion": method.criterion,
            "allocation": method.allocation, "pattern": method.pattern, "sparsity": sparsity}


def _meta(recipe: Recipe, model: nn.Module, splits: data.Splits) -> dict[str, Any]:
    return {"model": checkpoint.model_spec(model, splits.num_classes),
            "data": {"name": recipe.data.name, "root": recipe.data.root,
                     "val_size": recipe.data.val_size, "seed": recipe.seed}}


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


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))
