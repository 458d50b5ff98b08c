"""CIFAR-10 and CIFAR-100 (``cifar10``, ``cifar100``).

Source: Alex Krizhevsky, "Learning Multiple Layers of Features from Tiny Images" (2009),
https://www.cs.toronto.edu/~kriz/cifar.html; cite that report when you use the data (no formal
licence is given). Nothing is downloaded: pass as ``root`` the unpacked ``cifar-10-batches-py``
(from ``cifar-10-python.tar.gz``) or ``cifar-100-python`` (from ``cifar-100-python.tar.gz``)
directory, or the directory containing it.

Files are Python 2 pickles of dicts with bytes keys, read with the restricted unpickler:
``b"data"`` uint8 ``[N, 3072]`` (a row is the 32x32 red plane, then green, then blue, each
row-major) and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100, the 100 fine classes).
Class names come from ``batches.meta`` / ``meta`` when present, else "0".."N-1".

Splits: the training pool is ``data_batch_1..5`` (CIFAR-10) or ``train`` (CIFAR-100), 50k images,
``index`` 0..49999 in file order; the validation set is a seeded stratified draw of ``val_size``
(default 5000) of them; the test set is ``test_batch`` / ``test`` (10k, ``index`` 0..9999).
Pixels are scaled by 1/255 and normalised with the standard per-channel mean/std. Training uses
the ``"crop_flip"`` augmentation. Shape ``[N, 3, 32, 32]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prunescope.data.base import DATASETS, Raw, Splits, make_splits
from prunescope.data.safe_pickle import one_line, safe_load
from prunescope.errors import DataError

DEFAULT_VAL_SIZE = 5000
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant keeps what."""

    name: str
    dirname: str
    archive: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10 = CifarSpec(
    "cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
    tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
    b"labels", b"label_names", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
)
CIFAR100 = CifarSpec(
    "cifar100", "cifar-100-python", "cifar-100-python.tar.gz", ("train",), "test", "meta",
    b"fine_labels", b"fine_label_names", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
)


@DATASETS.register("cifar10")
def load_cifar10(*, root: Path | None, val_size: int | None, seed: int) -> Splits:
    """CIFAR-10 splits from the unpacked ``cifar-10-batches-py`` directory (or its parent)."""
    return load_cifar(CIFAR10, root=root, val_size=val_size, seed=seed)


@DATASETS.register("cifar100")
def load_cifar100(*, root: Path | None, val_size: int | None, seed: int) -> Splits:
    """CIFAR-100 (fine labels) splits from the unpacked ``cifar-100-python`` directory."""
    return load_cifar(CIFAR100, root=root, val_size=val_size, seed=seed)


def load_cifar(spec: CifarSpec, *, root: Path | None, val_size: int | None, seed: int) -> Splits:
    """Splits of the CIFAR variant ``spec`` read from ``root`` (see the module doc)."""
    folder = resolve_root(spec, root)
    batches = [read_batch(spec, folder / f) for f in spec.train_files]
    pool = Raw(np.concatenate([b.pixels for b in batches]),
               np.concatenate([b.labels for b in batches]))
    test = read_batch(spec, folder / spec.test_file)
    return make_splits(
        spec.name, pool, test, val_size=DEFAULT_VAL_SIZE if val_size is None else val_size,
        seed=seed, scale=1 / 255, classes=read_class_names(spec, folder), mean=spec.mean,
        std=spec.std, augment="crop_flip",
    )


def resolve_root(spec: CifarSpec, root: Path | None) -> Path:
    """The ``spec.dirname`` directory: ``root`` itself or ``root/spec.dirname``."""
    how = (f"download {spec.archive} from {URL}, unpack it and pass the {spec.dirname} "
           "directory (or its parent) as root")
    if root is None:
        raise DataError(f"{spec.name} needs a data directory: {how}")
    if (root / spec.dirname).is_dir():
        return root / spec.dirname
    if root.is_dir():
        return root
    raise DataError(f"{spec.name} root {root} is not a directory: {how}")


def read_batch(spec: CifarSpec, path: Path) -> Raw:
    """Pixels ``[N, 3, 32, 32]`` uint8 and int64 labels of one CIFAR batch file."""
    batch = _read_pickle(spec, path)
    data = _field(batch, b"data")
    labels = _as_array(_field(batch, spec.label_key))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3072 and labels is not None and labels.shape == (data.shape[0],)
            and (labels.size == 0 or np.issubdtype(labels.dtype, np.integer))):
        raise DataError(f"{path} is not a {spec.name} batch (expected {{b'data': uint8 [N, 3072], "
                        f"{spec.label_key!r}: N labels}}): use the original files")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(f"{path} holds labels outside 0..{spec.num_classes - 1}: "
                        "use the original files")
    return Raw(data.reshape(-1, 3, 32, 32), labels.astype(np.int64))


def read_class_names(spec: CifarSpec, folder: Path) -> tuple[str, ...]:
    """Class names from the meta file if present, else ``"0".."N-1"``."""
    path = folder / spec.meta_file
    if not path.is_file():
        return tuple(str(i) for i in range(spec.num_classes))
    names = _field(_read_pickle(spec, path), spec.names_key)
    if not (isinstance(names, list | tuple) and len(names) == spec.num_classes
            and all(isinstance(n, bytes | str) for n in names)):
        raise DataError(f"{path} does not list {spec.num_classes} class names under "
                        f"{spec.names_key!r}: use the original file or delete it")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


def _read_pickle(spec: CifarSpec, path: Path) -> Any:
    try:
        with path.open("rb") as f:
            return safe_load(f, encoding="bytes", source=str(path))
    except FileNotFoundError:
        raise DataError(f"{spec.name} file {path} is missing: download {spec.archive} from "
                        f"{URL} and unpack it completely") from None
    except OSError as exc:
        raise DataError(f"cannot read {path} ({one_line(exc)}): check the file") from None


def _field(batch: Any, key: bytes) -> Any:
    """``batch[key]`` (also accepting a str key); ``None`` if absent or not a dict."""
    if not isinstance(batch, dict):
        return None
    return batch.get(key, batch.get(key.decode()))


def _as_array(obj: Any) -> np.ndarray | None:
    """``np.asarray(obj)``, or ``None`` when ``obj`` is missing or ragged."""
    try:
        return None if obj is None else np.asarray(obj)
    except (ValueError, TypeError):
        return None
