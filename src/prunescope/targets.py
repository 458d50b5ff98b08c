"""Choosing which tensors of a model are prunable.

By default every ``weight`` of a Linear or Conv (1d/2d/3d) layer is a target (of a model that
names its ``prunable`` part, those inside it: a transformer's encoder); biases, batch-norm,
layer norms and embeddings are not. ``include`` / ``exclude`` are shell-style globs over
parameter names (``fnmatch``), e.g. ``include=["features.*"]``,
``exclude=["classifier.*", "*.bias"]``.

The names a mask may use are those of :func:`parameters`: every alias of a tied parameter (one
``Parameter`` under two names, e.g. an embedding and an output layer sharing ``weight``), and a
tensor that ``torch.nn.utils.prune`` reparametrised (``weight_orig`` parameter, ``weight_mask``
buffer, forward pre-hook) under its plain name (``fc.weight``), as :func:`torch_pruned` finds.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from prunescope.errors import PruningError

PRUNABLE_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def torch_pruned(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """The tensors ``torch.nn.utils.prune`` reparametrised, ``{plain name: (module, attr)}``.

    Such a module has a parameter ``<attr>_orig`` and a buffer ``<attr>_mask``; its ``<attr>``
    is recomputed as their product by a forward pre-hook. Empty for a plain model.
    """
    found = {}
    for module_name, module in model.named_modules():
        buffers = dict(module.named_buffers(recurse=False))
        for param_name, _ in module.named_parameters(recurse=False):
            attr = param_name[:-len("_orig")]
            if param_name.endswith("_orig") and f"{attr}_mask" in buffers:
                found[f"{module_name}.{attr}" if module_name else attr] = (module, attr)
    return found


def parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter under every name a mask may use, in model order.

    Tied aliases are all listed (``named_parameters(remove_duplicate=False)``); a tensor torch
    reparametrised is listed under its plain name with its ``<attr>_orig`` parameter (whose
    pruned entries torch's mask multiplies away), and its ``_orig`` name is not.
    """
    plain = {f"{n}_orig": n for n in torch_pruned(model)}
    return {plain.get(n, n): p for n, p in model.named_parameters(remove_duplicate=False)}


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The values the model computes with, by the names of :func:`parameters`, detached.

    For a tensor torch reparametrised that is ``<attr>_orig * <attr>_mask``, read without
    changing the model (its own ``<attr>`` is only refreshed by a forward pass).
    """
    values = {n: p.detach() for n, p in parameters(model).items()}
    for name, (module, attr) in torch_pruned(model).items():
        values[name] = values[name] * getattr(module, f"{attr}_mask").detach()
    return values


def default_targets(model: nn.Module) -> list[str]:
    """Names of the weights of every Linear and Conv layer, in model order; a model with a
    ``prunable`` attribute (globs, e.g. a Hugging Face model's encoder,
    :class:`prunescope.hub.models.TextClassifier`) keeps only those layers that match it."""
    names = [
        f"{module_name}.weight" if module_name else "weight"
        for module_name, module in model.named_modules()
        if isinstance(module, PRUNABLE_LAYERS)
    ]
    within = getattr(model, "prunable", None)
    return names if within is None else [n for n in names
                                         if any(fnmatchcase(n, g) for g in within)]


def select(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> list[str]:
    """Names of the prunable parameters of ``model``, in model order.

    ``include=None`` means the default targets (Linear and Conv weights); otherwise every
    parameter matching one of the ``include`` globs (names as :func:`parameters` gives them).
    Names matching an ``exclude`` glob are dropped; a tied parameter is listed once, under its
    first name left. Raises :class:`PruningError` when nothing is left.
    """
    params = parameters(model)
    if include is None:
        candidates = default_targets(model)
    else:
        candidates = [n for n in params if any(fnmatchcase(n, p) for p in include)]
    seen: set[int] = set()
    names = []
    for name in candidates:
        if not any(fnmatchcase(name, p) for p in exclude) and id(params[name]) not in seen:
            seen.add(id(params[name]))
            names.append(name)
    if not names:
        hint = f"include={list(include)}" if include is not None else "no Linear or Conv weights"
        raise PruningError(
            f"the model has no prunable tensor ({hint}, exclude={list(exclude)}); "
            "give include globs that match its parameter names"
        )
    return names
