"""Choosing which tensors of a model are prunable.

By default every ``weight`` of a Linear or Conv (1d/2d/3d) layer is a target; biases, batch-norm
and embeddings are not. ``include`` / ``exclude`` are shell-style globs over parameter names
(``fnmatch``), e.g. ``include=["features.*"]``, ``exclude=["classifier.*", "*.bias"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

from prunescope.errors import PruningError

PRUNABLE_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def default_targets(model: nn.Module) -> list[str]:
    """Names of the weights of every Linear and Conv layer, in model order."""
    return [
        f"{module_name}.weight" if module_name else "weight"
        for module_name, module in model.named_modules()
        if isinstance(module, PRUNABLE_LAYERS)
    ]


def select(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> list[str]:
    """Names of the prunable parameters of ``model``, in model order.

    ``include=None`` means the default targets (Linear and Conv weights); otherwise every
    parameter matching one of the ``include`` globs. Names matching an ``exclude`` glob are
    dropped. Raises :class:`PruningError` when nothing is left.
    """
    if include is None:
        candidates = default_targets(model)
    else:
        candidates = [
            name for name, _ in model.named_parameters()
            if any(fnmatchcase(name, pattern) for pattern in include)
        ]
    names = [n for n in candidates if not any(fnmatchcase(n, p) for p in exclude)]
    if not names:
        hint = f"include={list(include)}" if include is not None else "no Linear or Conv weights"
        raise PruningError(
            f"the model has no prunable tensor ({hint}, exclude={list(exclude)}); "
            "give include globs that match its parameter names"
        )
    return names
