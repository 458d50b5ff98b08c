"""What every method shares: its config base class and the sparse-training stage.

A method is a frozen dataclass of its own recipe keys with three operations on a
:class:`~prunescope.run.Run`:

- ``check(run, sparsities)``: raise what the method would fail on, before anything trains;
- ``directories(run, sparsity)``: where its results at one sparsity go (one per output);
- ``run_one(run, sparsity)``: compute those results (training resumes from its checkpoints).

A method never reads a recipe and never decides whether a result can be reused: the experiment
stages (:mod:`prunescope.stages`) compare :meth:`Method.key` with what a directory holds and
call ``run_one`` only when needed. A new method is one file: a registered subclass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunescope.allocation import check_sparsity
from prunescope.errors import ConfigError
from prunescope.hooks import Hook
from prunescope.keys import key_fields
from prunescope.registry import Registry
from prunescope.run import UNITS, Run

METHODS: Registry[type[Method]] = Registry("method")


def register(name: str):
    """Class decorator registering a method config under ``name`` (its ``method:`` key)."""
    return METHODS.register(name)


@dataclass(frozen=True)
class Method:
    """Fields every method has: ``name`` overrides its label in results, ``sparsities``
    overrides the recipe's list, ``budget`` scales the training length (1x, 2x, 5x; Evci et
    al. 2020 show sparse networks are under-trained on dense schedules)."""

    method: str = ""
    name: str | None = None
    sparsities: tuple[float, ...] | None = None
    budget: float = 1.0

    def __post_init__(self) -> None:
        if not self.budget > 0 or not math.isfinite(self.budget):
            raise ConfigError(f"{self.method}: budget must be a positive number, got {self.budget}")
        for value in self.sparsities or ():
            check_sparsity(value, f"{self.method}: each of sparsities")

    @property
    def label(self) -> str:
        """The name used in results and run directories."""
        if self.name:
            return self.name
        return self.default_label() + (f"-{self.budget:g}x" if self.budget != 1 else "")

    def default_label(self) -> str:
        return self.method

    def key(self) -> dict[str, Any]:
        """What determines this method's results (its config, without ``name`` and the
        ``sparsities`` list, which only select what runs)."""
        fields = key_fields(self)
        return {k: v for k, v in fields.items() if k not in ("name", "sparsities")}

    @property
    def results_per_sparsity(self) -> int:
        return len(self.outputs())

    def outputs(self) -> tuple[str, ...]:
        """The labels of the results at one sparsity (controls and baselines add some)."""
        return (self.label,)

    def directories(self, run: Run, sparsity: float) -> list[Path]:
        """Where each output's files and ``result.json`` go at ``sparsity``."""
        return [run.dir(label, sparsity) for label in self.outputs()]

    def check(self, run: Run, sparsities: tuple[float, ...]) -> None:
        """Raise the error this method would meet, before anything trains (default: none)."""

    def audit_sparsities(self, sparsities: tuple[float, ...]) -> tuple[float, ...]:
        """The sparsities at which the audit runs this method for its populations, given the
        audit's own (default: those)."""
        return tuple(sparsities)

    def audit_directories(self, run: Run, sparsity: float) -> list[Path]:
        """The outputs at ``sparsity`` that the audit treats as compressed models of the dense
        network, a prefix of :meth:`directories` (default: the first; controls and baselines
        are not compressions)."""
        return self.directories(run, sparsity)[:1]

    def run_one(self, run: Run, sparsity: float) -> list[dict[str, Any]]:
        """The results at ``sparsity``, one per :meth:`directories` entry, in that order."""
        raise NotImplementedError


def train_from_scratch(run: Run, method: Method, sparsity: float,
                       make_hook: Callable[[nn.Module], Hook]) -> list[dict[str, Any]]:
    """The sparse-training stage: a fresh model trained on the method's budget under the hook
    ``make_hook(model)`` builds, into ``OUT/<label>/s<sparsity>``, with the hook's final mask
    in the result."""
    directory = method.directories(run, sparsity)[0]
    model = run.fresh_model()
    hook = make_hook(model)
    fields = {"method": method.label, "sparsity": sparsity}
    run.fit(model, directory, run.train_config(method.budget), hook=hook,
            desc=f"{method.label} s={sparsity:g}", method=fields)
    return [run.result(model, hook.mask, **fields)]


def check_unit(method: str, unit: str) -> None:
    if unit not in UNITS:
        raise ConfigError(f"{method}: unit must be one of {UNITS}, got {unit!r}")


def generator_state(generator: torch.Generator) -> str:
    """A generator's state as JSON-able text (for a hook's ``state_dict``)."""
    import base64

    return base64.b64encode(generator.get_state().numpy().tobytes()).decode()


def restore_generator(generator: torch.Generator, text: str | None) -> None:
    """Inverse of :func:`generator_state` (nothing to do for ``None``)."""
    import base64

    if text:
        raw = bytearray(base64.b64decode(text))
        generator.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())
