"""Dataset containers, the dataset registry and :func:`load`.

A dataset loader is registered in :data:`DATASETS` as a callable
``loader(*, root: Path | None, val_size: int | None, seed: int) -> Splits``; ``val_size=None``
means the dataset's default. Loaders read raw pixels and call :func:`make_splits`, which draws
the seeded, stratified validation split from the training pool and normalises every subset.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunescope.data.splits import stratified_split
from prunescope.errors import ConfigError, DataError
from prunescope.registry import Registry

DatasetLoader = Callable[..., "Splits"]
DATASETS: Registry[DatasetLoader] = Registry("dataset")


@dataclass(frozen=True, eq=False)
class Subset:
    """Examples held in memory.

    ``x``: float32 ``[N, C, H, W]`` images, already normalised, or int64 ``[N, 2, L]`` tokens
    (``x[:, 0]`` token ids, ``x[:, 1]`` the attention mask, right-padded to ``L``; see
    :mod:`prunescope.hub.text`); ``y``: int64 ``[N]`` class labels;
    ``index``: int64 ``[N]``, each example's position in its source file/split, so it can be
    traced back. ``groups``: optional int64 ``[N]`` group label of each example (e.g. a colour
    or a class-frequency tier, named by :attr:`Splits.group_names`), ``None`` for datasets
    without groups (the default, so existing code is unaffected). Inconsistent shapes or dtypes
    raise :class:`DataError`.
    """

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    groups: torch.Tensor | None = None

    def __post_init__(self) -> None:
        images = self.x.dtype == torch.float32 and self.x.dim() == 4
        tokens = self.x.dtype == torch.int64 and self.x.dim() == 3 and self.x.shape[1] == 2
        if not (images or tokens):
            raise DataError(f"Subset.x must be float32 images [N, C, H, W] or int64 tokens "
                            f"[N, 2, L], got {self.x.dtype} {list(self.x.shape)}; convert the "
                            "data before building a Subset")
        n = self.x.shape[0]
        for field, t in (("y", self.y), ("index", self.index), ("groups", self.groups)):
            if t is not None and (t.dtype != torch.int64 or tuple(t.shape) != (n,)):
                raise DataError(f"Subset.{field} must be int64 [{n}] to match x, got {t.dtype} "
                                f"{list(t.shape)}; fix the dataset loader")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def is_text(self) -> bool:
        """Whether the examples are token sequences (int64 ``[N, 2, L]``) rather than images."""
        return self.x.dtype == torch.int64

    def select(self, idx: torch.Tensor) -> Subset:
        """The examples at positions ``idx`` (a new Subset; ``index`` keeps the source ids)."""
        groups = None if self.groups is None else self.groups[idx]
        return Subset(self.x[idx], self.y[idx], self.index[idx], groups)


@dataclass(frozen=True, eq=False)
class Splits:
    """Train/validation/test subsets of one dataset and what is needed to interpret them.

    ``mean``/``std`` are the per-channel constants the images were normalised with
    (``x = (pixel - mean) / std``, pixels in ``[0, 1]``); :meth:`unnormalise` inverts it for
    display. ``augment`` names the training augmentation (``"crop_flip"``, see
    :data:`prunescope.data.AUGMENTATIONS`) or is ``None``. ``group_names`` names the values of
    :attr:`Subset.groups` for datasets that have groups (empty otherwise). Text datasets have
    ``input_shape == (2, L)``, no ``mean``/``std``, and ``texts``: the source text of every
    example, indexed by :attr:`Subset.index` (the report shows them where images are shown).
    """

    name: str
    train: Subset
    val: Subset
    test: Subset
    num_classes: int
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str | None = None
    group_names: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        channels = 0 if self.is_text else self.input_shape[0]
        if len(self.classes) != self.num_classes or not len(self.mean) == len(self.std) == channels:
            raise DataError(f"dataset {self.name!r} is inconsistent: {self.num_classes} classes "
                            f"vs {len(self.classes)} names, {channels} channels vs "
                            f"{len(self.mean)} means/{len(self.std)} stds; fix its loader")
        for part in (self.train, self.val, self.test):
            if tuple(part.x.shape[1:]) != tuple(self.input_shape):
                raise DataError(f"dataset {self.name!r} has images of shape "
                                f"{list(part.x.shape[1:])}, expected {list(self.input_shape)}")

    @property
    def is_text(self) -> bool:
        """Whether the examples are token sequences (see :class:`Subset`)."""
        return self.train.is_text

    def unnormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in ``[0, 1]`` from normalised images ``[..., C, H, W]`` (for display)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x * std + mean


def normalise_(pixels: torch.Tensor, scale: float, mean: Sequence[float],
               std: Sequence[float]) -> torch.Tensor:
    """float32 ``(pixels * scale - mean[c]) / std[c]`` for ``pixels`` ``[N, C, H, W]``.

    Converts to float32 (in place, i.e. sharing memory, when ``pixels`` is float32 already).
    """
    a = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).reciprocal()
    b = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * a
    return pixels.to(torch.float32).mul_(a * scale).sub_(b)


@dataclass(frozen=True)
class Raw:
    """Un-normalised pixels ``[N, C, H, W]`` (any numeric dtype), labels ``[N]`` and source ids.

    Loaders build these; :meth:`subset` turns a selection into a normalised :class:`Subset`
    without touching the arrays (which may be read-only and cached).
    """

    pixels: np.ndarray
    labels: np.ndarray
    index: np.ndarray | None = None  # defaults to 0..N-1

    def subset(self, idx: np.ndarray | None, scale: float, mean: Sequence[float],
               std: Sequence[float]) -> Subset:
        """Normalised :class:`Subset` of the examples at ``idx`` (all when ``None``)."""
        idx = np.arange(len(self.labels)) if idx is None else idx
        index = idx if self.index is None else self.index[idx]
        pixels = torch.from_numpy(np.ascontiguousarray(self.pixels[idx]))  # a fresh copy
        return Subset(normalise_(pixels, scale, mean, std),
                      torch.tensor(self.labels[idx], dtype=torch.int64),
                      torch.tensor(index, dtype=torch.int64))


def check_val_size(name: str, val_size: int, pool_size: int) -> None:
    """:class:`ConfigError` unless ``0 <= val_size < pool_size`` (training must keep examples)."""
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not (
        0 <= val_size < pool_size
    ):
        raise ConfigError(f"val_size={val_size!r} is out of range for {name}: choose an integer "
                          f"with 0 <= val_size < {pool_size} (the training pool size)")


def make_splits(name: str, pool: Raw, test: Raw, *, val_size: int, seed: int, scale: float,
                classes: Sequence[str], mean: Sequence[float], std: Sequence[float],
                augment: str | None = None) -> Splits:
    """Split ``pool`` into train/val (seeded, stratified, ``val_size`` examples) and normalise.

    Pixels are multiplied by ``scale`` (to ``[0, 1]``) and normalised with ``mean``/``std``.
    """
    check_val_size(name, val_size, len(pool.labels))
    rest, chosen = stratified_split(torch.tensor(pool.labels), val_size, seed)
    train = pool.subset(rest.numpy(), scale, mean, std)
    val = pool.subset(chosen.numpy(), scale, mean, std)
    return Splits(
        name=name, train=train, val=val, test=test.subset(None, scale, mean, std),
        num_classes=len(classes), input_shape=tuple(train.x.shape[1:]), classes=tuple(classes),
        mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std), augment=augment,
    )


def load(name: str, *, root: str | os.PathLike[str] | None = None, val_size: int | None = None,
         seed: int = 0, train_size: int | None = None, test_size: int | None = None,
         **options: Any) -> Splits:
    """Load dataset ``name`` (see :func:`names`) as train/val/test :class:`Splits`.

    ``root`` is where the dataset's files are (required by some datasets, ignored by bundled
    ones); ``val_size`` is the number of training-pool examples held out for validation
    (``None``: the dataset's default; 0: an empty validation set); ``seed`` picks the split:
    the same seed gives the identical split. ``train_size`` / ``test_size`` keep a fixed,
    stratified subset of that many training / test examples (None: all). ``options`` go to
    the dataset's loader (e.g. ``tokenizer`` and ``max_length`` of a text dataset; an option
    the loader does not take is a ConfigError). Unknown names raise :class:`UnknownNameError`,
    bad arguments :class:`ConfigError`, missing or corrupt files :class:`DataError`.
    """
    loader = DATASETS.get(name)
    if val_size is not None and (isinstance(val_size, bool) or not isinstance(val_size, int)):
        raise ConfigError(f"val_size must be an integer or None, got {val_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"seed must be an integer in 0..2**63-1, got {seed!r}")
    taken = inspect.signature(loader).parameters
    unknown = [k for k in options if k not in taken]
    if unknown:
        raise ConfigError(f"dataset {name!r} takes no option {unknown[0]!r}; options it takes: "
                          f"{', '.join(k for k in taken if k not in _COMMON) or 'none'}")
    path = None if root is None else Path(os.fspath(root)).expanduser()
    splits = loader(root=path, val_size=val_size, seed=seed, **options)
    return subsample(splits, train_size=train_size, test_size=test_size)


_COMMON = ("root", "val_size", "seed")


def takes_option(name: str, option: str) -> bool:
    """Whether dataset ``name``'s loader takes ``option`` (e.g. a text dataset's tokenizer)."""
    return option in inspect.signature(DATASETS.get(name)).parameters


def from_spec(spec: dict[str, Any], root: str | os.PathLike[str] | None = None) -> Splits:
    """The splits a run's data spec describes (``{"name", "root", "val_size", "seed",
    ...options}``, as checkpoints store it); ``root`` overrides the spec's."""
    if not spec.get("name"):
        raise ConfigError("the data spec names no dataset")
    options = {k: v for k, v in spec.items()
               if k not in ("name", "root", "val_size", "seed") and v is not None}
    return load(spec["name"], root=root or spec.get("root"), val_size=spec.get("val_size"),
                seed=spec.get("seed", 0), **options)
SUBSET_SEED = 0  # the same test subset for every run seed: populations are audited alike


def subsample(splits: Splits, *, train_size: int | None, test_size: int | None) -> Splits:
    """``splits`` with stratified subsets of ``train_size`` training and ``test_size`` test
    examples (None: keep all), drawn with :data:`SUBSET_SEED` whatever the run's seed, so that
    runs of different seeds are audited on the same test examples (their training subsets
    differ only as their validation splits do); a size above what the split holds is a
    ConfigError."""
    parts = {}
    for field_name, size in (("train", train_size), ("test", test_size)):
        if size is None:
            continue
        subset = getattr(splits, field_name)
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= len(subset):
            raise ConfigError(f"{field_name}_size={size!r} is out of range for {splits.name}: "
                              f"choose an integer in 1..{len(subset)}")
        _, chosen = stratified_split(subset.y, size, SUBSET_SEED)
        parts[field_name] = subset.select(chosen)
    return dataclasses.replace(splits, **parts) if parts else splits


def names() -> list[str]:
    """Names of the registered datasets, sorted."""
    return DATASETS.names()
