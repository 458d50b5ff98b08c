"""Running a recipe: the dense baseline, then every method at its sparsities, then the audit.

This is the only layer that reads a recipe. It builds one :class:`~prunescope.run.Run` from
it (:func:`run_for`), hands each method its own config and that run, and wraps every unit of
work in a stage (:mod:`prunescope.stages`) that reuses a finished result of the same key,
resumes an unfinished one and refuses to mix configurations::

    OUT/config.yaml                      the resolved recipe of the last run
    OUT/dense/{init,last,model}.safetensors, metrics.jsonl, stage.json, result.json
    OUT/<method label>/method.json       the method's config (its shared files depend on it)
    OUT/<method label>/s<sparsity>/...   each method's stages (see prunescope.methods)
    OUT/results.json                     dense + one entry per method and sparsity
    OUT/accuracy_vs_sparsity.png         the plot
    OUT/populations/seed<s>/...          with an ``audit`` section: the other seeds' runs
    OUT/populations/threads<n>/dense     with ``audit.threads``: the seed's dense model
                                         trained under ``torch.set_num_threads(n)``
    OUT/audit.json, OUT/report.html      the compression audit (prunescope.audit)
    OUT/tensorboard/                     with ``log.tensorboard: true``

Everything a recipe could get wrong (names, ranges, a pattern that does not fit the model, a
schedule that does not fit the training, a teacher for other classes, a device or distributed
backend that is not there, a directory holding a finished run of another configuration) is
checked before the first file is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from prunescope import checkpoint, data, devices, distributed, stages
from prunescope import recipe as recipes
from prunescope.errors import ConfigError
from prunescope.files import atomic_write_bytes, write_json
from prunescope.logs import TensorBoardLogger
from prunescope.methods import Method
from prunescope.recipe import PruneConfig, Recipe
from prunescope.run import INIT, Run, Scoring, Stopwatch, Targets, registry_model
from prunescope.train import FINAL

POPULATIONS = "populations"
METHOD_KEY = "method.json"
logger = logging.getLogger(__name__)


def run(recipe: Recipe, out: str | Path, *, progress: bool | None = None) -> dict[str, Any]:
    """Run ``recipe`` into ``out`` (reusing and resuming what is there) and return
    ``results.json``."""
    out = Path(out)
    device = devices.resolve(recipe.device)
    distributed.setup(recipe.distributed.backend, device)
    torch.use_deterministic_algorithms(recipe.deterministic)
    main = run_for(recipe, out, progress=progress)
    preflight(recipe, main)  # before writing anything: a bad recipe leaves nothing behind
    distributed.barrier()  # every process has checked before rank 0 writes
    atomic_write_bytes(out / "config.yaml", recipes.dump(recipe).encode())
    if recipe.log.tensorboard and distributed.is_writer():
        main.metrics_logger = TensorBoardLogger(out / "tensorboard")
    splits = main.splits
    logger.info("data: %s, %d train / %d val / %d test%s; device %s", splits.name,
                len(splits.train), len(splits.val), len(splits.test),
                f"; {distributed.world_size()} processes" if distributed.active() else "",
                main.device)
    try:
        results = sweep(recipe, main)
        if recipe.audit is not None:
            audit_stage(recipe, main)
    finally:
        if main.metrics_logger is not None:
            main.metrics_logger.close()
    distributed.barrier()
    return results


def run_for(recipe: Recipe, out: Path, *, progress: bool | None = None,
            splits: data.Splits | None = None) -> Run:
    """The :class:`Run` of ``recipe`` in ``out`` (its data loaded unless ``splits`` is given)."""
    splits = splits or load_data(recipe)
    prune = recipe.prune or PruneConfig()
    device = distributed.local_device(devices.resolve(recipe.device))
    return Run(splits, model_factory(recipe, splits), out, train=recipe.train,
               finetune=recipe.finetune, scoring=Scoring(prune.batches, prune.batch_size),
               targets=Targets(prune.include, prune.exclude, prune.min_density),
               seed=recipe.seed, device=device, distill=recipe.distill, progress=progress,
               data_spec=data_spec(recipe))


def data_spec(recipe: Recipe) -> dict[str, Any]:
    """The recipe's data spec; a text dataset for a Hugging Face model tokenises with the
    model's own tokenizer unless ``data.tokenizer`` names another."""
    spec = recipe.data.spec(recipe.seed)
    hub_model = recipe.model.source == "huggingface"
    if hub_model and "tokenizer" not in spec and data.takes_option(spec["name"], "tokenizer"):
        spec["tokenizer"] = recipe.model.path
    return spec


def load_data(recipe: Recipe) -> data.Splits:
    """The recipe's dataset, split with the recipe's seed."""
    return data.from_spec(data_spec(recipe))


def model_factory(recipe: Recipe, splits: data.Splits):
    """A factory of the recipe's model sized for ``splits``: a zoo model, or a Hugging Face
    model with a head for the data's classes (the data must be text for it, images for the
    zoo)."""
    model = recipe.model
    if model.source == "zoo":
        if splits.is_text:
            raise ConfigError(f"dataset {splits.name!r} is text; zoo models classify images: "
                              "use model.source huggingface")
        return registry_model(model.name, splits)
    from prunescope.hub.models import build, make_spec

    if not splits.is_text:
        raise ConfigError(f"a Hugging Face {model.task} model needs a text dataset, and "
                          f"{splits.name!r} holds images; pick tweets or text-csv")
    if model.num_labels is not None and model.num_labels != splits.num_classes:
        raise ConfigError(f"model.num_labels is {model.num_labels} but {splits.name!r} has "
                          f"{splits.num_classes} classes; set num_labels to "
                          f"{splits.num_classes} or leave it out")
    spec = make_spec(model.path, splits.num_classes, model.task)
    return lambda: build(spec)


def plan(recipe: Recipe) -> list[tuple[Method, tuple[float, ...]]]:
    """Every method of the sweep with its sparsities."""
    if recipe.prune is None:
        return []
    return [(m, m.sparsities or recipe.prune.sparsities) for m in recipe.prune.methods]


def audit_plan(recipe: Recipe) -> list[tuple[Method, tuple[float, ...]]]:
    """Every method of the audit's populations with the sparsities it runs at (its
    :meth:`~prunescope.methods.Method.audit_sparsities`: the audit's own, or ELSA's top level,
    whose one run yields every level)."""
    if recipe.audit is None:
        return []
    return [(m, m.audit_sparsities(recipe.audit.sparsities)) for m in recipe.audit.methods]


def preflight(recipe: Recipe, run: Run) -> None:
    """Raise what the recipe would fail on, before any training or writing."""
    if run.distill is not None and run.distill.teacher != "dense":
        run.loss_fn()  # loads the teacher: a missing file or other classes fails here
    audit = audit_plan(recipe)
    for method, sparsities in [*plan(recipe), *audit]:
        method.check(run, sparsities)
    stages.check([run.out / "dense"], dense_key(run))
    for n in recipe.audit.threads if recipe.audit else ():
        stages.check([thread_dir(run.out, n) / "dense"], {**dense_key(run), "threads": n})
    key = run.key()
    for method, sparsities in [*plan(recipe), *audit]:
        _check_method_dir(run, method)
        for sparsity in sparsities:
            stages.check(method.directories(run, sparsity), stage_key(key, method, sparsity))


def sweep(recipe: Recipe, run: Run) -> dict[str, Any]:
    """The dense stage, every method at every sparsity, ``results.json`` and the plot."""
    dense = dense_stage(run)
    runs: list[dict[str, Any]] = []
    steps = plan(recipe)
    total = sum(len(sparsities) * m.results_per_sparsity for m, sparsities in steps)
    key = run.key()
    for method, sparsities in steps:
        for sparsity in sparsities:
            for result in method_stage(run, method, sparsity, key):
                runs.append(result)
                run.log.info("[%d/%d] %s", len(runs), total, summary(result))
    results = {"recipe": recipe.name, "dataset": recipe.data.name, "model": recipe.model.label,
               "dense": dense, "runs": runs}
    write_json(run.out / "results.json", results)
    if runs:
        from prunescope.plots import plot_accuracy_vs_sparsity

        plot_accuracy_vs_sparsity(results, run.out / "accuracy_vs_sparsity.png")
    return results


# -- stages ---------------------------------------------------------------------------------
def dense_key(run: Run) -> dict[str, Any]:
    """What determines the dense model: data, model, seed and training."""
    key = run.key()
    return {name: key[name] for name in ("data", "model", "seed", "train")}


def stage_key(run_key: dict[str, Any], method: Method, sparsity: float) -> dict[str, Any]:
    """What determines a method's results at one sparsity."""
    return {**run_key, "method": method.key(), "sparsity": sparsity}


def dense_stage(run: Run, extra_key: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or resume, or read back) the dense baseline; returns its result. ``extra_key``
    joins the stage key (e.g. the thread count of a thread population member)."""
    directory = run.out / "dense"

    def train() -> list[dict[str, Any]]:
        watch = Stopwatch(run)
        model = run.fresh_model()
        if not (directory / INIT).exists():
            checkpoint.save(directory / INIT, model, meta=run.meta(model, epoch=0))
        run.fit(model, directory, run.train, desc="dense", distill=False)
        return [{**run.result(model, None), "seconds": watch.seconds()}]

    result = stages.run([directory], {**dense_key(run), **(extra_key or {})}, train)[0]
    run.log.info("dense: test accuracy %.4f", result["accuracy"])
    return result


def method_stage(run: Run, method: Method, sparsity: float,
                 key: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """``method`` at ``sparsity`` on ``run`` (read back when finished with the same key)."""
    _claim_method_dir(run, method)

    def compute() -> list[dict[str, Any]]:
        watch = Stopwatch(run)
        results = method.run_one(run, sparsity)
        seconds = watch.seconds()
        return [{**result, "seconds": seconds} for result in results]

    return stages.run(method.directories(run, sparsity),
                      stage_key(key or run.key(), method, sparsity), compute)


def _check_method_dir(run: Run, method: Method) -> None:
    """Refuse a method directory whose shared files belong to another config of the method."""
    path = run.dir(method.label) / METHOD_KEY
    if path.is_file():
        stages.claim_config(path, method.key(), f"method {method.label!r}")


def _claim_method_dir(run: Run, method: Method) -> None:
    stages.claim_config(run.dir(method.label) / METHOD_KEY, method.key(),
                        f"method {method.label!r}")


def summary(result: dict[str, Any]) -> str:
    """One line of a method's result."""
    line = f"{result['method']} s={result['sparsity']:g}: test accuracy {result['accuracy']:.4f}"
    if "accuracy_before_finetune" in result and result.get("finetuned"):
        line += f" (one-shot {result['accuracy_before_finetune']:.4f})"
    if result.get("dense_accuracy") is not None:
        line += f", its dense model {result['dense_accuracy']:.4f}"
    if result.get("effective_sparsity") is not None:
        line += f", effective sparsity {result['effective_sparsity']:.4f}"
    return line


# -- populations and the audit -----------------------------------------------------------------
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


def train_populations(recipe: Recipe, main: Run) -> tuple[list[Path], list[Path]]:
    """Train (or resume, or reuse) every population member (Hooker et al.: K models that
    differ only in their seed); returns (dense run dirs, compressed run dirs of the audit's
    methods x sparsities, each method's :meth:`~prunescope.methods.Method.audit_directories`:
    every level of ELSA), seed 0 (the sweep's own runs) first."""
    assert recipe.audit is not None
    dense, compressed = [], []
    for offset in range(recipe.audit.seeds):
        member = population_recipe(recipe, offset)
        where = seed_dir(main.out, recipe, offset)
        run = main if offset == 0 else run_for(member, where, progress=main.progress)
        run.metrics_logger = main.metrics_logger if offset == 0 else None
        result = dense_stage(run)
        dense.append(where / "dense")
        line = [f"population seed {member.seed}: dense {result['accuracy']:.4f}"]
        key = run.key()
        for method, sparsities in audit_plan(recipe):
            for sparsity in sparsities:
                done = method_stage(run, method, sparsity, key)
                directories = method.audit_directories(run, sparsity)
                compressed.extend(directories)
                line.extend(f"{method.label} s={result['sparsity']:g} {result['accuracy']:.4f}"
                            for result, _ in zip(done, directories, strict=False))
        main.log.info("; ".join(line))
    return dense, compressed


def thread_dir(out: Path, threads: int) -> Path:
    """Where the thread-count population member trained under ``threads`` threads lives."""
    return out / POPULATIONS / f"threads{threads}"


@contextlib.contextmanager
def num_threads(count: int) -> Iterator[None]:
    """``torch.set_num_threads(count)`` inside the block, the previous count restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_thread_population(recipe: Recipe, main: Run) -> list[Path]:
    """The noise floor's tooling population (Zhuang et al. 2022, on the CPU): one dense model
    per count of ``audit.threads``, each trained as the sweep's dense model (same seed, data,
    initialisation and order) under ``torch.set_num_threads(count)``; returns their run
    dirs. The count is part of each stage's key."""
    assert recipe.audit is not None
    dirs = []
    for count in recipe.audit.threads:
        run = run_for(recipe, thread_dir(main.out, count), progress=main.progress,
                      splits=main.splits)
        with num_threads(count):
            result = dense_stage(run, {"threads": count})
        dirs.append(run.out / "dense")
        main.log.info("thread population: dense %.4f with %d thread(s)", result["accuracy"],
                      count)
    return dirs


def sweep_runs(out: Path) -> list[Path]:
    """The finished compressed runs of the sweep itself (``OUT/<label>/s<sparsity>``; for
    ELSA one per level, its dense level ``s0`` included)."""
    return sorted(p.parent for p in out.glob(f"*/s*/{FINAL}")
                  if p.parent.parent.name not in ("dense", POPULATIONS))


def audit_stage(recipe: Recipe, main: Run) -> Any:
    """Populations, then ``OUT/audit.json`` and ``OUT/report.html`` over the whole sweep plus
    the populations. Skipped (returns None) when both files exist."""
    from prunescope.audit import run_audit

    assert recipe.audit is not None
    out = main.out
    if (out / "audit.json").is_file() and (out / "report.html").is_file():
        logger.info("audit: %s exists; delete it to audit again", out / "audit.json")
        return None
    dense, population = train_populations(recipe, main)
    threads = train_thread_population(recipe, main)
    compressed = list(dict.fromkeys([*sweep_runs(out), *population]))
    return run_audit(dense, compressed, out, split=recipe.audit.split,
                     n_boot=recipe.audit.bootstrap, log=logger.info, threads=threads)
