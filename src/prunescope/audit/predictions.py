"""Predictions of a run's model on one split, computed once and cached outside the run.

The audit never writes into its input runs (they may be read-only): the cache lives in a cache
directory of its own, by default ``OUT/.cache/predictions`` under the audit's output, one file
per checkpoint content and split, ``<sha256 of the checkpoint>-<split>.safetensors``. It holds
``logits`` (float32 ``[N, C]``), ``labels``,
``index`` (each example's id in its source, :attr:`prunescope.data.Subset.index`) and, where the
dataset has them, ``groups`` (int64 ``[N]``), and the representation metrics of
:mod:`prunescope.audit.representations` (``q_score`` float32 ``[N]``, ``prediction_depth``
int64 ``[N]``, their settings in ``meta["representations"]``), with JSON metadata: the dataset
and split, class and group names, the run's seed and pruning method, the training prevalence
of each class in each group (for bias amplification), the checkpoint's sha256, and the cost
record of :mod:`prunescope.audit.cost`. A changed checkpoint has another sha256, hence another
file; a cache read back names the run it was read for. Reading a cache needs numpy only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prunescope.audit.errors import AuditError

FORMAT = "prunescope.predictions/2"  # 2 added q_score and prediction_depth
CHECKPOINT = "model.safetensors"
META_KEY = "prunescope"


@dataclass(frozen=True, eq=False)
class Predictions:
    """One model's outputs on one split (numpy arrays) and their metadata (see module doc)."""

    logits: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    groups: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    q_score: np.ndarray | None = None
    prediction_depth: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.logits.ndim != 2 or len(self.logits) != n or len(self.index) != n:
            raise AuditError(f"predictions of {self.meta.get('run', 'a run')} are inconsistent "
                             f"(logits {list(self.logits.shape)}, {n} labels, "
                             f"{len(self.index)} ids); delete its predictions/ folder to redo them")
        if self.groups is not None and len(self.groups) != n:
            raise AuditError(f"the group array of {self.meta.get('run', 'a run')} has "
                             f"{len(self.groups)} entries for {n} examples; delete its "
                             "predictions/ folder, or fix the dataset's groups")
        for name in ("q_score", "prediction_depth"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise AuditError(f"the {name} array of {self.meta.get('run', 'a run')} has "
                                 f"{len(values)} entries for {n} examples; delete its cached "
                                 "predictions to recompute them")

    @property
    def predicted(self) -> np.ndarray:
        """The predicted class of each example (first maximum of the logits), or
        :data:`~prunescope.audit.metrics.NO_PREDICTION` where the logits are not finite."""
        from prunescope.audit.metrics import predicted

        return predicted(self.logits)


def cache_path(cache_dir: Path, checkpoint_sha256: str, split: str) -> Path:
    """Where the predictions of a checkpoint (by content) on ``split`` are cached."""
    return Path(cache_dir) / f"{checkpoint_sha256}-{split}.safetensors"


def fingerprint(path: Path) -> str:
    """sha256 of a file (the checkpoint a cache belongs to)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_cached(run_dir: Path, split: str, cache_dir: Path) -> Predictions | None:
    """The cached predictions of ``run_dir``'s current checkpoint on ``split`` in
    ``cache_dir``, or None."""
    checkpoint = Path(run_dir) / CHECKPOINT
    if not checkpoint.is_file():
        return None
    path = cache_path(cache_dir, fingerprint(checkpoint), split)
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = json.loads((handle.metadata() or {}).get(META_KEY, "{}"))
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError):
        return None
    if meta.get("format") != FORMAT or meta.get("split") != split:
        return None
    return Predictions(arrays["logits"], arrays["labels"], arrays["index"],
                       arrays.get("groups"), {**meta, "run": str(run_dir)},
                       arrays.get("q_score"), arrays.get("prediction_depth"))


def save(predictions: Predictions, cache_dir: Path) -> Path:
    """Write ``predictions`` to their cache file in ``cache_dir`` atomically; returns its path."""
    from safetensors.numpy import save as safetensors_bytes

    from prunescope.files import atomic_write_bytes

    arrays = {"logits": predictions.logits, "labels": predictions.labels,
              "index": predictions.index}
    for name in ("groups", "q_score", "prediction_depth"):
        if getattr(predictions, name) is not None:
            arrays[name] = getattr(predictions, name)
    meta = {**predictions.meta, "format": FORMAT}
    data = safetensors_bytes({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                             metadata={META_KEY: json.dumps(meta)})
    path = cache_path(cache_dir, meta["checkpoint_sha256"], meta["split"])
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


def compute(run_dir: Path, split: str, *, data_root: str | None = None,
            splits_cache: dict | None = None) -> Predictions:
    """Run the checkpoint of ``run_dir`` on ``split`` of its dataset (torch), with its cost
    and the representation metrics (:func:`prunescope.audit.representations.compute`, k-NN
    bank drawn from the training split)."""
    from prunescope import checkpoint
    from prunescope.audit import representations
    from prunescope.audit.cost import model_cost
    from prunescope.mask import Mask
    from prunescope.train import predict

    path = Path(run_dir) / CHECKPOINT
    state = checkpoint.load(path)
    model = checkpoint.build_model(state, path)
    mask = state.mask if state.mask is not None else Mask.from_weights(model)
    source = state.meta.get("data") or {}
    splits = load_splits(source, data_root, splits_cache, path)
    subset = _split(splits, split)
    logits = predict(model, subset).numpy().astype(np.float32)
    settings = representations.Settings()
    metrics = representations.compute(model, subset.x, splits.train.x, splits.train.y,
                                      splits.num_classes, settings)
    meta = {
        "run": str(run_dir), "split": split, "dataset": splits.name, "data": source,
        "classes": list(splits.classes), "group_names": list(splits.group_names),
        "seed": source.get("seed"), "method": method_of(state.meta),
        "train_prevalence": _prevalence(splits), "checkpoint_sha256": fingerprint(path),
        "cost": model_cost(model, mask, checkpoint_path=path, input_shape=splits.input_shape),
        "representations": {**settings.as_dict(), "layers": metrics["layers"]},
    }
    groups = None if subset.groups is None else subset.groups.numpy()
    return Predictions(logits, subset.y.numpy(), subset.index.numpy(), groups, meta,
                       metrics["q_score"], metrics["prediction_depth"])


def load_or_compute(run_dir: Path, split: str = "test", *, cache_dir: Path,
                    data_root: str | None = None,
                    splits_cache: dict | None = None) -> tuple[Predictions, bool]:
    """``(predictions, computed)``: the cache in ``cache_dir`` when there is one, else computed
    (and not yet saved: the caller saves with :func:`save` once the audit succeeds)."""
    cached = load_cached(run_dir, split, cache_dir)
    if cached is not None:
        return cached, False
    return compute(run_dir, split, data_root=data_root, splits_cache=splits_cache), True


def load_splits(source: dict, data_root: str | None, cache: dict | None, path: Path):
    """The dataset a checkpoint names (``meta["data"]``), memoised in ``cache``."""
    from prunescope import data
    from prunescope.errors import CheckpointError

    if not source.get("name"):
        raise CheckpointError(f"{path} does not say which dataset it was trained on")
    key = json.dumps({**source, "root": data_root or source.get("root")}, sort_keys=True)
    if cache is not None and key in cache:
        return cache[key]
    splits = data.from_spec(source, data_root)
    if cache is not None:
        cache.clear()  # one dataset at a time: they can be large
        cache[key] = splits
    return splits


def method_of(meta: dict) -> dict | None:
    """``{"label", "sparsity"}`` of a pruned checkpoint's metadata, with ``levels`` for one
    level of a nested network (ELSA); None for a dense one."""
    method = meta.get("method")
    if not method:
        return None
    label = method.get("method") or "+".join(
        part for part in (method.get("criterion"), method.get("allocation"),
                          None if method.get("pattern") in (None, "unstructured")
                          else method.get("pattern")) if part)
    out = {"label": label or "compressed", "sparsity": method.get("sparsity")}
    if method.get("levels"):
        out["levels"] = [float(level) for level in method["levels"]]
    return out


def _split(splits, split: str):
    if split not in ("train", "val", "test"):
        raise AuditError(f"unknown split {split!r}; choose train, val or test")
    return getattr(splits, split)


def _prevalence(splits) -> list[list[float]] | None:
    """``[g][c]``: fraction of class ``c`` among the training examples of group ``g``."""
    groups = splits.train.groups
    if groups is None:
        return None
    out = []
    for g in range(len(splits.group_names)):
        labels = splits.train.y[groups == g].numpy()
        counts = np.bincount(labels, minlength=splits.num_classes)
        out.append((counts / max(len(labels), 1)).tolist())
    return out
