"""Pruning: criterion scores -> allocation -> pattern -> mask, and the training-loop hooks.

:func:`prune` is the one-shot entry point (optionally in several rounds, or to a target
*effective* sparsity). :class:`MaskHold` and :class:`ScheduledPruning` are the hooks the training
loop calls around each optimizer step, so that pruned weights stay exactly zero while training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from prunescope import devices, distributed
from prunescope.allocation import ALLOCATIONS, allocate, check_min_density, check_sparsity
from prunescope.criteria import Batch, Context, Criterion, resolve
from prunescope.errors import PruningError
from prunescope.hooks import Hook
from prunescope.interop import fold_torch_prune
from prunescope.mask import Mask
from prunescope.patterns import Pattern, parse_pattern
from prunescope.targets import parameters, select

logger = logging.getLogger(__name__)


def prune(
    model: nn.Module,
    criterion: str | Criterion = "magnitude",
    allocation: str = "global",
    sparsity: float | None = 0.9,
    data: Iterable[Batch] | None = None,
    *,
    pattern: str = "unstructured",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    overrides: Mapping[str, float] | None = None,
    rounds: int | None = None,
    mask: Mask | None = None,
    effective: bool = False,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    seed: int = 0,
    input_shape: tuple[int, ...] | None = None,
    min_density: float | None = None,
) -> Mask:
    """Prune ``model`` in place to ``sparsity`` and return the :class:`Mask`.

    Pruned weights become exactly zero. ``criterion`` and ``allocation`` are registered names
    (see ``prunescope.criteria.CRITERIA`` and ``prunescope.allocation.ALLOCATIONS``), or the
    criterion is a :class:`~prunescope.criteria.Criterion` (e.g. a configured second-order one,
    ``prunescope.second_order.WoodFisher(block_size=100).criterion()``); ``data``
    is an iterable of ``(inputs, targets)`` batches for data-driven criteria (snip, grasp,
    taylor). ``rounds`` > 1 prunes iteratively, re-scoring between rounds, with the density
    shrinking geometrically from the starting mask (SynFlow defaults to its paper's 100 rounds).
    ``mask`` is a starting mask whose pruned weights stay pruned. With ``effective=True`` the
    direct sparsity is raised by bisection until the *effective* sparsity reaches ``sparsity``
    (Vysogorets & Kempe 2023); the returned mask is the direct one. An N:M ``pattern`` fixes the
    sparsity at 1 - N/M (pass that or None) and ignores the allocation.

    ``min_density`` is a floor per tensor, so that no layer is pruned away: by default (None)
    every tensor keeps at least one weight per output unit (row of a Linear weight, output
    channel of a Conv), and unstructured selection keeps each row's best weight, so no output
    unit is disconnected; a float in (0, 1) also keeps at least that density of every tensor;
    ``0.0`` turns the floor off. The budget the floors take moves to the other tensors, so the
    global sparsity is still met exactly; floors above the budget raise PruningError. A tensor
    the allocation would have pruned entirely, or one left fully pruned, is named in a WARNING
    line. Block patterns keep one block per band of R rows; N:M patterns keep N of every M in
    every row anyway (a ``min_density`` above N/M raises PruningError).

    A model still carrying ``torch.nn.utils.prune``'s reparametrisation is folded first
    (:func:`prunescope.interop.fold_torch_prune`, one INFO line); the weights torch pruned stay
    pruned (the starting mask is intersected with torch's).

    Example::

        model = prunescope.models.build("lenet300")
        mask = prunescope.prune(model, "magnitude", "global", sparsity=0.9)
        print(mask.sparsity)  # 0.9
    """
    spec = resolve(criterion)
    ALLOCATIONS.get(allocation)
    parsed = _floored(parse_pattern(pattern), check_min_density(min_density))
    sparsity = _target_sparsity(sparsity, parsed)
    held = fold_torch_prune(model)
    start = mask if mask is not None else Mask.ones(model, select(model, include, exclude))
    start.check(model)
    start = _within(start, held)
    start.apply_(model)
    context = Context(
        batches=_on_device(data, model), loss_fn=loss_fn,
        generator=torch.Generator().manual_seed(seed), input_shape=input_shape,
    )
    plan = _Plan(spec, allocation, parsed, overrides, context, min_density)
    n_rounds = spec.rounds if rounds is None else rounds
    n_rounds = 1 if parsed.kind == "nm" else _check_rounds(n_rounds)
    if effective:
        result = _prune_to_effective(model, start, sparsity, n_rounds, plan)
    else:
        result = plan.run(model, start, sparsity, n_rounds)
    _warn_pruned_away(result, min_density)
    return result


def check(
    model: nn.Module,
    criterion: str | Criterion = "magnitude",
    allocation: str = "global",
    sparsity: float | None = 0.9,
    *,
    pattern: str = "unstructured",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    overrides: Mapping[str, float] | None = None,
    min_density: float | None = None,
) -> None:
    """Raise the error :func:`prune` would raise for this request, without scoring anything.

    Checks the names, the targets, the sparsity against the pattern, that the pattern fits every
    target and that the overrides and the ``min_density`` floors can be reconciled: so a long
    run can fail before it starts. The model is not changed (a torch-pruned one included).
    """
    resolve(criterion)
    parsed = _floored(parse_pattern(pattern), check_min_density(min_density))
    sparsity = _target_sparsity(sparsity, parsed)
    params = parameters(model)
    zeros = {n: torch.zeros(params[n].shape) for n in select(model, include, exclude)}
    for name, score in zeros.items():
        parsed.select(name, score, 0)
    if parsed.kind != "nm":
        floors = {n: parsed.floor(score, min_density) for n, score in zeros.items()}
        allocate(zeros, sparsity, allocation, overrides, floors=floors, warned=set(zeros))


def _floored(pattern: Pattern, min_density: float | None) -> Pattern:
    """``pattern`` keeping every output unit unless ``min_density == 0``; checks that an N:M
    pattern's fixed density meets the floor."""
    if pattern.kind == "nm" and (min_density or 0.0) > pattern.fixed_density + 1e-12:
        raise PruningError(
            f"pattern {pattern} keeps density {pattern.fixed_density:g} in every tensor, below "
            f"min_density={min_density}; lower min_density or choose a denser pattern"
        )
    return replace(pattern, every_row=min_density != 0.0)


def _within(start: Mask, held: Mask | None) -> Mask:
    """``start`` with the weights ``held`` (torch's mask of a folded model) prunes pruned too."""
    if held is None:
        return start
    return Mask({n: keep & held[n].to(keep.device) if n in held else keep
                 for n, keep in start.items()})


def _warn_pruned_away(mask: Mask, min_density: float | None) -> None:
    for name, keep in mask.items():
        if keep.numel() and not keep.any():
            logger.warning("%r is pruned entirely (min_density=%s): the layer is cut off and "
                           "passes on only its bias", name, min_density)


class _Plan:
    """The fixed parts of a pruning request, run for one target sparsity at a time."""

    def __init__(self, spec: Criterion, allocation: str, pattern: Pattern,
                 overrides: Mapping[str, float] | None, context: Context,
                 min_density: float | None) -> None:
        self.spec, self.allocation, self.pattern = spec, allocation, pattern
        self.overrides = dict(overrides or {})
        self.context = context
        self.min_density = min_density
        self.warned: set[str] = set()  # layers already named in a floor warning

    def run(self, model: nn.Module, start: Mask, sparsity: float, rounds: int) -> Mask:
        if sparsity < start.sparsity - 1e-12 and self.pattern.kind != "nm":
            raise PruningError(
                f"the starting mask is already at sparsity {start.sparsity:.4f} > {sparsity}; "
                "pruning cannot regrow weights"
            )
        current = start
        for r in range(1, rounds + 1):
            fraction = r / rounds
            target = 1.0 - start.density * ((1.0 - sparsity) / start.density) ** fraction
            overrides = {k: 1.0 - (1.0 - v) ** fraction for k, v in self.overrides.items()}
            current = self.once(model, current, target, overrides)
            current.apply_(model)
        return current

    def once(self, model: nn.Module, current: Mask, sparsity: float,
             overrides: Mapping[str, float]) -> Mask:
        names = list(current)
        scores = self.spec.score(model, names, self.context)
        for name, score in scores.items():
            if torch.isnan(score).any():
                raise PruningError(
                    f"criterion {self.spec.name!r} gave NaN scores for {name!r}; "
                    "check the model and data for NaN"
                )
        live = {n: torch.where(current[n].to(s.device), s.double(), -torch.inf)
                for n, s in scores.items()}
        counts = {n: 0 for n in names} if self.pattern.kind == "nm" else allocate(
            live, sparsity, self.allocation, overrides, warned=self.warned,
            floors={n: self.pattern.floor(s, self.min_density) for n, s in live.items()})
        if self.spec.solve is not None:
            return self.spec.solve(model, current, counts, self.pattern, self.context)
        return Mask({
            n: self.pattern.select(n, live[n], counts[n]).to(current[n].device) & current[n]
            for n in names
        })


def _target_sparsity(sparsity: float | None, pattern: Pattern) -> float:
    if pattern.fixed_density is None:
        if sparsity is None:
            raise PruningError("give a sparsity in [0, 1) (None is only valid with an N:M pattern)")
        return check_sparsity(sparsity)
    implied = 1.0 - pattern.fixed_density
    if sparsity is not None and abs(check_sparsity(sparsity) - implied) > 1e-9:
        raise PruningError(
            f"pattern {pattern} fixes sparsity at {implied:g}, but sparsity={sparsity} was given; "
            "pass that sparsity or none"
        )
    return implied


def _check_rounds(rounds: int) -> int:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise PruningError(f"rounds must be a positive integer, got {rounds!r}")
    return rounds


def _on_device(data: Iterable[Batch] | None, model: nn.Module) -> list[Batch]:
    return devices.batches_to(devices.model_device(model), data or [])


def _prune_to_effective(model: nn.Module, start: Mask, target: float, rounds: int,
                        plan: _Plan) -> Mask:
    """Smallest direct sparsity whose effective sparsity reaches ``target``, by bisection.

    Effective sparsity is never below the direct one, so the answer lies in
    ``[start sparsity, target]``; the bisection runs over the integer count of kept weights.
    Every attempt restarts the criterion's generator, so random scores are the same in each.
    """
    from prunescope.connectivity import effective_sparsity

    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seed = plan.context.generator.initial_seed()

    def attempt(kept: int) -> Mask:
        """Prune the original model (every tensor restored: weight-correcting criteria also
        change biases) with the criterion's generator and scratch space reset."""
        model.load_state_dict(saved)
        plan.context.generator.manual_seed(seed)
        plan.context.cache.clear()
        return plan.run(model, start, 1.0 - kept / start.num_total, rounds)

    # keeps this many (rounded down): direct, hence effective, sparsity >= target
    low = math.floor((1.0 - target) * start.num_total + 1e-9)
    high = start.num_kept + 1  # the starting mask itself may reach the target
    while high - low > 1:
        middle = (low + high) // 2
        if effective_sparsity(model, attempt(middle)) >= target - 1e-12:
            low = middle
        else:
            high = middle
    return attempt(low)  # the model's weights are exactly this mask's


class MaskHold(Hook):
    """Training hook that keeps a fixed mask: gradients masked before the optimizer step,
    weights re-zeroed after it (so momentum and weight decay never revive them).

    The parameters are looked up once per (mask, model) pair, as an optimizer holds them:
    replacing the mask (``hook.mask = ...``) or passing another model looks them up again.
    """

    def __init__(self, mask: Mask | None) -> None:
        self.mask = mask
        self._resolved: tuple[Mask, nn.Module, dict[str, nn.Parameter]] | None = None

    def held(self) -> Mask | None:
        """The mask this hook holds on the model's parameters (``mask`` here)."""
        return self.mask

    def hold_(self, model: nn.Module) -> None:
        """Zero the held weights (before training starts, and after every optimizer step)."""
        mask = self.held()
        if mask is not None:
            mask.zero_(self._params(mask, model))

    def before_optimizer_step(self, model: nn.Module, step: int, optimizer=None,
                              closure=None) -> bool:
        mask = self.held()
        if mask is not None:
            mask.zero_grads_(self._params(mask, model))
        return True

    def after_optimizer_step(self, model: nn.Module, step: int, optimizer=None) -> None:
        self.hold_(model)

    def _params(self, mask: Mask, model: nn.Module) -> dict[str, nn.Parameter]:
        cached = self._resolved
        if cached is None or cached[0] is not mask or cached[1] is not model:
            cached = self._resolved = (mask, model, mask.resolve(model))
        return cached[2]


class ScheduledPruning(MaskHold):
    """Training hook that prunes on a schedule (one-shot, iterative, gradual) and holds the mask
    between updates; with gradual magnitude pruning this is Zhu & Gupta (2017). The schedule is
    stateless; the current mask is the only state, saved and restored with the checkpoint."""

    def __init__(self, schedule, criterion: str = "magnitude", allocation: str = "global", *,
                 data: Iterable[Batch] | None = None, **prune_options) -> None:
        super().__init__(None)
        self.schedule = schedule
        self.criterion, self.allocation = criterion, allocation
        self.data = data
        self.prune_options = prune_options

    def on_step(self, model: nn.Module, step: int, optimizer=None) -> None:
        if not self.schedule.is_update(step):
            return
        target = self.schedule.sparsity_at(step)
        if self.mask is not None and target <= self.mask.sparsity:
            return
        mask = prune(model, self.criterion, self.allocation, target, self.data,
                     mask=self.mask, rounds=1, **self.prune_options)
        self.mask = agree(model, mask)


def agree(model: nn.Module, mask: Mask) -> Mask:
    """Every process's copy of ``mask`` made rank 0's and applied (a no-op in one process).

    Processes compute masks from identical weights, so they agree already; this makes it
    certain against floating-point ties.
    """
    shared = Mask(distributed.broadcast_bool(mask.state()))
    shared.apply_(model)
    return shared
