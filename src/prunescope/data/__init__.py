"""Datasets as in-memory train/val/test tensors, and batching.

>>> import torch
>>> from prunescope import data
>>> splits = data.load("digits", seed=0)          # or "mnist", "cifar10", "cifar100"
>>> loader = data.Loader(splits.train, 64, shuffle=True, generator=torch.Generator())

Every dataset is registered in :data:`DATASETS`; importing this package registers the built-in
ones (``mnist``, ``digits``, ``cifar10``, ``cifar100``, and the group datasets ``mnist_lt`` and
``colored_mnist`` of :mod:`prunescope.data.groups`).
"""

from prunescope.data import cifar, digits, groups, mnist  # noqa: F401  (register the datasets)
from prunescope.data.base import DATASETS, Splits, Subset, load, names
from prunescope.data.loader import AUGMENTATIONS, Loader, random_crop_flip
from prunescope.data.splits import stratified_split

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "Loader",
    "Splits",
    "Subset",
    "load",
    "names",
    "random_crop_flip",
    "stratified_split",
]
