"""ELSA: nested sparse networks by partial weight freezing (Halvachi, Peste, Alistarh, Lampert
2023, "ELSA: Partial Weight Freezing for Overhead-Free Sparse Network Deployment",
arXiv 2312.06872).

One dense network embeds sparse networks at several sparsities, each a subset of the next
denser one, so a deployment picks its level at load time by zeroing weights along a mask. The
procedure (the paper's outline; the details PackNet-style, see ``docs/elsa.md``):

1. sparsify to the highest sparsity with any sparsifier (``top``: ``gmp``, ``one_shot``
   fine-tuning the run's dense model, ``rigl`` or ``set``);
2. for each next denser level: freeze the surviving weights (gradients and optimizer state
   zeroed, values written back after every step, so they stay bit-identical), admit the
   weights of the next level by the magnitude of the run's trained dense model, starting from
   their dense values, and train them with every other weight still pruned, for that level's
   epochs;
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunescope import checkpoint, nested
from prunescope.errors import ConfigError
from prunescope.mask import Mask
from prunescope.methods.base import Method, register
from prunescope.methods.gmp import GMP
from prunescope.methods.rigl import reset_state
from prunescope.pipeline import FINETUNE
from prunescope.run import Run
from prunescope.sparsifier import MaskHold
from prunescope.train import FINAL, TrainConfig

NESTED = "nested.safetensors"
TOP_METHODS = ("gmp", "one_shot", "rigl", "set")  # each ends in directories()[0]/FINAL + mask


class FreezeHold(MaskHold):
    """Hold ``mask`` (pruned weights stay zero, as :class:`MaskHold`) and freeze the weights
    ``frozen`` keeps (a subset of ``mask``): their gradients and optimizer state (momentum,
    Adam moments) are zeroed before each step and their values written back after it, so
    weight decay and momentum cannot move them: they stay bit-identical.

    The frozen values are those the model holds when training starts (:meth:`hold_` before
    the first step; after a resume, the restored ones, which are the same).
    """

    def __init__(self, mask: Mask, frozen: Mask) -> None:
        super().__init__(mask)
        self.frozen = frozen
        self._values: dict[str, torch.Tensor] = {}
        self._frozen_params: dict[str, nn.Parameter] = {}

    def hold_(self, model: nn.Module) -> None:
        super().hold_(model)
        self._frozen_params = self.frozen.resolve(model)
        self._values = {n: p.detach().clone() for n, p in self._frozen_params.items()}

    @torch.no_grad()
    def before_optimizer_step(self, model: nn.Module, step: int, optimizer=None,
                              closure=None) -> bool:
        super().before_optimizer_step(model, step, optimizer, closure)
        for name, param in self._frozen_params.items():
            if param.grad is not None:
                param.grad.masked_fill_(self._keep(name, param), 0.0)
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
    """``levels``: sparsities from the sparsest (reached by ``top``, any of ``gmp``,
    ``one_shot``, ``rigl``, ``set`` with its own keys) to the densest (0 for the dense model);
    ``level_epochs``: the training epochs of each level after the first (default: the run's
    fine-tuning epochs), scaled by ``budget``, with the run's fine-tuning config. The recipe's
    ``sparsities`` do not apply: the method runs once, at its top level."""

    method: str = "elsa"
    levels: tuple[float, ...] = (0.98, 0.95, 0.9, 0.0)
    top: Method = field(default_factory=GMP)
    level_epochs: tuple[int, ...] = ()

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
        if self.level_epochs and len(self.level_epochs) != len(levels) - 1:
            raise ConfigError(f"elsa: level_epochs needs one entry per level after the first "
                              f"({len(levels) - 1}), got {len(self.level_epochs)}")
        if any(epochs < 1 for epochs in self.level_epochs):
            raise ConfigError(f"elsa: level_epochs must be >= 1, got {list(self.level_epochs)}")

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

    def level_config(self, run: Run, index: int) -> TrainConfig:
        """The training of level ``index`` (>= 1): the run's fine-tuning config (the pipeline's
        default when it has none) with the level's epochs, scaled by ``budget``."""
        base = run.finetune or FINETUNE
        if self.level_epochs:
            base = dataclasses.replace(base, epochs=self.level_epochs[index - 1])
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
        dense = run.load(run.dense_path()) if len(self.levels) > 1 else None
        for index in range(1, len(self.levels)):
            mask = self._train_level(run, model, dense, masks[-1], index)
            masks.append(mask)
            rests.append(_rest(model, mask))
            results.append(self._result(run, model, mask, index))
        nested.save(self.nested_path(run), model, nested.NestedMask(self.levels, masks),
                    rest=rests, meta=run.meta(model, method={"method": self.label,
                                                             "levels": list(self.levels)}))
        return results

    def _train_level(self, run: Run, model: nn.Module, dense: nn.Module, frozen: Mask,
                     index: int) -> Mask:
        """Admit level ``index``'s weights at their dense values and train them with the
        previous level's weights frozen; returns the level's mask."""
        level = self.levels[index]
        reference = dict(dense.named_parameters())
        mask = admit(frozen, {n: reference[n] for n in frozen}, level)
        with torch.no_grad():
            params = mask.resolve(model)
            for name, param in params.items():
                admitted = (mask[name] & ~frozen[name]).to(param.device)
                param.copy_(torch.where(admitted, reference[name].to(param.device), param))
        hook = FreezeHold(mask, frozen)
        run.fit(model, run.dir(self.label, level), self.level_config(run, index), hook=hook,
                desc=f"{self.label} level {level:g}", method=self.level_meta(index))
        return hook.mask

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
