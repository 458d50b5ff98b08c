"""Datasets as in-memory train/val/test tensors, and batching.

>>> import torch
>>> from prunescope import data
>>> splits = data.load("digits", seed=0)          # or "mnist", "cifar10", "cifar100"
>>> loader = data.Loader(splits.train, 64, shuffle=True, generator=torch.Generator())

Every dataset is registered in :data:`DATASETS`; importing this package registers the built-in
ones (``mnist``, ``digits``, ``cifar10``, ``cifar100``, and the group datasets ``mnist_lt`` and
``colored_mnist`` of :mod:`prunescope.data.groups`), and the text datasets ``tweets`` and
``text-csv`` of :mod:`prunescope.hub.text`.
"""

from prunescope.data import cifar, digits, groups, mnist  # noqa: F401  (register the datasets)
from prunescope.data.base import DATASETS, Splits, Subset, from_spec, load, names, takes_option
from prunescope.data.loader import AUGMENTATIONS, Loader, random_crop_flip
from prunescope.data.splits import stratified_split

# text datasets tokenise with transformers: imported when first loaded
DATASETS.register_lazy("tweets", "prunescope.hub.text:load_tweets")
DATASETS.register_lazy("text-csv", "prunescope.hub.text:load_text_csv")

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "Loader",
    "Splits",
    "Subset",
    "from_spec",
    "load",
    "names",
    "random_crop_flip",
    "stratified_split",
    "takes_option",
]
