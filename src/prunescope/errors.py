"""User-facing errors.

Every error a user can cause (a wrong path, an unknown name, an out-of-range number, a corrupt
checkpoint, a diverging run) is raised as a :class:`PrunescopeError` whose message is one line
saying what is wrong and how to fix it. The CLI prints ``error: <message>`` and exits with code 2;
library callers catch the class. Anything else that escapes is a bug in prunescope.
"""

from __future__ import annotations


class PrunescopeError(Exception):
    """Base class of the errors a user can cause and fix; the message is one actionable line."""


class ConfigError(PrunescopeError, ValueError):
    """A recipe, option or argument is malformed or out of range."""


class UnknownNameError(ConfigError, KeyError):
    """A name (model, dataset, criterion, ...) is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(PrunescopeError):
    """A dataset is missing, unreadable or inconsistent."""


class CheckpointError(PrunescopeError):
    """A checkpoint or mask file is missing, corrupt, untrusted or does not fit the model."""


class PruningError(PrunescopeError):
    """A pruning request cannot be satisfied (no prunable tensor, pattern does not divide, ...)."""


class TrainingError(PrunescopeError):
    """Training cannot continue (e.g. the loss became NaN)."""
