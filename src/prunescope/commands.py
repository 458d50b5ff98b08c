"""Checkpoint-level operations behind ``prunescope prune``, ``transfer`` and ``evaluate``."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunescope import checkpoint, data, models
from prunescope.bn import recalibrate_bn
from prunescope.errors import CheckpointError, ConfigError
from prunescope.files import write_json
from prunescope.mask import Mask
from prunescope.methods.base import sparsity_report
from prunescope.sparsifier import MaskHold, prune
from prunescope.train import FINAL, TrainConfig, evaluate, fit

SCORING_BATCHES, SCORING_BATCH_SIZE = 10, 100


def load_checkpoint(path: Path, data_root: str | None = None
                    ) -> tuple[nn.Module, Mask, dict[str, Any], data.Splits]:
    """Model, mask (from the file, else the model's zeros), metadata and the run's dataset."""
    model, mask, meta = _load_model(path)
    source = meta.get("data")
    if not source:
        raise CheckpointError(f"{path} does not say which dataset it was trained on")
    splits = data.load(source["name"], root=data_root or source.get("root"),
                       val_size=source.get("val_size"), seed=source.get("seed", 0))
    return model, mask, meta, splits


def _load_model(path: Path) -> tuple[nn.Module, Mask, dict[str, Any]]:
    """The checkpoint's registry model, its mask (from the file, else the zeros) and metadata."""
    state = checkpoint.load(path)
    model = checkpoint.build_model(state, path)
    return model, state.mask if state.mask is not None else Mask.from_weights(model), state.meta


def sparsity_summary(model: nn.Module, mask: Mask) -> dict[str, Any]:
    """Direct (``sparsity``) and effective sparsity, globally and per tensor."""
    report = sparsity_report(model, mask)
    return {"sparsity": report.pop("actual_sparsity"), **report}


def evaluate_checkpoint(path: Path, split: str = "test", data_root: str | None = None, *,
                        sparse_kernels: bool = False) -> dict[str, Any]:
    """Accuracy, loss and sparsity of a checkpoint on one split of its dataset; with
    ``sparse_kernels`` the pass runs on the sparse layers measured faster (the choice is printed
    to stderr) and ``seconds`` and ``sparse_layers`` are added."""
    model, mask, _, splits = load_checkpoint(path, data_root)
    summary = sparsity_summary(model, mask)
    subset = getattr(splits, split)
    extra: dict[str, Any] = {}
    if sparse_kernels:
        from prunescope import kernels

        plan = kernels.to_sparse(model, mask, subset.x[:1000], training=False,
                                 log=lambda text: print(text, file=sys.stderr))
        extra["sparse_layers"] = plan.swapped
    start = time.perf_counter()
    scores = evaluate(model, subset)
    if sparse_kernels:
        extra["seconds"] = time.perf_counter() - start
    return {"checkpoint": str(path), "split": split, **scores, **summary, **extra}


def prune_checkpoint(path: Path, out: Path, *, criterion: str, allocation: str,
                     sparsity: float | None, pattern: str = "unstructured",
                     effective: bool = False, finetune_epochs: int = 0, lr: float = 0.01,
                     bn_recalibration: int = 0, sparse_kernels: bool = False,
                     data_root: str | None = None,
                     progress: bool | None = None, seed: int = 0) -> dict[str, Any]:
    """Prune a checkpoint (weights it already pruned stay pruned), optionally recalibrate
    batch norm on ``bn_recalibration`` batches and fine-tune with the mask held, and write
    ``out/{mask,model}.safetensors`` and ``out/result.json``. ``sparse_kernels`` fine-tunes on
    the sparse layers measured faster (:mod:`prunescope.kernels.training`)."""
    if finetune_epochs < 0 or bn_recalibration < 0:
        raise ConfigError("--finetune-epochs and --bn-recalibration must be >= 0")
    config = TrainConfig(epochs=finetune_epochs, lr=lr, sparse_kernels=sparse_kernels)
    model, start, meta, splits = load_checkpoint(path, data_root)
    generator_seed = meta.get("data", {}).get("seed", seed)
    loader = data.Loader(splits.train, SCORING_BATCH_SIZE, shuffle=True,
                         generator=torch.Generator().manual_seed(generator_seed))
    batches = [b for b, _ in zip(loader, range(max(SCORING_BATCHES, bn_recalibration)),
                                 strict=False)]
    mask = prune(model, criterion, allocation, sparsity, batches[:SCORING_BATCHES],
                 pattern=pattern, mask=start if start.sparsity > 0 else None,
                 effective=effective, seed=seed)
    recalibrate_bn(model, batches[:bn_recalibration])
    before = evaluate(model, splits.test)["accuracy"]
    run_meta = {"model": meta.get("model"), "data": meta.get("data"),
                "method": {"criterion": criterion, "allocation": allocation, "pattern": pattern,
                           "sparsity": mask.sparsity, "source": str(path)}}
    out.mkdir(parents=True, exist_ok=True)
    mask.save(out / "mask.safetensors")
    if finetune_epochs:
        fit(model, splits, config, out, hook=MaskHold(mask), seed=seed, meta=run_meta,
            progress=progress, desc="fine-tune")
    else:
        checkpoint.save(out / FINAL, model, meta=run_meta, mask=mask)
    result = {**run_meta["method"], "accuracy_before_finetune": before,
              **evaluate(model, splits.test), **sparsity_summary(model, mask),
              "finetune": asdict(config) if finetune_epochs else None}
    write_json(out / "result.json", result)
    return result


def transfer_checkpoint(path: Path, dataset: str, out: Path, *, epochs: int = 2,
                        lr: float = 0.01, sparse_kernels: bool = False,
                        data_root: str | None = None, progress: bool | None = None,
                        seed: int = 0) -> dict[str, Any]:
    """Sparse transfer: fine-tune a sparse checkpoint on ``dataset`` with its mask held.

    As in sparse transfer learning (Iofinova et al. 2022, "How Well Do Sparse ImageNet Models
    Transfer?"; Kurtic et al. 2022), the model is rebuilt for the target's classes and input;
    every layer whose tensors all fit (names and shapes) is copied from the checkpoint and keeps
    its mask, the others (a classifier head for another number of classes, an input layer for
    other channels or sizes) start from a fresh initialisation, bias included, and train dense.
    Writes the run to ``out`` (resumable, like any fit) and ``out/result.json``.
    ``sparse_kernels`` trains on the sparse layers measured faster. Raises ConfigError when no
    pruned tensor fits the target model.
    """
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1 for a transfer, got {epochs}")
    config = TrainConfig(epochs=epochs, lr=lr, sparse_kernels=sparse_kernels)
    source, source_mask, meta = _load_model(path)
    splits = data.load(dataset, root=data_root, seed=seed)
    torch.manual_seed(seed)
    channels, size = splits.input_shape[0], splits.input_shape[-1]
    model = models.build(meta["model"]["name"], num_classes=splits.num_classes,
                         in_channels=channels, image_size=size)
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
    reinitialised = sorted(set(fresh) - set(copied))
    method = {"transfer_from": str(path), "source_data": meta.get("data"),
              "reinitialised": reinitialised, "sparsity": mask.sparsity}
    run_meta = {"model": checkpoint.model_spec(model, splits.num_classes),
                "data": {"name": dataset, "root": data_root, "val_size": None, "seed": seed},
                "method": method}
    out.mkdir(parents=True, exist_ok=True)
    fit(model, splits, config, out, hook=MaskHold(mask), seed=seed, meta=run_meta,
        progress=progress, desc="transfer")
    result = {**method, "dataset": dataset, "transferred": len(copied),
              **evaluate(model, splits.test), **sparsity_summary(model, mask),
              "train": asdict(config)}
    write_json(out / "result.json", result)
    return result


def _module_of(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]
