"""Second-order pruning: criteria that choose the mask AND correct the weights they keep.

- ``woodfisher`` (:mod:`~prunescope.second_order.woodfisher`): global Optimal Brain Surgeon with
  a block-diagonal empirical Fisher (Hassibi & Stork 1993; Singh & Alistarh 2020).
- ``obc`` (:mod:`~prunescope.second_order.exact_obc`): layer-wise reconstruction by exact greedy
  OBS, one weight at a time per row (Frantar & Alistarh 2022, Optimal Brain Compression); small
  layers only.
- ``sparsegpt`` (:mod:`~prunescope.second_order.obc`): layer-wise reconstruction, column by
  column (Frantar & Alistarh 2023, SparseGPT), with a least-squares refit; any size.

All are registered in :data:`prunescope.criteria.CRITERIA` with their defaults (lazily, by the
import path of each module's ``CRITERION``), so they work with every allocation, pattern, the CLI
and recipes. Other settings are a :class:`Criterion` to
pass to :func:`prunescope.prune`::

    from prunescope.second_order import OBC, SparseGPT, WoodFisher
    prunescope.prune(model, WoodFisher(block_size=100, dampening=1e-4).criterion(), "global",
                     0.9, batches, rounds=4)
"""

from prunescope.second_order.exact_obc import OBC, exact_obc
from prunescope.second_order.obc import SparseGPT, hessians, prune_layers, reconstruct
from prunescope.second_order.woodfisher import WoodFisher, obs_scores, obs_update

__all__ = [
    "OBC",
    "SparseGPT",
    "WoodFisher",
    "exact_obc",
    "hessians",
    "obs_scores",
    "obs_update",
    "prune_layers",
    "reconstruct",
]
