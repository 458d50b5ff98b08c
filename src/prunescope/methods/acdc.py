"""AC/DC: alternating compressed / decompressed training (Peste et al., NeurIPS 2021).

After a dense warm-up, training alternates compressed phases (at each phase start the weights
are pruned to the target sparsity by global magnitude top-k and the mask is held) and
decompressed phases (every weight trains again; pruned ones restart from zero), and ends with a
longer compressed phase (the phases: :class:`prunescope.schedules.Phases`). Optionally the
optimizer's momentum is reset: at the end of every decompressed phase (``after_decompression``,
as the authors' code does when it compresses again) or at every phase change (``every_phase``).
One run yields two models: the final sparse one and the dense one co-trained with it (the best,
by validation accuracy, of the models at the ends of the decompressed phases).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunescope import checkpoint
from prunescope.allocation import ALLOCATIONS
from prunescope.errors import ConfigError
from prunescope.mask import Mask
from prunescope.methods.base import Method, check_unit, register
from prunescope.run import Run
from prunescope.schedules import Phases
from prunescope.sparsifier import MaskHold, agree, prune
from prunescope.train import evaluate

DENSE = "dense.safetensors"
MOMENTUM_RESETS = ("never", "after_decompression", "every_phase")


class ACDCHook(MaskHold):
    """Training hook: prune at compressed-phase starts, hold the mask during compressed
    phases, train densely otherwise; hands each decompressed phase's end to ``on_dense``."""

    def __init__(self, phases: Phases, sparsity: float, allocation: str, *,
                 reset_momentum: str, on_dense: Callable[[nn.Module, int], None],
                 prune_options: dict[str, Any]) -> None:
        super().__init__(None)
        self.phases, self.sparsity, self.allocation = phases, sparsity, allocation
        self.reset_momentum, self.on_dense = reset_momentum, on_dense
        self.prune_options = prune_options

    def on_step(self, model: nn.Module, step: int, optimizer=None) -> None:
        if self.phases.starts_compression(step):
            if step > self.phases.warmup:  # the end of a decompressed phase
                self.on_dense(model, step)
            self.mask = agree(model, prune(model, "magnitude", self.allocation, self.sparsity,
                                           rounds=1, **self.prune_options))
        elif not self.phases.is_compressed(step):
            self.mask = None
        if optimizer is not None and self._resets_at(step):
            reset_optimizer_state(optimizer)

    def _resets_at(self, step: int) -> bool:
        if self.reset_momentum == "every_phase":
            return self.phases.starts_phase(step)
        if self.reset_momentum == "after_decompression":
            return self.phases.starts_compression(step) and step > self.phases.warmup
        return False


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero every tensor of the optimizer state (momentum buffers, Adam moments)."""
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                value.zero_()


@register("acdc")
@dataclass(frozen=True)
class ACDC(Method):
    """Phase lengths in ``unit``: epochs, steps, or (the default) fractions of the
    budget-scaled training, by default the paper's ImageNet proportions (10 warm-up epochs,
    5-epoch phases, final 15 of 100: compressed phases start at epochs 10, 20, ..., 70, the
    last dense phase is 75-85); ``reset_momentum``: ``never``, ``after_decompression`` (the
    authors') or ``every_phase``."""

    method: str = "acdc"
    allocation: str = "global"
    warmup: float = 0.1
    compressed: float = 0.05
    decompressed: float = 0.05
    final: float = 0.15
    unit: str = "fraction"
    reset_momentum: str = "never"

    def __post_init__(self) -> None:
        super().__post_init__()
        ALLOCATIONS.get(self.allocation)
        check_unit("acdc", self.unit)
        if self.reset_momentum not in MOMENTUM_RESETS:
            raise ConfigError(f"acdc: reset_momentum must be one of {', '.join(MOMENTUM_RESETS)},"
                              f" got {self.reset_momentum!r}")

    def phases(self, run: Run, sparsity: float = 0.0) -> Phases:
        steps = [run.steps(v, self.unit, self.budget)
                 for v in (self.warmup, self.compressed, self.decompressed, self.final)]
        return Phases(*steps, total=run.total_steps(self.budget), sparsity=sparsity)

    def check(self, run: Run, sparsities: tuple[float, ...]) -> None:
        self.phases(run)

    def run_one(self, run: Run, sparsity: float) -> list[dict[str, Any]]:
        directory = self.directories(run, sparsity)[0]
        model = run.fresh_model()
        best = _BestDense(run, directory)
        hook = ACDCHook(self.phases(run, sparsity), sparsity, self.allocation,
                        reset_momentum=self.reset_momentum, on_dense=best,
                        prune_options=run.targets.options())
        fields = {"method": self.label, "sparsity": sparsity}
        directory.mkdir(parents=True, exist_ok=True)
        run.fit(model, directory, run.train_config(self.budget), hook=hook,
                desc=f"{self.label} s={sparsity:g}", method=fields)
        mask = hook.mask if hook.mask is not None else Mask.from_weights(model)
        return [run.result(model, mask, **fields, **best.accuracy())]


class _BestDense:
    """Keeps the co-trained dense model with the best validation accuracy on disk."""

    def __init__(self, run: Run, directory) -> None:
        self.run, self.path = run, directory / DENSE

    def __call__(self, model: nn.Module, step: int) -> None:
        val = evaluate(model, self.run.splits.val)["accuracy"]
        if self.path.exists() and checkpoint.load(self.path).meta["val_accuracy"] >= val:
            return
        checkpoint.save(self.path, model, meta=self.run.meta(model, step=step, val_accuracy=val))

    def accuracy(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"dense_accuracy": None}
        scores = self.run.scores(self.run.load(self.path))
        return {"dense_accuracy": scores["accuracy"], "dense_val_accuracy": scores["val_accuracy"],
                "dense_checkpoint": str(self.path)}
