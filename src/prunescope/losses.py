"""Training losses beside cross-entropy: supervised contrastive (SupCon).

Khosla, Teterwak, Wang, Sarna, Tian, Isola, Maschinot, Liu & Krishnan, "Supervised Contrastive
Learning" (NeurIPS 2020), eq. 2 (``L_out``, the form the paper recommends). With ``z_i`` the
L2-normalised representations of a batch, ``P(i)`` the other examples of anchor ``i``'s class
and ``A(i)`` every example but ``i``::

    L = mean_{i : |P(i)| > 0}  -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / t)
                                                          / sum_{a in A(i)} exp(z_i.z_a / t) )

``t`` is the temperature (0.1, the paper's choice for its ResNet results). An anchor without a
positive in the batch has no term (the paper's formula is undefined there); a batch without any
positive pair has loss 0. The authors' reference code (HobbitLong/SupContrast) differs in two
places, both stated: it counts such anchors as 0 in the mean, and multiplies the loss by
``t / 0.07``. The paper trains with two augmented views of every image, so each anchor has at
least its other view; here each example appears once and its positives are the other examples
of its class in the batch.

**How the classifier is trained** (``train.loss: supcon``, :func:`training_loss`): jointly, one
stage, ``loss = CE + supcon_weight * SupCon`` (the paper's two stages, contrastive pre-training
then a linear classifier on frozen features, would need a second training run and a model
without its head; the joint form keeps every model a classifier, so accuracy and the audit read
its own logits). The contrastive term acts on the penultimate representation, the input of the
model's classifier (the last layer :func:`prunescope.audit.representations.probed_layers`
lists: the last ``nn.Linear``/``nn.Conv`` of a zoo model, the [CLS] input of a transformer's
head), L2-normalised, with no projection head (the paper adds a two-layer MLP head and discards
it): the representation the contrastive loss shapes is the one the audit's Q-score and
prediction depth read, as in Corti et al. 2022's comparison of pruned contrastive and
cross-entropy models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunescope.errors import ConfigError

LOSSES = ("cross_entropy", "supcon")
TEMPERATURE = 0.1

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check(loss: str, temperature: float, weight: float) -> None:
    """ConfigError (one line) for an unknown loss or a temperature / weight that is not a
    positive finite number."""
    if loss not in LOSSES:
        raise ConfigError(f"unknown train.loss {loss!r}; choose one of: {', '.join(LOSSES)}")
    for name, value in (("temperature", temperature), ("supcon_weight", weight)):
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"train.{name} must be a positive number, got {value}")


def supcon(features: torch.Tensor, labels: torch.Tensor,
           temperature: float = TEMPERATURE) -> torch.Tensor:
    """SupCon loss ``L_out`` (Khosla et al. 2020, eq. 2; see the module doc) of ``features``
    ``[N, d]`` (normalised here) with class ``labels`` ``[N]``; a scalar, 0 (still attached to
    the graph) when no two examples share a class."""
    z = F.normalize(features, dim=1)
    logits = z @ z.T / temperature
    self_pair = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pair, -math.inf)  # A(i): every example but i
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_pair
    count = positive.sum(1)
    anchors = count > 0
    if not anchors.any():
        return features.sum() * 0.0
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(1)[anchors] / count[anchors]
    return per_anchor.mean()


def penultimate_layer(model: nn.Module) -> nn.Module:
    """The model's classifier, whose input is the penultimate representation (the last layer
    the audit probes)."""
    from prunescope.audit.representations import probed_layers

    layers = probed_layers(model)
    if not layers:
        raise ConfigError(f"train.loss supcon needs a model with an nn.Linear or nn.Conv "
                          f"classifier; {type(model).__name__} has none")
    return layers[-1]


def representation(inputs: torch.Tensor) -> torch.Tensor:
    """A classifier's input as ``[N, d]``: a sequence's first token ([CLS]), flattened."""
    if inputs.dim() == 3:
        inputs = inputs[:, 0]
    return inputs.reshape(len(inputs), -1)


@contextmanager
def training_loss(model: nn.Module, config: Any, loss_fn: LossFn) -> Iterator[LossFn]:
    """The loss :func:`prunescope.train.fit` minimises under ``config`` (a TrainConfig):
    ``loss_fn`` itself for ``cross_entropy``; for ``supcon``, ``loss_fn + supcon_weight *
    SupCon`` on the penultimate representation of the forward pass that made the logits (a
    forward pre-hook on :func:`penultimate_layer`, removed on exit)."""
    if config.loss == "cross_entropy":
        yield loss_fn
        return
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, args: tuple) -> None:
        captured[:] = [args[0]]

    def loss(logits: torch.Tensor, targets: torch.Tensor,
             inputs: torch.Tensor) -> torch.Tensor:
        if not captured:
            raise RuntimeError("the model's forward did not reach its classifier layer")
        features = representation(captured.pop())
        return (loss_fn(logits, targets, inputs)
                + config.supcon_weight * supcon(features, targets, config.temperature))

    handle = penultimate_layer(model).register_forward_pre_hook(keep)
    try:
        yield loss
    finally:
        handle.remove()
