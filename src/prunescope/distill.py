"""Knowledge distillation (Hinton, Vinyals & Dean 2015) for any training or fine-tuning run.

The student minimises ``(1 - w) * CE(student, y) + w * T^2 * KL(softmax(t / T) || softmax(s / T))``
with ``t`` the teacher's logits, temperature ``T`` and weight ``w``; the ``T^2`` keeps the soft
term's gradients on the scale of the hard term's. Sparse fine-tuning with a dense teacher is the
recipe of the sparse-transfer work this project builds on (e.g. Kurtic et al. 2022).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunescope import checkpoint
from prunescope.errors import ConfigError


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from a teacher checkpoint (Hinton et al. 2015), used by every
    training run of the recipe except the dense baseline; ``teacher: dense`` is this run's own
    trained dense model."""

    teacher: str = ""
    temperature: float = 4.0
    weight: float = 0.5
    # worst-class robust distillation (prunescope.robust_distill); weight is its teacher share a
    robust: bool = False
    blend: float = 1.0
    step_size: float = 0.1
    every: int = 10
    val_batch_size: int = 1000

    def __post_init__(self) -> None:
        if not self.teacher:
            raise ConfigError("distill.teacher must name a checkpoint (a model.safetensors)")
        if not self.temperature > 0 or not 0 <= self.weight <= 1:
            raise ConfigError("distill needs temperature > 0 and weight in [0, 1]")
        if self.teacher == NO_TEACHER and not self.robust:
            raise ConfigError("distill.teacher: none needs distill.robust: true (a teacher-free "
                              "robust or class-balanced objective)")
        if self.robust:
            from prunescope.robust_distill import check

            check(temperature=self.temperature, weight=self.weight, blend=self.blend,
                  step_size=self.step_size, every=self.every,
                  val_batch_size=self.val_batch_size, has_teacher=self.teacher != NO_TEACHER)

    def key(self) -> dict[str, Any]:
        """The settings that determine a result: the robust keys only when robust is on (so
        the stage keys of plain distillation runs are what they were)."""
        fields = dataclasses.asdict(self)
        if not self.robust:
            for name in ROBUST_KEYS:
                fields.pop(name)
        return fields


NO_TEACHER = "none"
ROBUST_KEYS = ("robust", "blend", "step_size", "every", "val_batch_size")


class DistillationLoss:
    """``loss(logits, targets, inputs)`` mixing cross-entropy with the teacher's soft targets."""

    def __init__(self, teacher: nn.Module, *, temperature: float = 4.0, weight: float = 0.5,
                 label_smoothing: float = 0.0) -> None:
        if not temperature > 0:
            raise ConfigError(f"distill.temperature must be > 0, got {temperature}")
        if not 0 <= weight <= 1:
            raise ConfigError(f"distill.weight must be in [0, 1], got {weight}")
        self.teacher = teacher.eval()
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.temperature, self.weight, self.label_smoothing = temperature, weight, label_smoothing

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor,
                 inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        return distillation_loss(logits, teacher_logits, targets, self.temperature, self.weight,
                                 self.label_smoothing)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float, weight: float, label_smoothing: float = 0.0
                      ) -> torch.Tensor:
    """Hinton et al.'s loss for one batch (see the module docstring)."""
    hard = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    soft = F.kl_div(F.log_softmax(logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    return (1.0 - weight) * hard + weight * temperature ** 2 * soft


def load_teacher(path: str | Path, num_classes: int) -> nn.Module:
    """The teacher model of a prunescope checkpoint, frozen, in eval mode.

    Raises ConfigError when it predicts a different number of classes than the data has.
    """
    state = checkpoint.load(path)
    teacher = checkpoint.build_model(state, path)
    spec = state.meta["model"]
    classes = spec["num_labels"] if spec.get("source") == "huggingface" else spec["num_classes"]
    if classes != num_classes:
        raise ConfigError(
            f"teacher {path} predicts {classes} classes but the data has {num_classes}; "
            "use a teacher trained on the same dataset"
        )
    return teacher.eval()
