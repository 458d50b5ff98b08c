"""scikit-learn's 8x8 handwritten digits (``digits``).

Source: ``sklearn.datasets.load_digits``, bundled with scikit-learn (no download): the test set of
the UCI "Optical Recognition of Handwritten Digits" data by E. Alpaydin and C. Kaynak (1998),
UCI Machine Learning Repository, CC BY 4.0. 1797 images, 10 classes, pixel values 0..16.

Splits: a seeded stratified 20% test split (359 images) drawn with seed 0 always, so the test set
never changes with the run's seed; the remaining 1438 images are the training pool, from which a
stratified validation split of ``val_size`` (default 180) is drawn with the run's ``seed``.
``index`` is the position in ``load_digits()`` (0..1796) for every subset. Pixels are scaled by
1/16 and normalised with MEAN/STD below (computed once over all 1797 images after /16).
``root`` is ignored: the data ships with scikit-learn. Shape ``[N, 1, 8, 8]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from prunescope.data.base import DATASETS, Raw, Splits, make_splits
from prunescope.data.splits import stratified_split

MEAN = (0.3053,)  # load_digits().data / 16: mean 0.305260
STD = (0.3760,)  # and std 0.376049 (numpy, ddof=0)
DEFAULT_VAL_SIZE = 180
TEST_FRACTION = 0.2
TEST_SEED = 0
CLASSES = tuple(str(i) for i in range(10))


@DATASETS.register("digits")
def load_digits(*, root: Path | None, val_size: int | None, seed: int) -> Splits:
    """Digits splits; ``root`` is ignored (the data is bundled with scikit-learn)."""
    from sklearn.datasets import load_digits as sklearn_load_digits  # slow import: do it lazily

    bunch = sklearn_load_digits()
    pixels = np.asarray(bunch.data, dtype=np.float32).reshape(-1, 1, 8, 8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    test_size = round(TEST_FRACTION * len(labels))
    pool_idx, test_idx = (t.numpy() for t in stratified_split(
        torch.from_numpy(labels), test_size, TEST_SEED))
    pool = Raw(pixels[pool_idx], labels[pool_idx], pool_idx)
    test = Raw(pixels[test_idx], labels[test_idx], test_idx)
    return make_splits(
        "digits", pool, test, val_size=DEFAULT_VAL_SIZE if val_size is None else val_size,
        seed=seed, scale=1 / 16, classes=CLASSES, mean=MEAN, std=STD,
    )
