"""Layer-wise one-shot pruning of a large model, one block at a time, then optional recovery.

The recipe method over :func:`prunescope.layerwise.prune_blocks`: the trained dense model is
pruned block by block on calibration batches of training examples (magnitude, Wanda, SparseGPT;
unstructured at the same sparsity in every layer, or N:M), then, with ``recover`` and a
fine-tuning config in the run, fine-tuned with the mask held (and distilled from the dense model
when the run distils): the compression pipeline (:func:`prunescope.pipeline.compress`) with the
mask made here. The result holds the accuracy right after pruning (``accuracy_before_finetune``)
and after recovery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from prunescope.errors import ConfigError
from prunescope.methods.base import Method, register
from prunescope.patterns import parse_pattern
from prunescope.pipeline import compress
from prunescope.run import Run


@register("layerwise")
@dataclass(frozen=True)
class Layerwise(Method):
    """``solver`` (magnitude, wanda, sparsegpt) under ``pattern`` (unstructured or N:M, whose
    sparsity must be 1 - N/M) on ``calibration`` training examples in batches of
    ``batch_size``; ``blocks`` names the model's list of blocks (None: found); ``dampening`` is
    SparseGPT's; ``recover``: fine-tune with the run's fine-tuning config afterwards."""

    method: str = "layerwise"
    solver: str = "sparsegpt"
    pattern: str = "unstructured"
    blocks: str | None = None
    calibration: int = 128
    batch_size: int = 32
    dampening: float = 0.01
    recover: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        from prunescope.layerwise import SOLVERS

        if self.solver not in SOLVERS:
            raise ConfigError(f"layerwise: unknown solver {self.solver!r}; choose one of: "
                              f"{', '.join(SOLVERS)}")
        kind = parse_pattern(self.pattern).kind
        if kind not in ("unstructured", "nm"):
            raise ConfigError(f"layerwise: pattern must be unstructured or N:M, got "
                              f"{self.pattern!r}")
        if self.calibration < 1 or self.batch_size < 1:
            raise ConfigError("layerwise: calibration and batch_size must be >= 1")
        if not 0 < self.dampening < 1:
            raise ConfigError(f"layerwise: dampening must be in (0, 1), got {self.dampening}")

    def default_label(self) -> str:
        """E.g. ``sparsegpt`` or ``wanda+2:4``, with ``-oneshot`` when it does not recover."""
        parts = [self.solver] + ([self.pattern] if self.pattern != "unstructured" else [])
        return "+".join(parts) + ("" if self.recover else "-oneshot")

    def check(self, run: Run, sparsities: tuple[float, ...]) -> None:
        pattern = parse_pattern(self.pattern)
        for sparsity in sparsities:
            if pattern.kind == "nm" and abs(sparsity - (1 - pattern.n / pattern.m)) > 1e-9:
                raise ConfigError(f"layerwise {self.pattern}: its sparsity is "
                                  f"{1 - pattern.n / pattern.m:g}, not {sparsity:g}; list "
                                  f"sparsities: [{1 - pattern.n / pattern.m:g}] for it")
        from prunescope.targets import select

        model = run.fresh_model()
        targets = select(model, run.targets.include, run.targets.exclude)
        params = dict(model.named_parameters())
        for name in targets:
            if pattern.kind == "nm" and params[name].shape[-1] % pattern.m:
                raise ConfigError(f"layerwise {self.pattern}: {name} has "
                                  f"{params[name].shape[-1]} inputs, not a multiple of "
                                  f"{pattern.m}; exclude it or pick another pattern")

    def run_one(self, run: Run, sparsity: float) -> list[dict[str, Any]]:
        """Prune the trained dense model block by block, recover, evaluate."""
        from prunescope.layerwise import prune_blocks
        from prunescope.targets import select

        model = run.load(run.dense_path())
        batches = run.batches(-(-self.calibration // self.batch_size), self.batch_size,
                              seed_offset=2)
        inputs = [x[:self.calibration].to(run.device) for x, _ in batches]
        masks = [x[:, 1] for x in inputs] if inputs[0].dtype == torch.int64 else None
        targets = select(model, run.targets.include, run.targets.exclude)
        pattern = parse_pattern(self.pattern)
        mask = prune_blocks(model, inputs, targets, solver=self.solver,
                            sparsity=None if pattern.kind == "nm" else sparsity,
                            pattern=self.pattern, blocks=self.blocks, token_masks=masks,
                            dampening=self.dampening, progress=run.progress)
        finetune = (run.train_config(self.budget, run.finetune)
                    if self.recover and run.finetune else None)
        fields = {"method": self.label, "solver": self.solver, "pattern": self.pattern,
                  "sparsity": sparsity, "calibration": sum(len(x) for x in inputs)}
        return [compress(run, model, self.directories(run, sparsity)[0], spec=None,
                         sparsity=sparsity, start=mask, finetune=finetune, fields=fields,
                         desc=f"{self.label} s={sparsity:g}")]
