"""The :class:`Run`: everything a method needs, built once, and nothing it should not see.

A run holds the data splits, a model factory, the training and fine-tuning configs, the
scoring batches of data-driven criteria, the pruning targets, the output directory, the seed,
the device and a logger. It is built once, from a recipe (:func:`prunescope.experiment.run_for`)
or directly from Python with no YAML::

    run = Run.from_dataset("digits", "lenet300", "runs/mine", train=TrainConfig(epochs=3))
    result = OneShot(criterion="snip").run_one(run, 0.9)[0]

Methods (:mod:`prunescope.methods`) take their own config and a run; they never read a recipe,
and they never decide whether a result can be reused: that is the experiment stages' job
(:mod:`prunescope.stages`). The helpers here are the ones every stage uses: fresh and trained
models, shuffled batches, the loss, ``fit`` with the run's settings, scores and the result
record of a compressed model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunescope import checkpoint, data, devices, models
from prunescope.connectivity import analysable, effective_mask, layer_sparsities
from prunescope.distill import DistillConfig
from prunescope.keys import key_fields
from prunescope.logs import MetricsLogger
from prunescope.mask import Mask
from prunescope.robust_distill import RobustDistillationLoss, check_sparse_kernels
from prunescope.train import FINAL, LossFn, TrainConfig, evaluate, fit, predict

INIT = "init.safetensors"
DENSE = "dense"
UNITS = ("epochs", "steps", "fraction")  # fraction: of the (budget-scaled) training length

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Targets:
    """Which tensors are pruned: ``include`` / ``exclude`` globs over parameter names (default:
    the weights of every Linear and Conv layer, :func:`prunescope.targets.select`), and
    ``min_density``, the per-tensor floor (None: one weight per output unit; 0: none)."""

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    min_density: float | None = None

    def options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`prunescope.prune` and :func:`prunescope.sparsifier.check`."""
        options: dict[str, Any] = {"include": self.include, "exclude": self.exclude}
        if self.min_density is not None:
            options["min_density"] = self.min_density
        return options


@dataclass(frozen=True)
class Scoring:
    """``batches`` shuffled training batches of ``batch_size`` examples feed data-driven criteria
    (SNIP, GraSP, Taylor, OBS); the same for every method of a run."""

    batches: int = 10
    batch_size: int = 100


@dataclass
class Run:
    """One experiment's shared state; see the module docstring.

    ``model`` builds a freshly initialised model (called after the seed is set);
    ``data_spec`` tells checkpoints how to reload the data (``{"name", "root", "val_size",
    "seed"}``; None for data that does not come from :func:`prunescope.data.load`); ``log`` is
    the logger the stages report each result through (training logs per epoch on
    ``prunescope.train``); ``metrics_logger`` receives every epoch's record (TensorBoard).
    """

    splits: data.Splits
    model: Callable[[], nn.Module]
    out: Path
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: TrainConfig | None = None
    scoring: Scoring = field(default_factory=Scoring)
    targets: Targets = field(default_factory=Targets)
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distill: DistillConfig | None = None
    progress: bool | None = None
    data_spec: dict[str, Any] | None = None
    metrics_logger: MetricsLogger | None = None
    log: logging.Logger = logger
    carried_seconds: float = 0.0  # training seconds of earlier (resumed) segments, per stage
    _model_spec: dict[str, Any] | str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.device = devices.resolve(self.device)

    @classmethod
    def from_dataset(cls, dataset: str, model: str | Callable[[], nn.Module], out: str | Path,
                     *, root: str | None = None, val_size: int | None = None, seed: int = 0,
                     **options: Any) -> Run:
        """A run on a registered dataset (split with ``seed``) and a registry model name (sized
        for the data) or a factory of your own."""
        splits = data.load(dataset, root=root, val_size=val_size, seed=seed)
        factory = registry_model(model, splits) if isinstance(model, str) else model
        spec = {"name": dataset, "root": root, "val_size": val_size, "seed": seed}
        return cls(splits, factory, Path(out), seed=seed, data_spec=spec, **options)

    def key(self) -> dict[str, Any]:
        """What determines every result of this run (the stages compare it on resume)."""
        return {"data": self.data_spec or {"name": self.splits.name},
                "model": self._model_key(), "seed": self.seed,
                "train": _training_key(self.train), "finetune": _training_key(self.finetune),
                "scoring": _plain(self.scoring), "targets": _plain(self.targets),
                "distill": self.distill.key() if self.distill is not None else None}

    def _model_key(self) -> dict[str, Any] | str:
        """The registry spec of the run's model (its class name for a model of your own),
        built once on the CPU without touching the global random state."""
        if self._model_spec is None:
            with torch.random.fork_rng(devices=[]):
                probe = self.model()
            self._model_spec = (checkpoint.model_spec(probe, self.splits.num_classes)
                                or type(probe).__name__)
        return self._model_spec

    # -- sizes and configs ----------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.splits.train) / self.train.batch_size)

    def total_steps(self, budget: float = 1.0) -> int:
        """Optimizer steps of the run's training scaled by ``budget``."""
        return self.train_config(budget).epochs * self.steps_per_epoch

    def steps(self, value: float, unit: str, budget: float = 1.0) -> int:
        """``value`` in ``unit`` as optimizer steps: epochs and steps are scaled by ``budget``;
        a fraction is of the budget-scaled training length."""
        if unit == "fraction":
            return round(value * self.total_steps(budget))
        per = self.steps_per_epoch if unit == "epochs" else 1
        return round(value * per * budget)

    def train_config(self, budget: float = 1.0, base: TrainConfig | None = None) -> TrainConfig:
        """The run's training config (or ``base``) with its epochs scaled by ``budget``."""
        base = base or self.train
        return dataclasses.replace(base, epochs=max(1, round(base.epochs * budget)))

    # -- models -----------------------------------------------------------------------------
    def fresh_model(self, seed: int | None = None) -> nn.Module:
        """A newly initialised model (from the run's seed unless ``seed`` is given), on the
        run's device."""
        torch.manual_seed(self.seed if seed is None else seed)
        return self.model().to(self.device)

    def dense_path(self, start: str = "trained") -> Path:
        """The dense stage's trained weights, or its initialisation (``start="init"``)."""
        return self.out / DENSE / (INIT if start == "init" else FINAL)

    def load(self, path: Path) -> nn.Module:
        """A model of this run with the weights of the checkpoint at ``path``."""
        model = self.fresh_model()
        checkpoint.load_model_state(model, checkpoint.load(path).model, path)
        return model

    def dir(self, label: str, sparsity: float | None = None) -> Path:
        """``OUT/<label>[/s<sparsity>]`` (``:`` of N:M becomes ``-``)."""
        path = self.out / label.replace(":", "-")
        return path / f"s{sparsity:g}" if sparsity is not None else path

    def meta(self, model: nn.Module, **extra: Any) -> dict[str, Any]:
        """Checkpoint metadata: how to rebuild the model and reload the data."""
        return {"model": checkpoint.model_spec(model, self.splits.num_classes),
                "data": self.data_spec, **extra}

    # -- data -------------------------------------------------------------------------------
    def batches(self, count: int, batch_size: int, seed_offset: int = 0
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``count`` shuffled training batches (the same for every method)."""
        generator = torch.Generator().manual_seed(self.seed + seed_offset)
        loader = data.Loader(self.splits.train, batch_size, shuffle=True, generator=generator)
        return [batch for batch, _ in zip(loader, range(count), strict=False)]

    def scoring_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches(self.scoring.batches, self.scoring.batch_size)

    # -- training -----------------------------------------------------------------------------
    def loss_fn(self) -> LossFn | None:
        """Distillation from the run's teacher, if it has one (``dense``: this run's own dense
        model); with ``distill.robust`` the worst-class robust objective
        (:mod:`prunescope.robust_distill`; teacher ``none``: no teacher term)."""
        if self.distill is None:
            return None
        from prunescope.distill import NO_TEACHER, DistillationLoss, load_teacher

        teacher = None
        if self.distill.teacher != NO_TEACHER:
            path = self.dense_path() if self.distill.teacher == "dense" else self.distill.teacher
            teacher = load_teacher(path, self.splits.num_classes).to(self.device)
        if self.distill.robust:
            return self._robust_loss(teacher)
        return DistillationLoss(teacher, temperature=self.distill.temperature,
                                weight=self.distill.weight,
                                label_smoothing=self.train.label_smoothing)

    def _robust_loss(self, teacher: nn.Module | None) -> LossFn:
        d = self.distill
        return RobustDistillationLoss(
            teacher, self.splits.num_classes, self.splits.val, temperature=d.temperature,
            weight=d.weight, blend=d.blend, step_size=d.step_size, every=d.every,
            val_batch_size=d.val_batch_size, label_smoothing=self.train.label_smoothing,
            seed=self.seed)

    def fit(self, model: nn.Module, directory: Path, config: TrainConfig, *, hook=None,
            desc: str, distill: bool = True, **meta: Any) -> dict[str, Any]:
        """Train with the run's seed, loss, device and progress settings; checkpoints in
        ``directory`` (resumed when there). ``distill=False`` trains on the labels alone (the
        dense baseline). A robust loss wraps ``hook`` to update and checkpoint its lambda."""
        loss_fn = self.loss_fn() if distill else None
        if isinstance(loss_fn, RobustDistillationLoss):
            check_sparse_kernels(True, config.sparse_kernels)
            hook = loss_fn.hook(hook)
        record = fit(model, self.splits, config, directory, hook=hook,
                     loss_fn=loss_fn, seed=self.seed,
                     meta=self.meta(model, **meta), progress=self.progress, desc=desc,
                     device=self.device, metrics_logger=self.metrics_logger)
        self.carried_seconds += record.get("resumed_seconds", 0.0)
        return record

    # -- results ----------------------------------------------------------------------------
    def scores(self, model: nn.Module) -> dict[str, Any]:
        """Test accuracy, loss and recall of each class (None for a class the test set lacks),
        validation accuracy."""
        batch = self.train.eval_batch_size
        logits = predict(model, self.splits.test, batch)
        labels = self.splits.test.y
        hits = logits.argmax(1) == labels
        recall = [float(hits[labels == c].double().mean()) if bool((labels == c).any())
                  else None for c in range(self.splits.num_classes)]
        return {"accuracy": float(hits.double().mean()) if len(labels) else math.nan,
                "loss": float(F.cross_entropy(logits, labels)) if len(labels) else math.nan,
                "class_recall": recall,
                "val_accuracy": evaluate(model, self.splits.val, batch)["accuracy"]}

    def result(self, model: nn.Module, mask: Mask | None, **fields: Any) -> dict[str, Any]:
        """The result record of a model: ``fields``, its sparsity (with ``mask``) and scores."""
        return {**fields, **(sparsity_report(model, mask) if mask is not None else {}),
                **self.scores(model)}


def registry_model(name: str, splits: data.Splits) -> Callable[[], nn.Module]:
    """A factory of registry model ``name`` sized for ``splits`` (classes, channels, size)."""
    models.MODELS.get(name)
    channels, size = splits.input_shape[0], splits.input_shape[-1]
    return lambda: models.build(name, num_classes=splits.num_classes, in_channels=channels,
                                image_size=size)


def sparsity_report(model: nn.Module, mask: Mask) -> dict[str, Any]:
    """Direct and effective sparsity, globally and per tensor (effective None for a model the
    path analysis does not apply to, :func:`prunescope.connectivity.analysable`)."""
    layers = layer_sparsities(model, mask)
    effective = effective_mask(model, mask).sparsity if analysable(model) else None
    return {"actual_sparsity": mask.sparsity, "effective_sparsity": effective, "layers": layers}


class Stopwatch:
    """Seconds of one stage: this segment's wall time plus the training seconds of earlier,
    interrupted segments that the run's ``fit`` calls resumed."""

    def __init__(self, run: Run) -> None:
        self.run, self.started = run, time.perf_counter()
        run.carried_seconds = 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.started + self.run.carried_seconds


def _training_key(config: Any) -> Any:
    """A training config as key data (:func:`prunescope.keys.key_fields`)."""
    return _plain(key_fields(config) if dataclasses.is_dataclass(config) else config)


def _plain(value: Any) -> Any:
    """A config as JSON-able data (dataclasses as dicts, tuples as lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
