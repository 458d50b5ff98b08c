"""CrAM: compression-aware minimisation, then "train once, prune to many" (Peste, Vladu, Kurtic,
Lampert & Alistarh, ICLR 2023).

Each step takes the gradient ``g`` at the weights ``w``, moves to ``w + rho * g``, compresses
that point (top-k magnitude at a target sparsity, one sampled per step from ``train_sparsities``
for CrAM-Multi, with the same allocation / pattern code as pruning), and takes the gradient
there, masked to the kept weights; the weights return to ``w`` and the optimizer steps with that
gradient, plus ``g`` for CrAM+. Batch-norm statistics are not updated by the compressed pass.
As in the authors' code, ``g`` is not normalised.

After training, the dense model is pruned one-shot to every requested sparsity, its batch-norm
statistics recalibrated on a small calibration set (no fine-tuning), and evaluated, side by side
with the same one-shot pruning of the recipe's SGD-trained dense model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from prunescope.allocation import ALLOCATIONS
from prunescope.errors import ConfigError
from prunescope.hooks import Hook
from prunescope.methods.base import Method, generator_state, register, restore_generator
from prunescope.patterns import parse_pattern
from prunescope.pipeline import PruneSpec, compress
from prunescope.run import Run
from prunescope.sparsifier import prune

SGD_BASELINE = "sgd-one-shot"


@contextmanager
def frozen_bn_statistics(model: nn.Module):
    """Batch norms normalise with the batch but leave their running statistics unchanged."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum


class CrAMHook(Hook):
    """Replaces each step's gradient by CrAM's (see the module docstring); the model stays
    dense, so ``mask`` is None."""

    def __init__(self, sparsities: tuple[float, ...], rho: float, plus: bool, sparse_grad: bool,
                 allocation: str, pattern: str, prune_options: dict[str, Any], seed: int) -> None:
        self.sparsities, self.rho, self.plus, self.sparse_grad = sparsities, rho, plus, sparse_grad
        self.allocation, self.pattern, self.prune_options = allocation, pattern, prune_options
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": generator_state(self.generator)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_generator(self.generator, state.get("generator"))

    def sample(self) -> float:
        index = int(torch.randint(len(self.sparsities), (1,), generator=self.generator))
        return self.sparsities[index]

    def before_optimizer_step(self, model: nn.Module, step: int, optimizer=None,
                              closure=None) -> bool:
        params = [p for p in model.parameters() if p.grad is not None]
        clean = [p.grad.detach().clone() for p in params]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for param, grad in zip(params, clean, strict=True):
                param.add_(grad, alpha=self.rho)
        sparsity = None if parse_pattern(self.pattern).kind == "nm" else self.sample()
        mask = prune(model, "magnitude", self.allocation, sparsity, pattern=self.pattern,
                     rounds=1, **self.prune_options)
        with frozen_bn_statistics(model):
            closure()
        if self.sparse_grad:
            mask.mask_grads_(model)
        with torch.no_grad():
            for param, weights, grad in zip(params, saved, clean, strict=True):
                param.copy_(weights)
                if self.plus:
                    param.grad.add_(grad)
        return True


@register("cram")
@dataclass(frozen=True)
class CrAM(Method):
    """``train_sparsities``: one target, or several sampled per step (CrAM-Multi); ``plus``:
    CrAM+ (adds the dense gradient); ``calibration_batches`` of 100 training examples
    recalibrate batch norm after one-shot pruning."""

    method: str = "cram"
    rho: float = 0.05
    plus: bool = True
    train_sparsities: tuple[float, ...] = (0.9,)
    allocation: str = "global"
    pattern: str = "unstructured"
    sparse_grad: bool = True
    calibration_batches: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        ALLOCATIONS.get(self.allocation)
        parse_pattern(self.pattern)
        if not self.rho > 0:
            raise ConfigError(f"cram: rho must be > 0, got {self.rho}")
        if not self.train_sparsities:
            raise ConfigError("cram: train_sparsities must name at least one sparsity")
        Method(method="cram", sparsities=self.train_sparsities)  # range check
        if self.calibration_batches < 1:
            raise ConfigError("cram: calibration_batches must be >= 1")

    def default_label(self) -> str:
        return ("cram+" if self.plus else "cram") + (
            "-multi" if len(self.train_sparsities) > 1 else "")

    def outputs(self) -> tuple[str, ...]:
        return (self.label, SGD_BASELINE)  # CrAM and the SGD baseline, side by side

    def directories(self, run: Run, sparsity: float) -> list[Path]:
        return [run.dir(self.label, sparsity), run.dir(self.label) / SGD_BASELINE /
                f"s{sparsity:g}"]

    def spec(self) -> PruneSpec:
        return PruneSpec("magnitude", self.allocation, self.pattern)

    def pattern_sparsity(self, sparsity: float) -> float | None:
        return None if parse_pattern(self.pattern).kind == "nm" else sparsity

    def check(self, run: Run, sparsities: tuple[float, ...]) -> None:
        if run.train.precision == "fp16":
            raise ConfigError("cram: its second gradient is not supported under fp16 loss "
                              "scaling; use train.precision bf16 or fp32")
        model = run.fresh_model()
        for sparsity in {*sparsities, *self.train_sparsities}:
            self.spec().check(run, model, self.pattern_sparsity(sparsity))

    def run_one(self, run: Run, sparsity: float) -> list[dict[str, Any]]:
        """CrAM's dense model (trained once for every sparsity, resumed when there) and the
        run's SGD-trained dense model, each pruned one-shot and recalibrated, no fine-tuning."""
        trained = self.train(run, run.dir(self.label) / "dense")
        cram, sgd = self.directories(run, sparsity)
        return [self.one_shot(run, trained, cram, self.label, sparsity),
                self.one_shot(run, run.load(run.dense_path()), sgd, SGD_BASELINE, sparsity)]

    def train(self, run: Run, directory: Path) -> nn.Module:
        """The CrAM-trained dense model."""
        model = run.fresh_model()
        hook = CrAMHook(self.train_sparsities, self.rho, self.plus, self.sparse_grad,
                        self.allocation, self.pattern, run.targets.options(), run.seed)
        run.fit(model, directory, run.train_config(self.budget), hook=hook, desc=self.label,
                method={"method": self.label})
        return model

    def one_shot(self, run: Run, dense: nn.Module, directory: Path, label: str,
                 sparsity: float) -> dict[str, Any]:
        """Prune a copy of ``dense`` one-shot, recalibrate batch norm, evaluate (no training)."""
        dense_accuracy = run.scores(dense)["accuracy"]
        model = run.fresh_model()
        model.load_state_dict(dense.state_dict())
        return compress(run, model, directory, spec=self.spec(),
                        sparsity=self.pattern_sparsity(sparsity),
                        bn_batches=self.calibration_batches, finetune=None,
                        fields={"method": label, "sparsity": sparsity,
                                "dense_accuracy": dense_accuracy}, desc=label)
