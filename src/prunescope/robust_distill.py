"""Worst-class robust distillation (Wang, Narasimhan, Zhou, Hooker, Lukasik, Menon, UAI 2023).

The student minimises a blend of its average distillation loss and a worst-class objective::

    (1 - b) * mean_i l_i  +  b * sum_y lambda_y L_y,      l_i = (1 - a) CE_i + a T^2 KL_i,
    L_y = mean of l_i over the batch's examples of class y  (0 when the batch has none),

``CE_i`` the cross-entropy on the label, ``KL_i = KL(softmax(t_i / T) || softmax(s_i / T))`` the
teacher term (Hinton et al. 2015; ``a = 0`` drops it, so a *robust teacher* is trained by the
same objective without one), ``b`` the blend and ``lambda`` a point of the simplex. ``lambda`` is
the adversary of ``max_{lambda in simplex} sum_y lambda_y L_y``: every ``every`` optimizer steps
it takes one exponentiated-gradient ascent step on held-out data (the run's validation split),
``lambda_y <- lambda_y * exp(eta * L_y^val)``, renormalised, where ``L_y^val`` is the same
per-class loss of the student on one validation batch (a class absent from that batch keeps its
weight before renormalising). ``every = 0`` never moves ``lambda`` off uniform: the objective is
then the class-balanced loss (each class's mean loss weighted equally), which trains the
*class-balanced teacher*.

This is a loss, not a training loop: :class:`RobustDistillationLoss` is a ``loss(logits,
targets, inputs)`` for :func:`prunescope.train.fit`, and :class:`LambdaHook` wraps whichever
hook the method trains with (``MaskHold``, ``ScheduledPruning``, RigL's, ...) to run the
``lambda`` updates after each optimizer step and to keep ``lambda`` in every checkpoint (the
hook's ``state_dict``), so a resumed run continues with the same weights. The validation batch
of update ``u`` is a pure function of ``u`` and the seed, so nothing else needs saving.

What is ours (the paper's full method text was not readable here; see
``docs/robust_distillation.md``): per-class losses as in-batch class means, the per-class loss
being the same (1 - a) / a mixture on validation data, the update schedule and batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunescope import devices
from prunescope.data import Subset
from prunescope.errors import ConfigError
from prunescope.hooks import Closure, Hook


def example_losses(logits: torch.Tensor, targets: torch.Tensor,
                   teacher_logits: torch.Tensor | None, temperature: float, weight: float,
                   label_smoothing: float = 0.0) -> torch.Tensor:
    """``l_i = (1 - a) CE_i + a T^2 KL_i`` per example (``a = weight``; CE alone without a
    teacher). Its batch mean is :func:`prunescope.distill.distillation_loss`."""
    hard = F.cross_entropy(logits.float(), targets, reduction="none",
                           label_smoothing=label_smoothing)
    if teacher_logits is None:
        return hard
    soft = F.kl_div(F.log_softmax(logits.float() / temperature, dim=1),
                    F.log_softmax(teacher_logits.float() / temperature, dim=1),
                    reduction="none", log_target=True).sum(1)
    return (1.0 - weight) * hard + weight * temperature ** 2 * soft


def per_class_mean(values: torch.Tensor, targets: torch.Tensor, num_classes: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, present)``: ``L_y`` the mean of ``values`` over the examples of class ``y`` (0 for
    a class with none) and the boolean vector of classes that have examples."""
    counts = torch.bincount(targets, minlength=num_classes)
    sums = torch.zeros(num_classes, dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, targets, values)
    return sums / counts.clamp(min=1).to(values.dtype), counts > 0


def robust_objective(losses: torch.Tensor, targets: torch.Tensor, lam: torch.Tensor,
                     blend: float) -> torch.Tensor:
    """``(1 - b) mean_i l_i + b sum_y lambda_y L_y`` for per-example losses ``l_i``."""
    class_losses, _ = per_class_mean(losses, targets, len(lam))
    return (1.0 - blend) * losses.mean() + blend * (lam.to(losses) * class_losses).sum()


def eg_update(lam: torch.Tensor, class_losses: torch.Tensor, present: torch.Tensor,
              step_size: float) -> torch.Tensor:
    """One exponentiated-gradient ascent step on the simplex: ``lambda_y exp(eta L_y)``
    renormalised; classes not ``present`` keep their weight before renormalising. Computed in
    double precision with the exponent shifted by its maximum (the same point, no overflow)."""
    exponent = torch.where(present, step_size * class_losses.double(), 0.0)
    raised = lam.double() * torch.exp(exponent - exponent.max())
    return (raised / raised.sum()).to(lam.dtype)


class RobustDistillationLoss:
    """``loss(logits, targets, inputs)`` of the worst-class objective (module docstring), with
    the ``lambda`` state and its validation updates (:meth:`update`, run by :class:`LambdaHook`).

    ``teacher`` None trains without a teacher term (``weight`` must then be 0): the robust or,
    with ``every = 0``, the class-balanced teacher. ``val`` is the held-out split the updates
    read, ``val_batch_size`` examples at a time in a fixed order seeded by ``seed``.
    """

    def __init__(self, teacher: nn.Module | None, num_classes: int, val: Subset, *,
                 temperature: float = 4.0, weight: float = 0.5, blend: float = 1.0,
                 step_size: float = 0.1, every: int = 10, val_batch_size: int = 1000,
                 label_smoothing: float = 0.0, seed: int = 0) -> None:
        check(temperature=temperature, weight=weight, blend=blend, step_size=step_size,
              every=every, val_batch_size=val_batch_size, has_teacher=teacher is not None)
        if every > 0 and len(val) == 0:
            raise ConfigError("robust distillation updates lambda on the validation split, "
                              "which is empty; set data.val_size > 0 (or distill.every: 0)")
        self.teacher = teacher.eval() if teacher is not None else None
        for param in self.teacher.parameters() if self.teacher is not None else ():
            param.requires_grad_(False)
        self.num_classes, self.val = num_classes, val
        self.temperature, self.weight, self.blend = temperature, weight, blend
        self.step_size, self.every, self.val_batch_size = step_size, every, val_batch_size
        self.label_smoothing = label_smoothing
        self.order = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))
        self.lam = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
        self.updates = 0

    def losses(self, logits: torch.Tensor, targets: torch.Tensor,
               inputs: torch.Tensor) -> torch.Tensor:
        """The per-example losses ``l_i`` (the teacher run on ``inputs`` without gradients)."""
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(inputs)
        return example_losses(logits, targets, teacher_logits, self.temperature, self.weight,
                              self.label_smoothing)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor,
                 inputs: torch.Tensor) -> torch.Tensor:
        return robust_objective(self.losses(logits, targets, inputs), targets, self.lam,
                                self.blend)

    def val_batch(self, update: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The validation batch of update ``update`` (0-based): a pure function of it."""
        batches = max(1, math.ceil(len(self.val) / self.val_batch_size))
        start = (update % batches) * self.val_batch_size
        index = self.order[start:start + self.val_batch_size]
        return self.val.x[index], self.val.y[index]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One ascent step of ``lambda`` on the student's per-class validation losses (the
        student in eval mode, restored afterwards)."""
        inputs, targets = self.val_batch(self.updates)
        device = devices.model_device(model)
        inputs, targets = inputs.to(device), targets.to(device)
        was_training = model.training
        model.eval()
        try:
            losses = self.losses(model(inputs), targets, inputs)
        finally:
            model.train(was_training)
        class_losses, present = per_class_mean(losses, targets, self.num_classes)
        self.lam = eg_update(self.lam, class_losses.cpu(), present.cpu(), self.step_size)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"lambda": self.lam.tolist(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "lambda" in state:
            self.lam = torch.tensor(state["lambda"], dtype=torch.float64)
            self.updates = int(state["updates"])

    def hook(self, inner: Hook | None) -> LambdaHook:
        """``inner`` (the method's hook, or none) with this loss's ``lambda`` updates."""
        return LambdaHook(inner or Hook(), self)


class LambdaHook(Hook):
    """Runs ``inner`` unchanged (its mask, its updates, its state) and, after every ``every``-th
    optimizer step, one ``lambda`` update of ``loss``; checkpoints both states."""

    def __init__(self, inner: Hook, loss: RobustDistillationLoss) -> None:
        self.inner, self.loss = inner, loss

    @property
    def mask(self):  # type: ignore[override]
        return self.inner.mask

    @mask.setter
    def mask(self, value) -> None:
        self.inner.mask = value

    def hold_(self, model: nn.Module) -> None:
        self.inner.hold_(model)

    def on_step(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        self.inner.on_step(model, step, optimizer)

    def before_optimizer_step(self, model: nn.Module, step: int,
                              optimizer: torch.optim.Optimizer, closure: Closure) -> bool:
        return self.inner.before_optimizer_step(model, step, optimizer, closure)

    def after_optimizer_step(self, model: nn.Module, step: int,
                             optimizer: torch.optim.Optimizer) -> None:
        self.inner.after_optimizer_step(model, step, optimizer)
        if self.loss.every and (step + 1) % self.loss.every == 0:
            self.loss.update(model)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "robust": self.loss.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
        self.loss.load_state_dict(state.get("robust", {}))


def check(*, temperature: float, weight: float, blend: float, step_size: float, every: int,
          val_batch_size: int, has_teacher: bool) -> None:
    """Raise ConfigError (one line) on settings the objective cannot use."""
    if not temperature > 0:
        raise ConfigError(f"distill.temperature must be > 0, got {temperature}")
    if not 0 <= weight <= 1:
        raise ConfigError(f"distill.weight (the teacher term's share a) must be in [0, 1], "
                          f"got {weight}")
    if not 0 <= blend <= 1:
        raise ConfigError(f"distill.blend must be in [0, 1] (0: average loss, 1: worst-class "
                          f"objective), got {blend}")
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ConfigError(f"distill.step_size (lambda's ascent step) must be a positive number, "
                          f"got {step_size}")
    if every < 0 or val_batch_size < 1:
        raise ConfigError(f"distill.every must be >= 0 and distill.val_batch_size >= 1, got "
                          f"{every} and {val_batch_size}")
    if not has_teacher and weight != 0:
        raise ConfigError("distill.teacher: none trains without a teacher term; set "
                          f"distill.weight: 0 (got {weight}) or name a teacher")


def check_sparse_kernels(robust: bool, sparse_kernels: bool) -> None:
    """Robust distillation's lambda hook wraps the method's hook, which the sparse kernels'
    layer swap does not compose with: one ConfigError line."""
    if robust and sparse_kernels:
        raise ConfigError("robust distillation does not run on sparse kernels; set "
                          "finetune.sparse_kernels: false or distill.robust: false")
