"""Criteria: per-weight scores, higher = keep.

A criterion is a function ``(model, names, context) -> {name: scores}`` returning a tensor of the
parameter's shape for every target name. It must not change the model (weights, buffers, grads,
train/eval mode). The model it sees is already masked: pruned weights are zero.

Registered criteria:

- ``magnitude``: ``|w|`` (Han et al. 2015).
- ``random``: i.i.d. uniform scores from the context's generator (the random-pruning baseline).
- ``snip``: connection sensitivity ``|g * w|`` with ``g`` the loss gradient summed over the
  given batches (Lee et al. 2019, SNIP).
- ``grasp``: ``w * Hg``, the Hessian-gradient product of the loss with the logits divided by a
  temperature (200 in the authors' code); GraSP removes the weights with the largest ``-w * Hg``,
  so this keep-score is its negation (Wang et al. 2020).
- ``synflow``: ``|w * dR/dw|`` with ``R = 1^T (prod_l |W_l|) 1``, the network with absolute
  weights in double precision on an all-ones input, data-free; used iteratively with
  exponentially spaced rounds (100 by default) (Tanaka et al. 2020).
- ``taylor``: first-order Taylor importance ``(g * w)^2`` averaged over batches (Molchanov et al.
  2019).
- ``woodfisher``, ``obc`` (exact greedy OBC), ``sparsegpt`` (SparseGPT's column pass):
  second-order criteria that also correct the weights they keep (:mod:`prunescope.second_order`).
  They build on this module, so they are registered lazily by import path at the end of it
  (:meth:`prunescope.registry.Registry.register_lazy`): listed at once, imported on first use;
  this module never imports them.

A new criterion is one decorated function anywhere (:func:`register`); nothing else changes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunescope.errors import PruningError
from prunescope.registry import Registry
from prunescope.targets import parameters

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Scores = dict[str, torch.Tensor]


@dataclass
class Context:
    """What a criterion may use besides the model: data batches, loss, randomness, input shape.

    ``cache`` is scratch space: a criterion's ``score`` may leave work there (a Fisher inverse,
    layer Hessians) for its ``solve`` in the same pruning round.
    """

    batches: Sequence[Batch] = ()
    loss_fn: LossFn = F.cross_entropy
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    input_shape: tuple[int, ...] | None = None
    cache: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Criterion:
    """A registered criterion: its score function and how ``prune`` should use it.

    ``solve``, when set, replaces the pattern's top-k for methods that also correct the weights
    they keep (second-order OBS/OBC): ``solve(model, current, counts, pattern, context) -> Mask``
    receives the current mask, the allocation's kept count per tensor (ignored under N:M) and the
    parsed pattern, updates the model's kept weights in place and returns the new mask, a subset
    of ``current``. The scores still drive the allocation.
    """

    name: str
    score: Callable[[nn.Module, Sequence[str], Context], Scores]
    needs_data: bool = False
    rounds: int = 1
    signed: bool = False
    solve: Callable[..., Any] | None = None


CRITERIA: Registry[Criterion] = Registry("criterion")


def resolve(criterion: str | Criterion) -> Criterion:
    """A registered criterion by name, or a :class:`Criterion` built by the caller as it is."""
    return criterion if isinstance(criterion, Criterion) else CRITERIA.get(criterion)


def register(name: str, *, needs_data: bool = False, rounds: int = 1, signed: bool = False,
             solve: Callable[..., Any] | None = None):
    """Decorator registering a score function as a :class:`Criterion`."""

    def add(fn):
        CRITERIA.register(name)(Criterion(name, fn, needs_data, rounds, signed, solve))
        return fn

    return add


def _params(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    params = parameters(model)
    return [params[n] for n in names]


@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Run data-driven scoring in train mode, then restore the mode and every buffer."""
    was_training = model.training
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.train()
    try:
        yield
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])


def _require_batches(context: Context, criterion: str) -> Sequence[Batch]:
    if not context.batches:
        raise PruningError(
            f"criterion {criterion!r} needs data: pass data= (batches of (inputs, targets))"
        )
    return context.batches


def _batch_gradients(model: nn.Module, names: Sequence[str], context: Context, criterion: str):
    """Per-batch loss gradients for the target parameters (autograd.grad; .grad untouched)."""
    params = _params(model, names)
    with _untouched(model):
        for inputs, targets in _require_batches(context, criterion):
            loss = context.loss_fn(model(inputs), targets)
            yield torch.autograd.grad(loss, params)


@register("magnitude")
def magnitude(model: nn.Module, names: Sequence[str], context: Context) -> Scores:
    """``|w|``."""
    return {n: p.detach().abs() for n, p in zip(names, _params(model, names), strict=True)}


@register("random")
def random(model: nn.Module, names: Sequence[str], context: Context) -> Scores:
    """Uniform random scores drawn from ``context.generator``."""
    return {
        n: torch.rand(p.shape, generator=context.generator).to(p.device)
        for n, p in zip(names, _params(model, names), strict=True)
    }


@register("snip", needs_data=True)
def snip(model: nn.Module, names: Sequence[str], context: Context) -> Scores:
    """Connection sensitivity ``|g * w|``, ``g`` summed over the batches (Lee et al. 2019)."""
    total = [torch.zeros_like(p) for p in _params(model, names)]
    for grads in _batch_gradients(model, names, context, "snip"):
        for acc, grad in zip(total, grads, strict=True):
            acc.add_(grad)
    params = _params(model, names)
    return {n: (g * p).detach().abs() for n, g, p in zip(names, total, params, strict=True)}


@register("taylor", needs_data=True)
def taylor(model: nn.Module, names: Sequence[str], context: Context) -> Scores:
    """First-order Taylor importance ``(g * w)^2`` averaged over batches (Molchanov et al. 2019)."""
    params = _params(model, names)
    total = [torch.zeros_like(p) for p in params]
    count = 0
    for grads in _batch_gradients(model, names, context, "taylor"):
        count += 1
        for acc, grad, param in zip(total, grads, params, strict=True):
            acc.add_((grad * param.detach()).square())
    return {n: acc / count for n, acc in zip(names, total, strict=True)}


GRASP_TEMPERATURE = 200.0


@register("grasp", needs_data=True, signed=True)
def grasp(model: nn.Module, names: Sequence[str], context: Context) -> Scores:
    """Keep-score ``w * Hg`` (Wang et al. 2020, GraSP; logits divided by temperature 200).

    ``g`` is the loss gradient summed over the batches; ``Hg`` is accumulated per batch as the
    gradient of ``g . grad L_b`` with ``g`` held constant.
    """
    params = _params(model, names)
    batches = _require_batches(context, "grasp")

    def loss(inputs, targets):
        return context.loss_fn(model(inputs) / GRASP_TEMPERATURE, targets)

    hg = [torch.zeros_like(p) for p in params]
    with _untouched(model):
        g = [torch.zeros_like(p) for p in params]
        for inputs, targets in batches:
            grads = torch.autograd.grad(loss(inputs, targets), params)
            for acc, grad in zip(g, grads, strict=True):
                acc.add_(grad)
        for inputs, targets in batches:
            grads = torch.autograd.grad(loss(inputs, targets), params, create_graph=True)
            z = sum((gi.detach() * grad).sum() for gi, grad in zip(g, grads, strict=True))
            for acc, hvp in zip(hg, torch.autograd.grad(z, params), strict=True):
                acc.add_(hvp)
    return {n: (p.detach() * h).detach() for n, p, h in zip(names, params, hg, strict=True)}


@register("synflow", rounds=100)
def synflow(model: nn.Module, names: Sequence[str], context: Context) -> Scores:
    """``|w * dR/dw|`` of the absolute-weight network on an all-ones input (Tanaka et al. 2020).

    Runs on a double-precision copy in eval mode, so the model itself is untouched; the scores
    stay in double precision, as products over many layers underflow float32.
    """
    shape = context.input_shape or getattr(model, "input_shape", None)
    if shape is None:
        raise PruningError("synflow needs the input shape: build the model with "
                           "prunescope.models.build or pass input_shape=")
    linear = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for param in linear.parameters():
            param.abs_()
    params = _params(linear, names)
    device = params[0].device
    output = linear(torch.ones((1, *shape), dtype=torch.float64, device=device))
    grads = torch.autograd.grad(output.sum(), params)
    return {n: (g * p).detach().abs() for n, g, p in zip(names, grads, params, strict=True)}


CRITERIA.register_lazy("woodfisher", "prunescope.second_order.woodfisher:CRITERION")
CRITERIA.register_lazy("obc", "prunescope.second_order.exact_obc:CRITERION")
CRITERIA.register_lazy("sparsegpt", "prunescope.second_order.obc:CRITERION")
