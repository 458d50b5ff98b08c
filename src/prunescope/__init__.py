"""prunescope: make PyTorch networks sparse and show what the sparsity costs.

The public API::

    import prunescope
    model = prunescope.models.build("lenet300")
    splits = prunescope.data.load("mnist")
    mask = prunescope.prune(model, criterion="magnitude", allocation="global", sparsity=0.9)
    prunescope.effective_sparsity(model, mask)

See :class:`Mask`, :func:`prune`, :func:`effective_sparsity`, :func:`effective_mask`,
:func:`prunescope.models.build` and :func:`prunescope.data.load`.
"""

from prunescope import data, models
from prunescope.connectivity import effective_mask, effective_sparsity
from prunescope.errors import PrunescopeError
from prunescope.mask import Mask
from prunescope.sparsifier import prune

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
