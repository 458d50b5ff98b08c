"""What every method shares: its config base class and the run context with stage helpers."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunescope import checkpoint, data, distributed, models
from prunescope.allocation import check_sparsity
from prunescope.connectivity import effective_mask
from prunescope.errors import ConfigError
from prunescope.files import write_json
from prunescope.mask import Mask
from prunescope.registry import Registry
from prunescope.train import FINAL, LossFn, TrainConfig, evaluate, fit

if TYPE_CHECKING:
    from prunescope.recipe import Recipe

RESULT = "result.json"
UNITS = ("epochs", "steps", "fraction")  # fraction: of the (budget-scaled) training length
METHODS: Registry[type[Method]] = Registry("method")


def register(name: str):
    """Class decorator registering a method config under ``name`` (its ``method:`` key)."""
    return METHODS.register(name)


@dataclass(frozen=True)
class Method:
    """Fields every method has: ``name`` overrides its label in results, ``sparsities``
    overrides the recipe's list, ``budget`` scales the training length (1x, 2x, 5x; Evci et
    al. 2020 show sparse networks are under-trained on dense schedules)."""

    method: str = ""
    name: str | None = None
    sparsities: tuple[float, ...] | None = None
    budget: float = 1.0

    def __post_init__(self) -> None:
        if not self.budget > 0 or not math.isfinite(self.budget):
            raise ConfigError(f"{self.method}: budget must be a positive number, got {self.budget}")
        for value in self.sparsities or ():
            check_sparsity(value, f"{self.method}: each of sparsities")

    @property
    def label(self) -> str:
        """The name used in results and run directories."""
        if self.name:
            return self.name
        return self.default_label() + (f"-{self.budget:g}x" if self.budget != 1 else "")

    def default_label(self) -> str:
        return self.method

    results_per_sparsity = 1  # entries ``run`` returns per sparsity (controls add some)

    def check(self, context: Context, sparsities: tuple[float, ...]) -> None:
        """Raise the error this method would meet, before anything trains (default: none)."""

    def run(self, context: Context, sparsities: tuple[float, ...]) -> list[dict[str, Any]]:
        """One result per sparsity (more for methods with controls); finished stages are read
        back from their ``result.json``. By default :meth:`run_one` for each sparsity."""
        return [self.run_one(context, sparsity) for sparsity in sparsities]

    def run_one(self, context: Context, sparsity: float) -> dict[str, Any]:
        """The result at one sparsity (methods that use the default :meth:`run`)."""
        raise NotImplementedError


def train_from_scratch(context: Context, method: Method, sparsity: float,
                       make_hook: Callable[[nn.Module], Any]) -> dict[str, Any]:
    """The sparse-training stage: a fresh model trained on the method's budget under the hook
    ``make_hook(model)`` builds, into ``OUT/<label>/s<sparsity>``, with the hook's final mask
    in the result (read back when the stage has finished)."""
    directory = run_dir(context, method.label, sparsity)
    if (done := context.cached(directory)) is not None:
        return done
    started = time.perf_counter()
    model = context.fresh_model()
    hook = make_hook(model)
    fields = {"method": method.label, "sparsity": sparsity}
    context.fit(model, directory, context.train_config(method.budget), hook=hook,
                desc=f"{method.label} s={sparsity:g}", method=fields)
    return context.finish(directory, model, hook.mask, started, **fields)


def check_unit(method: str, unit: str) -> None:
    if unit not in UNITS:
        raise ConfigError(f"{method}: unit must be one of {UNITS}, got {unit!r}")


@dataclass
class Context:
    """A recipe being run: data, output directory and the helpers every stage uses."""

    recipe: Recipe
    splits: data.Splits
    out: Path
    progress: bool | None = None
    log: Callable[[str], None] = print

    # -- sizes and configs ----------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.splits.train) / self.recipe.train.batch_size)

    def total_steps(self, budget: float = 1.0) -> int:
        """Optimizer steps of the recipe's training scaled by ``budget``."""
        return self.train_config(budget).epochs * self.steps_per_epoch

    def steps(self, value: float, unit: str, budget: float = 1.0) -> int:
        """``value`` in ``unit`` as optimizer steps: epochs and steps are scaled by ``budget``;
        a fraction is of the budget-scaled training length."""
        if unit == "fraction":
            return round(value * self.total_steps(budget))
        per = self.steps_per_epoch if unit == "epochs" else 1
        return round(value * per * budget)

    def train_config(self, budget: float = 1.0, base: TrainConfig | None = None) -> TrainConfig:
        """The recipe's training config (or ``base``) with its epochs scaled by ``budget``."""
        base = base or self.recipe.train
        return dataclasses.replace(base, epochs=max(1, round(base.epochs * budget)))

    # -- models -----------------------------------------------------------------------------
    def fresh_model(self, seed: int | None = None) -> nn.Module:
        """A newly initialised model (from the recipe's seed unless ``seed`` is given)."""
        return build_model(self.recipe, self.splits, seed)

    def dense_model(self) -> nn.Module:
        """The trained dense model of this run (``dense/model.safetensors``)."""
        return self.load(self.out / "dense" / FINAL)

    def load(self, path: Path) -> nn.Module:
        model = self.fresh_model()
        checkpoint.load_model_state(model, checkpoint.load(path).model, path)
        return model

    def meta(self, model: nn.Module, **extra: Any) -> dict[str, Any]:
        """Checkpoint metadata: how to rebuild the model and reload the data."""
        return {"model": checkpoint.model_spec(model, self.splits.num_classes),
                "data": {"name": self.recipe.data.name, "root": self.recipe.data.root,
                         "val_size": self.recipe.data.val_size, "seed": self.recipe.seed},
                **extra}

    # -- data -------------------------------------------------------------------------------
    def batches(self, count: int, batch_size: int, seed_offset: int = 0
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``count`` shuffled training batches (the same for every method)."""
        generator = torch.Generator().manual_seed(self.recipe.seed + seed_offset)
        loader = data.Loader(self.splits.train, batch_size, shuffle=True, generator=generator)
        return [batch for batch, _ in zip(loader, range(count), strict=False)]

    def scoring_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        prune = self.recipe.prune
        return self.batches(prune.batches, prune.batch_size) if prune else []

    # -- training -----------------------------------------------------------------------------
    def loss_fn(self) -> LossFn | None:
        """Distillation from the recipe's teacher, if it names one (``dense``: this run's own
        dense model)."""
        config = self.recipe.distill
        if config is None:
            return None
        from prunescope.distill import DistillationLoss, load_teacher

        path = self.out / "dense" / FINAL if config.teacher == "dense" else config.teacher
        teacher = load_teacher(path, self.splits.num_classes)
        return DistillationLoss(teacher, temperature=config.temperature, weight=config.weight,
                                label_smoothing=self.recipe.train.label_smoothing)

    def fit(self, model: nn.Module, run_dir: Path, config: TrainConfig, *, hook=None,
            desc: str, **meta: Any) -> dict[str, Any]:
        """Train with the recipe's seed, loss and progress settings; checkpoints in run_dir."""
        return fit(model, self.splits, config, run_dir, hook=hook, loss_fn=self.loss_fn(),
                   seed=self.recipe.seed, meta=self.meta(model, **meta),
                   progress=self.progress, desc=desc)

    # -- results ----------------------------------------------------------------------------
    def cached(self, run_dir: Path) -> dict[str, Any] | None:
        """The stage's result when it already finished."""
        path = run_dir / RESULT
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def scores(self, model: nn.Module) -> dict[str, float]:
        """Test accuracy and loss, validation accuracy."""
        batch = self.recipe.train.eval_batch_size
        test = evaluate(model, self.splits.test, batch)
        return {"accuracy": test["accuracy"], "loss": test["loss"],
                "val_accuracy": evaluate(model, self.splits.val, batch)["accuracy"]}

    def finish(self, run_dir: Path, model: nn.Module, mask: Mask | None, started: float,
               **fields: Any) -> dict[str, Any]:
        """Evaluate, measure sparsity, write ``result.json`` last (the stage is then done)."""
        result = {**fields, **(sparsity_report(model, mask) if mask is not None else {}),
                  **self.scores(model), "seconds": time.perf_counter() - started}
        write_json(run_dir / RESULT, result)
        distributed.barrier()
        return result


def build_model(recipe: Recipe, splits: data.Splits, seed: int | None = None) -> nn.Module:
    """The recipe's model sized for the dataset, initialised from ``seed`` (default: the
    recipe's)."""
    torch.manual_seed(recipe.seed if seed is None else seed)
    channels, size = splits.input_shape[0], splits.input_shape[-1]
    return models.build(recipe.model.name, num_classes=splits.num_classes,
                        in_channels=channels, image_size=size)


def sparsity_report(model: nn.Module, mask: Mask) -> dict[str, Any]:
    """Direct and effective sparsity, globally and per tensor."""
    effective = effective_mask(model, mask)
    per_layer = effective.sparsities()
    return {"actual_sparsity": mask.sparsity, "effective_sparsity": effective.sparsity,
            "layers": {n: {"direct": s, "effective": per_layer[n]}
                       for n, s in mask.sparsities().items()}}


def run_dir(context: Context, label: str, sparsity: float | None = None) -> Path:
    """``OUT/<label>[/s<sparsity>]`` (``:`` of N:M becomes ``-``)."""
    path = context.out / label.replace(":", "-")
    return path / f"s{sparsity:g}" if sparsity is not None else path


def generator_state(generator: torch.Generator) -> str:
    """A generator's state as JSON-able text (for a hook's ``state_dict``)."""
    import base64

    return base64.b64encode(generator.get_state().numpy().tobytes()).decode()


def restore_generator(generator: torch.Generator, text: str | None) -> None:
    """Inverse of :func:`generator_state` (nothing to do for ``None``)."""
    import base64

    if text:
        raw = bytearray(base64.b64decode(text))
        generator.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())
