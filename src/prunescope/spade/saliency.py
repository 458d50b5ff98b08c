"""Saliency maps (through Captum) and how well a map locates known evidence.

Every method is ``(model, image [C, H, W], target class, baseline) -> map [C, H, W]`` and runs on
the model in eval mode; registered in :data:`SALIENCY`:

- ``gradient``: ``|d logit / d x|`` (Simonyan et al. 2013; Captum ``Saliency``).
- ``integrated_gradients``: ``(x - x0) * mean of the gradient on the straight path from the
  baseline x0`` with 50 Gauss-Legendre steps (Sundararajan et al. 2017).
- ``input_x_gradient``: ``x * d logit / d x`` (Shrikumar et al. 2016).
- ``guided_backprop``: gradients with negative ReLU gradients zeroed (Springenberg et al. 2015).
- ``smoothgrad``: ``|gradient|`` averaged over 20 noisy copies, noise 0.15 of the input's range
  (Smilkov et al. 2017; Captum ``NoiseTunnel``), seeded.

:func:`localisation_auc` is the SPADE paper's saliency-accuracy measure: the ROC AUC of the
map's pixel values (absolute, summed over channels) at telling the evidence pixels (e.g. a
backdoor trigger) from the others.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from captum.attr import GuidedBackprop, InputXGradient, IntegratedGradients, NoiseTunnel, Saliency
from torch import nn

from prunescope.errors import ConfigError
from prunescope.registry import Registry

Method = Callable[[nn.Module, torch.Tensor, int, torch.Tensor], torch.Tensor]
SALIENCY: Registry[Method] = Registry("saliency method")
SMOOTHGRAD_SAMPLES, SMOOTHGRAD_NOISE = 20, 0.15


def _batch(image: torch.Tensor) -> torch.Tensor:
    return image.unsqueeze(0).clone().requires_grad_(True)


@SALIENCY.register("gradient")
def gradient(model: nn.Module, image: torch.Tensor, target: int, baseline: torch.Tensor
             ) -> torch.Tensor:
    """``|d logit_target / d x|``."""
    return Saliency(model).attribute(_batch(image), target=target, abs=True)[0]


@SALIENCY.register("integrated_gradients")
def integrated_gradients(model: nn.Module, image: torch.Tensor, target: int,
                         baseline: torch.Tensor) -> torch.Tensor:
    """Integrated gradients from ``baseline`` (50 steps)."""
    return IntegratedGradients(model).attribute(_batch(image), baselines=baseline.unsqueeze(0),
                                                target=target, n_steps=50)[0]


@SALIENCY.register("input_x_gradient")
def input_x_gradient(model: nn.Module, image: torch.Tensor, target: int, baseline: torch.Tensor
                     ) -> torch.Tensor:
    """``x * d logit_target / d x``."""
    return InputXGradient(model).attribute(_batch(image), target=target)[0]


@SALIENCY.register("guided_backprop")
def guided_backprop(model: nn.Module, image: torch.Tensor, target: int, baseline: torch.Tensor
                    ) -> torch.Tensor:
    """Guided backpropagation (the model's ``nn.ReLU`` modules are overridden during the call)."""
    with warnings.catch_warnings():  # Captum announces its temporary ReLU hooks
        warnings.filterwarnings("ignore", "Setting backward hooks on ReLU", UserWarning)
        return GuidedBackprop(model).attribute(_batch(image), target=target)[0]


@SALIENCY.register("smoothgrad")
def smoothgrad(model: nn.Module, image: torch.Tensor, target: int, baseline: torch.Tensor
               ) -> torch.Tensor:
    """SmoothGrad of ``|gradient|``, seeded so the same call gives the same map."""
    spread = float(image.max() - image.min()) or 1.0
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return NoiseTunnel(Saliency(model)).attribute(
            _batch(image), nt_type="smoothgrad", nt_samples=SMOOTHGRAD_SAMPLES,
            stdevs=SMOOTHGRAD_NOISE * spread, target=target, abs=True)[0]


def saliency_map(method: str, model: nn.Module, image: torch.Tensor, target: int,
                 baseline: torch.Tensor | None = None) -> torch.Tensor:
    """The ``method`` map of ``model`` (put in eval mode) for class ``target``, ``[C, H, W]``."""
    function = SALIENCY.get(method)
    model.eval()
    baseline = torch.zeros_like(image) if baseline is None else baseline.expand_as(image)
    return function(model, image, target, baseline).detach()


def localisation_auc(saliency: torch.Tensor, evidence: torch.Tensor) -> float:
    """ROC AUC of ``|saliency|`` (summed over channels) as a detector of the ``evidence``
    pixels (bool ``[H, W]``): the probability that an evidence pixel outranks another pixel,
    ties counting one half (Mann-Whitney)."""
    scores = saliency.abs().reshape(-1, *evidence.shape).sum(0).flatten().double()
    labels = evidence.flatten().bool()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if not positives or not negatives:
        raise ConfigError("the evidence mask must mark some pixels and leave some unmarked")
    ranks = _average_ranks(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties given their average rank."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    starts = torch.ones_like(sorted_values, dtype=torch.bool)
    starts[1:] = sorted_values[1:] != sorted_values[:-1]
    group = torch.cumsum(starts, 0) - 1
    first = torch.nonzero(starts).squeeze(1).double() + 1
    sizes = torch.bincount(group).double()
    ranks = torch.empty_like(values)
    ranks[order] = (first + (sizes - 1) / 2)[group]
    return ranks
