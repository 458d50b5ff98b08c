"""ELSA: nested sparse networks by partial weight freezing (Halvachi, Peste, Alistarh, Lampert
2023, "ELSA: Partial Weight Freezing for Overhead-Free Sparse Network Deployment",
arXiv 2312.06872).

One dense network embeds sparse networks at several sparsities, each a subset of the next
denser one, so a deployment picks its level at load time by zeroing weights along a mask. The
procedure (the paper's outline; the details PackNet-style, see ``docs/elsa.md``):

1. sparsify to the highest sparsity with any sparsifier (``top``: ``gmp``, ``acdc``,
   ``one_shot`` pruning the run's dense model by any criterion, OBS / WoodFisher included, and
   fine-tuning it, ``rigl`` or ``set``);
2. for each next denser level: freeze the surviving weights (gradients and optimizer state
   zeroed, values written back after every step, so they stay bit-identical), admit the
   weights of the next level (``admission``: ``dense``, by the magnitude of the run's trained
   dense model; ``regrow``, by their own magnitude after a short training of every free weight)
   starting from their dense values (``start: init``: the run's initialisation), and train them
   with every other weight pruned, for that level's epochs, with the run's training or
   fine-tuning config (``level_config``, ``level_lr``); biases and norms keep training or stay
   as the top level left them (``rest``);
3. write one nested checkpoint (:mod:`prunescope.nested`) holding every level.

The method runs once, at its top level: its ``levels`` replace the recipe's ``sparsities``, and
one call of ``run_one`` returns one result per level (labels ``elsa@0.98``, ``elsa@0.95``...,
directories ``OUT/elsa/s<level>``), with the nested checkpoint at ``OUT/elsa/nested.safetensors``.
Each level's directory also holds that level's own checkpoint (``model.safetensors``, metadata
``method: {method: elsa, sparsity: <level>, levels: [...]}``), so the audit sees every level,
the dense one included, as a compressed model of the run's dense network; under
``audit.methods`` the method runs once per seed and every level joins its population.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunescope import checkpoint, nested
from prunescope.errors import ConfigError
from prunescope.keys import ADDED_LATER
from prunescope.mask import Mask
from prunescope.methods.base import Method, register
from prunescope.methods.gmp import GMP
from prunescope.methods.rigl import reset_state
from prunescope.pipeline import FINETUNE
from prunescope.run import Run
from prunescope.sparsifier import MaskHold
from prunescope.train import FINAL, TrainConfig

NESTED = "nested.safetensors"
TOP_METHODS = ("gmp", "acdc", "one_shot", "rigl", "set")  # each ends in directories()[0]/FINAL
ADMISSIONS = ("dense", "regrow")
STARTS = ("dense", "init")
LEVEL_CONFIGS = ("finetune", "train")
RESTS = ("train", "freeze")


class FreezeHold(MaskHold):
    """Hold ``mask`` (pruned weights stay zero, as :class:`MaskHold`) and freeze the weights
    ``frozen`` keeps (a subset of ``mask``): their gradients and optimizer state (momentum,
    Adam moments) are zeroed before each step and their values written back after it, so
    weight decay and momentum cannot move them: they stay bit-identical.

    ``mask=None`` with ``admit_at=(step, sparsity)`` is the ``regrow`` admission: every free
    weight trains until ``step``, where the mask becomes :func:`admit` of ``frozen`` by the
    free weights' own magnitudes at ``sparsity`` (held from then on). ``freeze_rest`` drops
    the gradient of every parameter outside ``frozen``'s tensors (biases, norms) before each
    step, so the optimizer skips them: they keep their values (buffers such as batch-norm
    running statistics are not parameters and still update in training mode).

    The frozen values are those the model holds when training starts (:meth:`hold_` before
    the first step; after a resume, the restored ones, which are the same).
    """

    def __init__(self, mask: Mask | None, frozen: Mask, *,
                 admit_at: tuple[int, float] | None = None, freeze_rest: bool = False) -> None:
        super().__init__(mask)
        if mask is None and admit_at is None:
            raise ValueError("FreezeHold needs a mask or admit_at")
        self.frozen, self.admit_at, self.freeze_rest = frozen, admit_at, freeze_rest
        self._values: dict[str, torch.Tensor] = {}
        self._frozen_params: dict[str, nn.Parameter] = {}

    def hold_(self, model: nn.Module) -> None:
        super().hold_(model)
        self._frozen_params = self.frozen.resolve(model)
        self._values = {n: p.detach().clone() for n, p in self._frozen_params.items()}

    @torch.no_grad()
    def on_step(self, model: nn.Module, step: int, optimizer=None) -> None:
        if self.mask is None and self.admit_at is not None and step >= self.admit_at[0]:
            self.mask = admit(self.frozen, self._frozen_params, self.admit_at[1])
            MaskHold.hold_(self, model)
            if optimizer is not None:  # the pruned weights' momentum must not revive them
                for name, param in self._frozen_params.items():
                    reset_state(optimizer, param, ~self.mask[name].to(param.device))

    @torch.no_grad()
    def before_optimizer_step(self, model: nn.Module, step: int, optimizer=None,
                              closure=None) -> bool:
        super().before_optimizer_step(model, step, optimizer, closure)
        for name, param in self._frozen_params.items():
            if param.grad is not None:
                param.grad.masked_fill_(self._keep(name, param), 0.0)
        if self.freeze_rest:
            for name, param in model.named_parameters():
                if name not in self._frozen_params:
                    param.grad = None
        self._zero_state(optimizer)
        return True

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module, step: int, optimizer=None) -> None:
        MaskHold.hold_(self, model)  # re-zero the pruned weights (this class's hold_ snapshots)
        for name, param in self._frozen_params.items():
            param.copy_(torch.where(self._keep(name, param), self._values[name], param))
        self._zero_state(optimizer)  # coupled weight decay wrote into the momentum

    def _zero_state(self, optimizer) -> None:
        """Zero the frozen weights' entries of every per-weight optimizer state tensor."""
        if optimizer is None:
            return
        for name, param in self._frozen_params.items():
            reset_state(optimizer, param, self._keep(name, param))

    def _keep(self, name: str, param: torch.Tensor) -> torch.Tensor:
        return self.frozen[name].to(param.device)


def admit(frozen: Mask, scores: dict[str, torch.Tensor], sparsity: float) -> Mask:
    """The mask at ``sparsity`` that keeps every weight of ``frozen`` and fills the rest of the
    budget with the free weights of the largest ``|scores|``, globally (ties to the lower
    index, tensors in ``frozen``'s order). Keeps ``round((1 - sparsity) * total)`` weights, at
    least those of ``frozen``."""
    names = list(frozen)
    total = frozen.num_total
    count = max(frozen.num_kept, round((1.0 - sparsity) * total))
    flat = torch.cat([torch.where(frozen[n].cpu(), torch.inf, scores[n].detach().cpu().abs()
                                  .double()).reshape(-1) for n in names])
    chosen = torch.zeros(total, dtype=torch.bool)
    chosen[torch.sort(flat, descending=True, stable=True).indices[:count]] = True
    keeps, offset = {}, 0
    for name in names:
        size = frozen[name].numel()
        keeps[name] = chosen[offset:offset + size].reshape(frozen[name].shape).to(
            frozen[name].device)
        offset += size
    return Mask(keeps)


@register("elsa")
@dataclass(frozen=True)
class ELSA(Method):
    """``levels``: sparsities from the sparsest (reached by ``top``, any of ``gmp``, ``acdc``,
    ``one_shot`` (e.g. ``criterion: woodfisher``, global OBS), ``rigl``, ``set`` with its own
    keys) to the densest (0 for the dense model). Each level after the first trains for its
    ``level_epochs`` (default: the config's epochs), scaled by ``budget``, with the run's
    ``level_config`` (``train``, the default chosen on validation data, docs/elsa.md, or
    ``finetune``: its optimizer, rate and schedule), at ``level_lr`` (one rate per level after
    the first; default: the config's).
    ``admission``: ``dense`` (default: the free weights of largest magnitude in the run's
    trained dense model) or ``regrow`` (every free weight trains for the first ``regrow``
    fraction of the level's steps; then those of largest magnitude are kept). ``start``: the
    values the admitted (``regrow``: the free) weights start from, the trained dense model's
    (``dense``, default) or the run's initialisation (``init``, with ``regrow`` only: ELSA
    then never reads the trained dense model).
    ``rest``: ``train`` (default: biases and norms train at every level) or ``freeze`` (they
    keep the top level's values). The recipe's ``sparsities`` do not apply: the method runs
    once, at its top level."""

    method: str = "elsa"
    levels: tuple[float, ...] = (0.98, 0.95, 0.9, 0.0)
    top: Method = field(default_factory=GMP)
    level_epochs: tuple[int, ...] = ()
    level_config: str = "train"
    level_lr: tuple[float, ...] = ()
    admission: str = "dense"
    regrow: float = 0.25
    start: str = field(default="dense", metadata=ADDED_LATER)
    rest: str = "train"

    def __post_init__(self) -> None:
        levels = nested._check_levels(self.levels)
        if self.sparsities is not None and tuple(self.sparsities) != levels[:1]:
            raise ConfigError(
                f"elsa runs once over its levels; set levels: [...] instead of sparsities "
                f"(got sparsities {list(self.sparsities)})")
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "sparsities", levels[:1])
        super().__post_init__()
        if self.top.method not in TOP_METHODS:
            raise ConfigError(f"elsa: top must be one of {', '.join(TOP_METHODS)}, got "
                              f"{self.top.method!r}")
        for key, values in (("level_epochs", self.level_epochs), ("level_lr", self.level_lr)):
            if values and len(values) != len(levels) - 1:
                raise ConfigError(f"elsa: {key} needs one entry per level after the first "
                                  f"({len(levels) - 1}), got {len(values)}")
        if any(epochs < 1 for epochs in self.level_epochs):
            raise ConfigError(f"elsa: level_epochs must be >= 1, got {list(self.level_epochs)}")
        if any(not lr > 0 for lr in self.level_lr):
            raise ConfigError(f"elsa: level_lr must be > 0, got {list(self.level_lr)}")
        for key, value, allowed in (("level_config", self.level_config, LEVEL_CONFIGS),
                                    ("admission", self.admission, ADMISSIONS),
                                    ("start", self.start, STARTS),
                                    ("rest", self.rest, RESTS)):
            if value not in allowed:
                raise ConfigError(f"elsa: {key} must be one of {', '.join(allowed)}, "
                                  f"got {value!r}")
        if self.start == "init" and self.admission != "regrow":
            raise ConfigError("elsa: start: init needs admission: regrow (admission: dense "
                              "chooses by the trained dense model's magnitudes)")
        if not 0.0 < self.regrow < 1.0:
            raise ConfigError(f"elsa: regrow (the fraction of a level's steps before its "
                              f"weights are chosen) must be in (0, 1), got {self.regrow}")

    def key(self) -> dict[str, Any]:
        fields = super().key()
        fields["top"] = self.top.key()
        return fields

    # -- outputs ------------------------------------------------------------------------------
    def outputs(self) -> tuple[str, ...]:
        return tuple(f"{self.label}@{level:g}" for level in self.levels)

    def directories(self, run: Run, sparsity: float) -> list[Path]:
        return [run.dir(self.label, level) for level in self.levels]

    def nested_path(self, run: Run) -> Path:
        """Where the nested checkpoint of every level goes."""
        return run.dir(self.label) / NESTED

    def top_method(self) -> Method:
        """The top-level sparsifier, writing under ``OUT/<label>/top``."""
        return dataclasses.replace(self.top, name=f"{self.label}/top", sparsities=None)

    def check(self, run: Run, sparsities: tuple[float, ...]) -> None:
        if tuple(sparsities) != self.levels[:1]:
            raise ConfigError(
                f"elsa runs once, at its top level {self.levels[0]:g}, and returns every level "
                f"({nested.describe(self.levels)}); it cannot run at sparsities "
                f"{list(sparsities)} (set its levels instead)")
        self.top_method().check(run, self.levels[:1])

    def audit_sparsities(self, sparsities: tuple[float, ...]) -> tuple[float, ...]:
        """Its levels are its sparsities: the audit runs it once, at its top level."""
        return self.levels[:1]

    def audit_directories(self, run: Run, sparsity: float) -> list[Path]:
        """Every level, the dense one included: each is a network of the same dense model."""
        return self.directories(run, sparsity)

    def train_config(self, run: Run, index: int) -> TrainConfig:
        """The training of level ``index`` (>= 1): the run's training config or its fine-tuning
        config (``level_config``; the pipeline's default when the run has none), with the
        level's epochs and rate, the epochs scaled by ``budget``."""
        base = run.train if self.level_config == "train" else run.finetune or FINETUNE
        if self.level_epochs:
            base = dataclasses.replace(base, epochs=self.level_epochs[index - 1])
        if self.level_lr:
            base = dataclasses.replace(base, lr=self.level_lr[index - 1])
        return run.train_config(self.budget, base)

    # -- computing ----------------------------------------------------------------------------
    def run_one(self, run: Run, sparsity: float) -> list[dict[str, Any]]:
        """Every level's result (sparsest first) and the nested checkpoint."""
        top = self.top_method()
        top.run_one(run, self.levels[0])
        path = top.directories(run, self.levels[0])[0] / FINAL
        model = run.load(path)
        mask = checkpoint.load(path).mask or Mask.from_weights(model)
        mask = mask.to(run.device)
        mask.apply_(model)
        checkpoint.save(run.dir(self.label, self.levels[0]) / FINAL, model, mask=mask,
                        meta=run.meta(model, method=self.level_meta(0)))
        masks, rests = [mask], [_rest(model, mask)]
        results = [self._result(run, model, mask, 0, top=top.label)]
        dense = self._reference(run) if len(self.levels) > 1 else None
        for index in range(1, len(self.levels)):
            mask = self._train_level(run, model, dense, masks[-1], index)
            masks.append(mask)
            rests.append(_rest(model, mask))
            results.append(self._result(run, model, mask, index))
        nested.save(self.nested_path(run), model, nested.NestedMask(self.levels, masks),
                    rest=rests, meta=run.meta(model, method={"method": self.label,
                                                             "levels": list(self.levels)}))
        return results

    def _reference(self, run: Run) -> nn.Module:
        """The model whose values the admitted weights start from (``start``) and, for
        ``admission: dense``, whose magnitudes admit them: the run's trained dense model, or
        its initialisation (``start: init`` with ``regrow``: the dense model is never read)."""
        if self.start == "init" and self.admission == "regrow":
            return run.fresh_model()  # the initialisation the run's models start from
        return run.load(run.dense_path())

    def _train_level(self, run: Run, model: nn.Module, dense: nn.Module, frozen: Mask,
                     index: int) -> Mask:
        """Admit level ``index``'s weights (by ``admission``) at their ``start`` values and
        train them with the previous level's weights frozen; returns the level's mask."""
        level, config = self.levels[index], self.train_config(run, index)
        reference = dict(dense.named_parameters())
        if self.admission == "regrow" and level > 0:
            mask, admit_at = None, (self._regrow_steps(run, config), level)
            start = Mask({n: ~frozen[n] for n in frozen})  # every free weight trains first
        else:
            mask, admit_at = admit(frozen, {n: reference[n] for n in frozen}, level), None
            start = Mask({n: mask[n] & ~frozen[n] for n in frozen})
        with torch.no_grad():
            for name, param in start.resolve(model).items():
                param.copy_(torch.where(start[name].to(param.device),
                                        reference[name].to(param.device), param))
        hook = FreezeHold(mask, frozen, admit_at=admit_at, freeze_rest=self.rest == "freeze")
        run.fit(model, run.dir(self.label, level), config, hook=hook,
                desc=f"{self.label} level {level:g}", method=self.level_meta(index))
        return hook.mask

    def _regrow_steps(self, run: Run, config: TrainConfig) -> int:
        """The step at which ``regrow`` chooses the level's weights: ``regrow`` of its steps,
        at least one, and before the last (step 0 when the level has one step)."""
        steps = config.epochs * math.ceil(len(run.splits.train) / config.batch_size)
        return min(steps - 1, max(1, round(self.regrow * steps)))

    def level_meta(self, index: int) -> dict[str, Any]:
        """The ``method`` metadata of level ``index``'s checkpoint: the audit groups it by
        label and sparsity, and ``levels`` marks it as one level of a nested network."""
        return {"method": self.label, "sparsity": self.levels[index],
                "levels": list(self.levels)}

    def _result(self, run: Run, model: nn.Module, mask: Mask, index: int,
                **extra: Any) -> dict[str, Any]:
        level = self.levels[index]
        return run.result(model, mask, method=self.label, sparsity=level, level=level,
                          levels=list(self.levels), output=self.outputs()[index],
                          nested=str(self.nested_path(run)), **extra)


def _rest(model: nn.Module, mask: Mask) -> dict[str, torch.Tensor]:
    """The model's state outside the mask (biases, norms), copied."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in mask}
