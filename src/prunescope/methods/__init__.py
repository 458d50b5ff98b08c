"""Pruning and sparse-training methods, selected in a recipe by ``method:``.

Each method is a frozen config dataclass (its recipe keys) whose ``run_one(run, sparsity)``
computes its results on a :class:`~prunescope.run.Run` (see :mod:`prunescope.methods.base`).
Methods combine the core pieces (criteria, allocations, patterns, schedules, the mask hooks, the
training loop, the compression pipeline) and add only their own mechanics:

- ``one_shot``: prune the trained dense model, fine-tune with the mask held.
- ``gmp``: gradual magnitude pruning (Zhu & Gupta 2017).
- ``acdc``: alternating compressed / decompressed training (Peste et al. 2021).
- ``rigl`` and ``set``: dynamic sparse training (Evci et al. 2020; Mocanu et al. 2018).
- ``lottery``: iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle et al.
  2020) and its random re-initialisation control.
- ``cram``: compression-aware training, then one-shot pruning to many sparsities (Peste et al.
  2023).
- ``elsa``: nested sparse networks in one dense model, level by level with the sparser levels'
  weights frozen (Halvachi et al. 2023; :mod:`prunescope.nested`).
- ``layerwise``: one-shot pruning of a large model one block at a time on calibration data
  (magnitude, Wanda, SparseGPT; :mod:`prunescope.layerwise`), then recovery.
- ``data_pruning``: prune the training set (random, EL2N, forgetting; DRoP's class quotas) and
  train a dense model on the rest (:mod:`prunescope.data_pruning`).

The built-in methods are registered here, in one place: importing this package registers them
all (a method of your own registers itself with :func:`prunescope.methods.base.register`).
"""

from prunescope.methods import acdc, cram, elsa, gmp, layerwise, lottery, one_shot, rigl  # noqa: F401, I001
from prunescope.methods.base import METHODS, Method

# data pruning (DRoP and its baselines) lives in its own package, which builds on this one
METHODS.register_lazy("data_pruning", "prunescope.data_pruning.method:DataPruning")

__all__ = ["METHODS", "Method"]
