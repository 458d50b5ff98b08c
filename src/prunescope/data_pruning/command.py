"""``prunescope prune-data``: prune a dataset's training set once, optionally train on it.

Writes ``OUT/config.json`` (the options; another set of options in the same directory is
refused), ``OUT/kept.json`` (positions in the training split and the examples' source ids) and,
unless ``train=False``, the trained model and ``OUT/result.json`` (see
:func:`~prunescope.data_pruning.training.train_on`). Every check runs before anything is
written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunescope.data_pruning.method import DataPruning
from prunescope.data_pruning.select import DataPruningSpec, prune_with
from prunescope.data_pruning.training import train_on
from prunescope.files import write_json
from prunescope.run import Run
from prunescope.stages import claim_config
from prunescope.train import TrainConfig


def prune_data_command(dataset: str, model: str, out: Path, spec: DataPruningSpec,
                       train: TrainConfig, *, seed: int = 0, root: str | None = None,
                       device: str | None = None, fit: bool = True) -> dict[str, Any]:
    """Prune ``dataset``'s training set under ``spec`` into ``out`` and, with ``fit``, train
    ``model`` on it for the protocol's ``E'`` (``E = train.epochs``); returns the record."""
    run = Run.from_dataset(dataset, model, out, root=root, seed=seed, train=train,
                           device=device or "cpu")
    method = DataPruning(**{k: getattr(spec, k) for k in spec.__dataclass_fields__})
    method.check(run, (0.0,))
    out.mkdir(parents=True, exist_ok=True)
    claim_config(out / "config.json", {"run": run.key(), "spec": spec.__dict__, "fit": fit},
                 "prunescope prune-data")
    kept = prune_with(run, spec)
    write_json(out / "kept.json", {"positions": kept.tolist(),
                                   "source_ids": run.splits.train.index[kept].tolist()})
    record: dict[str, Any] = {"label": spec.label, "kept": len(kept),
                              "of": len(run.splits.train)}
    if fit:
        record = {**record, **train_on(run, kept, out / "model", density=spec.density,
                                       desc=spec.label)}
        write_json(out / "result.json", record)
    return record
