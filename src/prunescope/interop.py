"""Models still carrying ``torch.nn.utils.prune``'s reparametrisation.

``torch.nn.utils.prune`` replaces a pruned ``weight`` by a ``weight_orig`` parameter, a
``weight_mask`` buffer and a forward pre-hook that recomputes ``weight = weight_orig *
weight_mask``. prunescope accepts such a model everywhere it accepts a model:

- read-only functions (:func:`prunescope.effective_mask`, :func:`prunescope.effective_sparsity`,
  :meth:`prunescope.Mask.from_weights`) read ``orig * mask`` through the buffers and leave the
  model as it is;
- a mask names such a tensor by its plain name (``fc.weight``), which
  :meth:`prunescope.Mask.resolve` maps to the ``fc.weight_orig`` parameter, so
  :class:`~prunescope.sparsifier.MaskHold` holds it too;
- functions that change the model anyway (:func:`prunescope.prune`, and ``train.fit`` at its
  start) first make torch's pruning permanent with :func:`fold_torch_prune` (one INFO line),
  keeping the mask torch held: weights torch pruned stay pruned.
"""

from __future__ import annotations

import copy
import logging

from torch import nn
from torch.nn.utils import prune as torch_prune

from prunescope.mask import Mask
from prunescope.targets import torch_pruned

logger = logging.getLogger(__name__)

__all__ = ["fold_torch_prune", "folded_copy", "torch_pruned"]


def fold_torch_prune(model: nn.Module, *, log: bool = True) -> Mask | None:
    """Make torch's pruning of ``model`` permanent, in place, and return the mask it held.

    Every reparametrised tensor gets ``prune.remove``: its ``<attr>`` becomes a plain parameter
    equal to ``orig * mask`` (state-dict keys as before pruning), the buffer and hook go. Returns
    ``None`` (and changes nothing) for a model torch has not pruned. With ``log`` (default), one
    INFO line says what was folded.
    """
    found = torch_pruned(model)
    if not found:
        return None
    held = Mask.from_torch_prune(model)
    for module, attr in found.values():
        torch_prune.remove(module, attr)
    if log:
        logger.info(
            "folded torch.nn.utils.prune's reparametrisation of %d tensor(s) (%s) into the "
            "weights (prune.remove); the pruned weights stay pruned", len(found), ", ".join(found)
        )
    return held


def folded_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with torch's pruning folded in the copy; ``model`` is unchanged.

    ``copy.deepcopy`` alone fails on a reparametrised model that has run a forward pass with
    gradients on (its ``<attr>`` is then a non-leaf tensor), so that attribute is copied
    detached: the fold recomputes it from ``orig * mask`` anyway.
    """
    memo = {id(getattr(module, attr)): getattr(module, attr).detach().clone()
            for module, attr in torch_pruned(model).values()}
    clone = copy.deepcopy(model, memo)
    fold_torch_prune(clone, log=False)
    return clone
