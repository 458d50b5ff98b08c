"""Checkpoint-level operations behind ``prunescope prune``, ``transfer`` and ``evaluate``.

Each builds a :class:`~prunescope.run.Run` from the checkpoint's own record of its model and
dataset, and ``prune`` and ``transfer`` go through the one compression pipeline
(:func:`prunescope.pipeline.compress`) inside a stage (:mod:`prunescope.stages`): the output
directory is reused only for the same request on the same source checkpoint, resumed when
unfinished, and refused, naming the option that differs, when it holds another finished one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from torch import nn

from prunescope import checkpoint, data, devices, stages
from prunescope.errors import CheckpointError, ConfigError
from prunescope.keys import key_fields
from prunescope.mask import Mask
from prunescope.pipeline import FINETUNE, PruneSpec, compress
from prunescope.run import Run, Scoring, Stopwatch, Targets, registry_model, sparsity_report

logger = logging.getLogger(__name__)


def load_checkpoint(path: Path, data_root: str | None = None
                    ) -> tuple[nn.Module, Mask, dict[str, Any], data.Splits]:
    """Model, mask (from the file, else the model's zeros), metadata and the run's dataset."""
    model, mask, meta = _load_model(path)
    source = meta.get("data")
    if not source:
        raise CheckpointError(f"{path} does not say which dataset it was trained on")
    splits = data.from_spec(source, data_root)
    return model, mask, meta, splits


def _load_model(path: Path) -> tuple[nn.Module, Mask, dict[str, Any]]:
    """The checkpoint's registry model, its mask (from the file, else the zeros) and metadata."""
    state = checkpoint.load(path)
    model = checkpoint.build_model(state, path)
    return model, state.mask if state.mask is not None else Mask.from_weights(model), state.meta


def _run(splits: data.Splits, spec: dict[str, Any], out: Path, data_spec: dict[str, Any], *,
         seed: int, device: str | None, progress: bool | None,
         targets: Targets | None = None) -> Run:
    """A run of the model ``spec`` (a checkpoint's), sized for ``splits``, writing into
    ``out``."""
    return Run(splits, _factory(spec, splits), out, seed=seed,
               device=devices.resolve(device), progress=progress, data_spec=data_spec,
               scoring=Scoring(), targets=targets or Targets())


def _factory(spec: dict[str, Any], splits: data.Splits):
    """A factory of the checkpoint's architecture for ``splits``' classes and input (a
    transfer changes them)."""
    if spec.get("source") == "huggingface":
        sized = {**spec, "num_labels": splits.num_classes}
        return lambda: checkpoint.from_spec(sized)
    return registry_model(spec["name"], splits)


def sparsity_summary(model: nn.Module, mask: Mask) -> dict[str, Any]:
    """Direct (``sparsity``) and effective sparsity, globally and per tensor."""
    report = sparsity_report(model, mask)
    return {"sparsity": report.pop("actual_sparsity"), **report}


def evaluate_checkpoint(path: Path, split: str = "test", data_root: str | None = None, *,
                        sparse_kernels: bool = False, device: str | None = None,
                        level: float | None = None) -> dict[str, Any]:
    """Accuracy, loss and sparsity of a checkpoint on one split of its dataset, on ``device``;
    with ``sparse_kernels`` the pass runs on the sparse layers measured faster (the choice is
    logged) and ``seconds`` and ``sparse_layers`` are added. ``level`` picks a level of a
    nested checkpoint (:mod:`prunescope.nested`; required for one, refused for any other)."""
    from prunescope.train import evaluate

    model, mask, splits, extra = _load_for_evaluation(path, data_root, level)
    summary = sparsity_summary(model, mask)
    model.to(devices.resolve(device))
    subset = getattr(splits, split)
    if sparse_kernels:
        from prunescope import kernels

        plan = kernels.to_sparse(model, mask, subset.x[:1000], training=False, log=logger.info)
        extra["sparse_layers"] = plan.swapped
    start = time.perf_counter()
    scores = evaluate(model, subset)
    if sparse_kernels:
        extra["seconds"] = time.perf_counter() - start
    return {"checkpoint": str(path), "split": split, **scores, **summary, **extra}


def _load_for_evaluation(path: Path, data_root: str | None, level: float | None
                         ) -> tuple[nn.Module, Mask, data.Splits, dict[str, Any]]:
    """Model, mask, dataset and the result's extra fields (``level``) of a checkpoint, or of
    one level of a nested checkpoint."""
    from prunescope import nested

    if not nested.is_nested(path):
        if level is not None:
            raise CheckpointError(f"{path} is not a nested checkpoint, so it has no levels; "
                                  "--level needs the nested.safetensors of an elsa run")
        model, mask, _, splits = load_checkpoint(path, data_root)
        return model, mask, splits, {}
    if level is None:
        raise ConfigError(f"{path} is a nested checkpoint holding levels "
                          f"{nested.describe(nested.levels_of(path))}; pick one with --level")
    model, mask = nested.load_at_level(path, level)
    source = nested.read_meta(path).get("data")
    if not source:
        raise CheckpointError(f"{path} does not say which dataset it was trained on")
    splits = data.from_spec(source, data_root)
    return model, mask, splits, {"level": level}


def prune_checkpoint(path: Path, out: Path, *, criterion: str = "magnitude",
                     allocation: str = "global", sparsity: float | None,
                     pattern: str = "unstructured", effective: bool = False,
                     finetune_epochs: int = 0, lr: float | None = None,
                     bn_recalibration: int = 0, sparse_kernels: bool = False,
                     min_density: float | None = None, data_root: str | None = None,
                     progress: bool | None = None, seed: int = 0,
                     device: str | None = None) -> dict[str, Any]:
    """Prune a checkpoint (weights it already pruned stay pruned), optionally recalibrate
    batch norm on ``bn_recalibration`` batches and fine-tune ``finetune_epochs`` with the mask
    held (0: no fine-tuning), and write ``out/{mask,model}.safetensors`` and
    ``out/result.json``. ``sparse_kernels`` fine-tunes on the sparse layers measured faster
    (:mod:`prunescope.kernels.training`). The defaults are the pipeline's
    (:mod:`prunescope.pipeline`)."""
    if finetune_epochs < 0 or bn_recalibration < 0:
        raise ConfigError("--finetune-epochs and --bn-recalibration must be >= 0")
    finetune = (replace(FINETUNE, epochs=finetune_epochs, lr=FINETUNE.lr if lr is None else lr,
                        sparse_kernels=sparse_kernels) if finetune_epochs else None)
    spec = PruneSpec(criterion, allocation, pattern, effective=effective)
    model, start, meta, splits = load_checkpoint(path, data_root)
    run = _run(splits, meta["model"], out, meta.get("data") or {}, seed=seed, device=device,
               progress=progress, targets=Targets(min_density=min_density))
    model.to(run.device)
    spec.check(run, model, sparsity)
    fields = {"criterion": criterion, "allocation": allocation, "pattern": pattern,
              "source": str(path)}
    # keyed as Run.key keys configs: fields added later stay out while at their default, so a
    # stage written before they existed is still reused on resume; the alias is the key
    # prunescope wrote before (every field, those at their default too)
    key = {"source": stages.source_key(path), **key_fields(spec), "sparsity": sparsity,
           "bn_recalibration": bn_recalibration, "min_density": min_density, "seed": seed,
           "finetune": key_fields(finetune) if finetune else None}
    recorded = asdict(finetune) if finetune else None  # every field, as the result records it
    alias = {**key, "finetune": recorded}

    def compute() -> list[dict[str, Any]]:
        watch = Stopwatch(run)
        result = compress(run, model, out, spec=spec, sparsity=sparsity, start=start,
                          bn_batches=bn_recalibration, finetune=finetune, fields=fields,
                          desc="fine-tune")
        return [{**_as_summary(result), "finetune": recorded, "seconds": watch.seconds()}]

    return stages.run([out], key, compute, aliases=[alias])[0]


def transfer_checkpoint(path: Path, dataset: str, out: Path, *, epochs: int | None = None,
                        lr: float | None = None, sparse_kernels: bool = False,
                        data_root: str | None = None, progress: bool | None = None,
                        seed: int = 0, device: str | None = None) -> dict[str, Any]:
    """Sparse transfer: fine-tune a sparse checkpoint on ``dataset`` with its mask held.

    As in sparse transfer learning (Iofinova et al. 2022, "How Well Do Sparse ImageNet Models
    Transfer?"; Kurtic et al. 2022), the model is rebuilt for the target's classes and input;
    every layer whose tensors all fit (names and shapes) is copied from the checkpoint and keeps
    its mask, the others (a classifier head for another number of classes, an input layer for
    other channels or sizes) start from a fresh initialisation, bias included, and train dense.
    Writes the run to ``out`` (resumable, like any fit) and ``out/result.json``. ``epochs`` and
    ``lr`` default to the pipeline's fine-tuning defaults. ``sparse_kernels`` trains on the
    sparse layers measured faster. Raises ConfigError when no pruned tensor fits the target
    model.
    """
    epochs = FINETUNE.epochs if epochs is None else epochs
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1 for a transfer, got {epochs}")
    config = replace(FINETUNE, epochs=epochs, lr=FINETUNE.lr if lr is None else lr,
                     sparse_kernels=sparse_kernels)
    source, source_mask, meta = _load_model(path)
    splits = data.load(dataset, root=data_root, seed=seed)
    data_spec = {"name": dataset, "root": data_root, "val_size": None, "seed": seed}
    run = _run(splits, meta["model"], out, data_spec, seed=seed, device=device,
               progress=progress)
    model = run.fresh_model()
    fresh, trained = model.state_dict(), source.state_dict()
    misfits = {_module_of(n) for n, t in fresh.items()
               if n not in trained or trained[n].shape != t.shape}
    copied = [n for n in fresh if _module_of(n) not in misfits]
    model.load_state_dict({**fresh, **{n: trained[n] for n in copied}})
    kept = {n: keep for n, keep in source_mask.items() if n in copied}
    if not kept:
        raise ConfigError(
            f"none of the pruned layers of {path} fits {meta['model']['name']} built for "
            f"{dataset} ({splits.num_classes} classes, input {tuple(splits.input_shape)}); "
            "transfer to a dataset with the same input shape"
        )
    mask = Mask(kept)
    fields = {"transfer_from": str(path), "source_data": meta.get("data"),
              "reinitialised": sorted(set(fresh) - set(copied)), "dataset": dataset,
              "transferred": len(copied)}
    key = {"source": stages.source_key(path), "dataset": dataset, "data_root": data_root,
           "seed": seed, "train": key_fields(config)}  # as in prune_checkpoint
    recorded = asdict(config)  # every field, as the result records it
    alias = {**key, "train": recorded}

    def compute() -> list[dict[str, Any]]:
        watch = Stopwatch(run)
        result = compress(run, model, out, spec=None, sparsity=None, start=mask,
                          finetune=config, fields=fields, desc="transfer")
        return [{**_as_summary(result), "train": recorded, "seconds": watch.seconds()}]

    return stages.run([out], key, compute, aliases=[alias])[0]


def _as_summary(result: dict[str, Any]) -> dict[str, Any]:
    """A pipeline result with ``actual_sparsity`` named ``sparsity`` (the commands' key)."""
    result = dict(result)
    result["sparsity"] = result.pop("actual_sparsity")
    return result


def _module_of(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]
