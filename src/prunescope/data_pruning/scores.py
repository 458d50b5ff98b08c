"""Per-example difficulty scores for data pruning (higher = harder = kept first).

- **EL2N** (Paul, Ganguli & Dziugaite, NeurIPS 2021): ``||softmax(f(x)) - onehot(y)||_2``,
  averaged over several models trained briefly (the paper scores at ~10% of training). Here each
  scoring model is trained for ``epochs`` epochs of the run's config (its learning-rate schedule
  run over those epochs), on the full training set, from its own seed.
- **Forgetting counts** (Toneva et al., ICLR 2019): the number of transitions from correctly to
  incorrectly classified across training. Correctness is read once per epoch, on the whole
  training set in eval mode after the epoch's last step (the paper reads it on each minibatch
  as it is presented); examples never classified correctly get a count of ``E`` (the number of
  epochs), above the ``ceil((E - 1) / 2)`` any learned example can reach, so they rank as most
  forgotten, as in the paper.

Scoring models are written under ``run.out / "data-pruning"`` and reused by later calls
(:func:`prunescope.train.fit` does not train a finished run again); the directory's
``config.json`` holds the run's key, and another run in the same directory is refused. EL2N's
scoring models, the forgetting model and DRoP's query models are the same training (a fresh
model of seed ``run.seed + index`` for ``epochs`` epochs on the full training set, its
correctness history recorded), so one model of each ``(epochs, index)`` serves all three.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunescope.data import Subset
from prunescope.hooks import Hook
from prunescope.run import Run
from prunescope.stages import claim_config
from prunescope.train import predict

SHARED = "data-pruning"


def el2n(models: list[nn.Module], subset: Subset, batch_size: int = 1000) -> torch.Tensor:
    """Mean over ``models`` of each example's EL2N score (float64 ``[N]``)."""
    total = torch.zeros(len(subset), dtype=torch.float64)
    for model in models:
        probs = F.softmax(predict(model, subset, batch_size).double(), dim=1)
        onehot = F.one_hot(subset.y, probs.shape[1]).double()
        total += (probs - onehot).norm(dim=1)
    return total / len(models)


def forgetting_counts(history: torch.Tensor) -> torch.Tensor:
    """Forgetting counts from ``history`` (bool ``[E, N]``: example n correct after epoch e):
    transitions correct -> incorrect, and ``E`` for never-correct examples (float64 ``[N]``)."""
    history = history.to(torch.bool)
    counts = (history[:-1] & ~history[1:]).sum(0).to(torch.float64)
    counts[~history.any(0)] = float(history.shape[0])
    return counts


class CorrectnessHistory(Hook):
    """A training hook that records which training examples the model classifies correctly at
    the end of every epoch (eval mode); checkpointed, so a resumed run keeps its history."""

    def __init__(self, subset: Subset, steps_per_epoch: int, batch_size: int = 1000) -> None:
        self.subset, self.steps_per_epoch, self.batch_size = subset, steps_per_epoch, batch_size
        self.rows: list[torch.Tensor] = []

    def after_optimizer_step(self, model: nn.Module, step: int, optimizer) -> None:
        if (step + 1) % self.steps_per_epoch == 0:
            logits = predict(model, self.subset, self.batch_size)
            self.rows.append(logits.argmax(1) == self.subset.y)

    @property
    def history(self) -> torch.Tensor:
        return torch.stack(self.rows) if self.rows else torch.zeros(0, len(self.subset),
                                                                     dtype=torch.bool)

    def state_dict(self) -> dict[str, Any]:
        return {"history": ["".join("1" if c else "0" for c in row.tolist()) for row in self.rows]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = [torch.tensor([c == "1" for c in text]) for text in state.get("history", [])]


def el2n_scores(run: Run, models: int = 3, epochs: int = 2) -> torch.Tensor:
    """EL2N of every training example of ``run``, averaged over ``models`` models trained for
    ``epochs`` epochs with seeds ``run.seed + k``."""
    trained = [train_scorer(run, "el2n", epochs, k)[0] for k in range(models)]
    return el2n(trained, run.splits.train, run.train.eval_batch_size)


def forgetting_scores(run: Run, epochs: int = 2) -> torch.Tensor:
    """Forgetting counts of every training example of ``run`` over ``epochs`` epochs of one
    model (seed ``run.seed``)."""
    _, hook = train_scorer(run, "forgetting", epochs, 0)
    return forgetting_counts(hook.history)


def train_scorer(run: Run, kind: str, epochs: int, index: int
                 ) -> tuple[nn.Module, CorrectnessHistory]:
    """Scoring (or query) model ``index`` (``kind`` names it in the log): a fresh model of seed
    ``run.seed + index`` trained ``epochs`` epochs on the full training set, in
    ``OUT/data-pruning/full-e<epochs>-m<index>`` (shared by every kind), with its correctness
    history."""
    seeded = dataclasses.replace(run, seed=run.seed + index)
    directory = shared_dir(run) / f"full-e{epochs}-m{index}"
    model = seeded.fresh_model()
    hook = CorrectnessHistory(run.splits.train, run.steps_per_epoch, run.train.eval_batch_size)
    config = dataclasses.replace(run.train, epochs=epochs)
    seeded.fit(model, directory, config, hook=hook, desc=f"{kind} model {index}", distill=False)
    return model, hook


def shared_dir(run: Run) -> Path:
    """``OUT/data-pruning``, claimed for this run's key (another run there is refused)."""
    directory = run.out / SHARED
    directory.mkdir(parents=True, exist_ok=True)
    claim_config(directory / "config.json", run.key(), "data pruning's scoring models")
    return directory
