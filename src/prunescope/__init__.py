"""prunescope: make PyTorch networks sparse and show what the sparsity costs.

The public API::

    import prunescope
    model = prunescope.models.build("lenet300")
    splits = prunescope.data.load("mnist")
    mask = prunescope.prune(model, criterion="magnitude", allocation="global", sparsity=0.9)
    prunescope.effective_sparsity(model, mask)

See :class:`Mask`, :func:`prune`, :func:`effective_sparsity`, :func:`effective_mask`,
:func:`prunescope.models.build` and :func:`prunescope.data.load`.

The names are imported on first use (PEP 562), so that torch-free parts such as
``prunescope report`` (:mod:`prunescope.report`) run without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = [
    "Mask",
    "PrunescopeError",
    "data",
    "effective_mask",
    "effective_sparsity",
    "models",
    "prune",
]
_LAZY = {
    "data": ("prunescope.data", None),
    "models": ("prunescope.models", None),
    "effective_mask": ("prunescope.connectivity", "effective_mask"),
    "effective_sparsity": ("prunescope.connectivity", "effective_sparsity"),
    "PrunescopeError": ("prunescope.errors", "PrunescopeError"),
    "Mask": ("prunescope.mask", "Mask"),
    "prune": ("prunescope.sparsifier", "prune"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'prunescope' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
