"""The training-loop hook: what :func:`prunescope.train.fit` calls around every optimizer step.

Every method that changes or holds a mask while training (``MaskHold``, ``ScheduledPruning``,
AC/DC's phases, RigL's drop/grow, CrAM's second gradient, the lottery's rewind snapshot) is a
:class:`Hook` subclass that overrides only what it needs; the base class's methods are the
documented no-ops, so the loop calls every hook the same way and never asks what it has.

Call order within one optimizer step ``step`` (0-based)::

    on_step(model, step, optimizer)                       before the forward pass
    forward, loss, backward                               dense gradients in .grad
    before_optimizer_step(model, step, optimizer, closure) -> False skips the update
    optimizer.step()
    after_optimizer_step(model, step, optimizer)

``hold_(model)`` runs once before training starts (and after a resume restores ``mask``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prunescope.mask import Mask

Closure = Callable[[], tuple[torch.Tensor, torch.Tensor]]


class Hook:
    """A training-loop hook that does nothing; subclasses override what they need.

    ``mask`` is the hook's current mask (None: the model trains dense). The loop saves it in
    every checkpoint and sets it back on resume.
    """

    mask: Mask | None = None

    def hold_(self, model: nn.Module) -> None:
        """Before the first step: zero the weights the mask prunes (default ``mask.apply_``)."""
        if self.mask is not None:
            self.mask.apply_(model)

    def on_step(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Before the forward pass of ``step``."""

    def before_optimizer_step(self, model: nn.Module, step: int,
                              optimizer: torch.optim.Optimizer, closure: Closure) -> bool:
        """After the backward pass, the dense gradients in ``.grad``. ``closure()`` re-runs the
        forward and backward pass on the same batch and returns ``(loss, logits)`` (CrAM's
        second gradient). Return False to skip this step's optimizer update (RigL's mask-update
        steps)."""
        return True

    def after_optimizer_step(self, model: nn.Module, step: int,
                             optimizer: torch.optim.Optimizer) -> None:
        """After the optimizer update (re-zero pruned weights here)."""

    def state_dict(self) -> dict[str, Any]:
        """Any other JSON-able state to checkpoint (e.g. a generator's state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`, on resume."""
