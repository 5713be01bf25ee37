"""Tests of prunekit.app.data on small subsets of the real CIFAR-10 and MNIST files."""
import gzip
import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
from PIL import Image

from prunekit.app import data
from prunekit.app.data import (CIFAR10_CLASSES, DATASETS, BatchIterator, Dataset, batches,
                           find_cifar10, find_mnist, load_dataset, num_batches, read_idx,
                           split_train_val)
from prunekit.errors import ConfigError, DataError

try:
    CIFAR_ROOT = find_cifar10()
except DataError:
    CIFAR_ROOT = None
needs_cifar_zip = pytest.mark.skipif(CIFAR_ROOT is None or not (CIFAR_ROOT / "train.zip").is_file(),
                                     reason="CIFAR-10 zips not found ($PRUNEKIT_DATA unset or without them)")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("PRUNEKIT_DATA", raising=False)
    monkeypatch.delenv("PRUNEKIT_CACHE", raising=False)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A class-balanced subset of the real CIFAR-10: 205 train, 100 test images."""
    if CIFAR_ROOT is None or not (CIFAR_ROOT / "train.zip").is_file():
        pytest.skip("CIFAR-10 zips not found")
    return load_dataset("cifar10", CIFAR_ROOT, train_limit=205, test_limit=100,
                        cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist")


def _decode_member(zip_path, member):
    with zipfile.ZipFile(zip_path) as z:
        return np.asarray(Image.open(io.BytesIO(z.read(member))).convert("RGB"))


def _small_zip_folder(folder, per_class):
    """Copy the first ``per_class`` images of each class of both real zips into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        with zipfile.ZipFile(CIFAR_ROOT / f"{split}.zip") as src, \
                zipfile.ZipFile(folder / f"{split}.zip", "w", zipfile.ZIP_STORED) as dst:
            names = sorted(n for n in src.namelist() if n.endswith(".jpg"))
            for cls in CIFAR10_CLASSES:
                for name in [n for n in names if n.split("/")[1] == cls][:per_class]:
                    dst.writestr(name, src.read(name))
    return folder


# --------------------------------------------------------------------------- CIFAR-10

@needs_cifar_zip
def test_cifar10_subset_shapes_and_balance(cifar):
    assert cifar.name == "cifar10" and cifar.num_classes == 10
    assert cifar.x_train.shape == (205, 32, 32, 3) and cifar.x_test.shape == (100, 32, 32, 3)
    assert cifar.x_train.dtype == np.uint8 and cifar.y_train.dtype == np.int64
    assert cifar.in_channels == 3 and cifar.image_size == 32
    assert cifar.mean.dtype == np.float32 and cifar.mean.shape == (3,) and cifar.std.shape == (3,)
    # 205 = 20 per class, and the first 5 classes take one more.
    assert np.bincount(cifar.y_train).tolist() == [21] * 5 + [20] * 5
    assert np.bincount(cifar.y_test, minlength=10).tolist() == [10] * 10
    assert 50 < cifar.x_train.mean() < 200  # real pictures, not blank


@needs_cifar_zip
def test_cifar10_subset_is_first_members_per_class(cifar):
    with zipfile.ZipFile(CIFAR_ROOT / "train.zip") as z:
        names = sorted(n for n in z.namelist() if n.startswith("train/truck/") and n.endswith(".jpg"))
    trucks = cifar.x_train[cifar.y_train == CIFAR10_CLASSES.index("truck")]
    np.testing.assert_array_equal(trucks[0], _decode_member(CIFAR_ROOT / "train.zip", names[0]))
    np.testing.assert_array_equal(trucks[-1], _decode_member(CIFAR_ROOT / "train.zip", names[19]))


@needs_cifar_zip
def test_cifar10_zip_cache(tmp_path, monkeypatch):
    folder = _small_zip_folder(tmp_path / "zips", per_class=3)
    cache = tmp_path / "cache"
    full = load_dataset("cifar10", folder, cache_dir=cache)
    assert full.x_train.shape == (30, 32, 32, 3) and np.bincount(full.y_train).tolist() == [3] * 10
    assert len(list(cache.glob("cifar10-train-*.npz"))) == 1
    assert len(list(cache.glob("cifar10-test-*.npz"))) == 1
    decoded_subset = load_dataset("cifar10", folder, train_limit=20, test_limit=10, cache_dir=tmp_path / "none")

    def no_decoding(*args):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(data, "_decode", no_decoding)
    again = load_dataset("cifar10", folder, cache_dir=cache)
    np.testing.assert_array_equal(again.x_train, full.x_train)
    np.testing.assert_array_equal(again.y_test, full.y_test)
    cached_subset = load_dataset("cifar10", folder, train_limit=20, test_limit=10, cache_dir=cache)
    np.testing.assert_array_equal(cached_subset.x_train, decoded_subset.x_train)
    np.testing.assert_array_equal(cached_subset.y_train, decoded_subset.y_train)

    # The cache is keyed by size and mtime: touching the zip means decoding again.
    stat = (folder / "train.zip").stat()
    os.utime(folder / "train.zip", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded although cached"):
        load_dataset("cifar10", folder, cache_dir=cache)


@needs_cifar_zip
def test_cifar10_cache_dir_from_env(tmp_path, monkeypatch):
    folder = _small_zip_folder(tmp_path / "zips", per_class=1)
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "envcache"))
    load_dataset("cifar10", folder)
    assert len(list((tmp_path / "envcache").glob("cifar10-*.npz"))) == 2


def _write_batches_py(folder, x_train, y_train, x_test, y_test):
    """Write images in the pickled layout of torchvision's cifar-10-batches-py."""
    folder.mkdir(parents=True)

    def dump(name, x, y):
        flat = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # channel-major rows of 3072
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": flat, b"labels": [int(v) for v in y],
                         b"filenames": [b"x.png"] * len(x)}, f)

    for i, part in enumerate(np.array_split(np.arange(len(x_train)), 5), start=1):
        dump(f"data_batch_{i}", x_train[part], y_train[part])
    dump("test_batch", x_test, y_test)


@needs_cifar_zip
def test_cifar10_batches_py_layout_reads_identical_pixels(cifar, tmp_path):
    _write_batches_py(tmp_path / "cifar-10-batches-py", cifar.x_train, cifar.y_train, cifar.x_test, cifar.y_test)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # torchvision's root or the folder itself
        assert find_cifar10(root) == tmp_path / "cifar-10-batches-py"
        ds = load_dataset("cifar10", root)
        np.testing.assert_array_equal(ds.x_train, cifar.x_train)
        np.testing.assert_array_equal(ds.y_train, cifar.y_train)
        np.testing.assert_array_equal(ds.x_test, cifar.x_test)
        np.testing.assert_array_equal(ds.y_test, cifar.y_test)
    sub = load_dataset("cifar10", tmp_path, train_limit=50)
    assert np.bincount(sub.y_train).tolist() == [5] * 10
    np.testing.assert_array_equal(sub.x_train[0], cifar.x_train[0])


def test_cifar10_damaged_batch_raises_data_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in (*[f"data_batch_{i}" for i in range(1, 6)], "test_batch"):
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_1"):
        load_dataset("cifar10", folder)


def test_find_cifar10_missing_names_paths(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing)):
        find_cifar10(missing)
    with pytest.raises(DataError, match=str(missing)):
        load_dataset("cifar10", missing)
    # $PRUNEKIT_DATA comes first and is named when nothing fits.
    monkeypatch.setenv("PRUNEKIT_DATA", str(missing))
    with pytest.raises(DataError) as err:
        find_cifar10()
    assert str(missing) in str(err.value)
    # no built-in search path: without a folder or $PRUNEKIT_DATA the error says how to give one
    monkeypatch.delenv("PRUNEKIT_DATA")
    with pytest.raises(DataError, match="PRUNEKIT_DATA"):
        find_cifar10()


def test_find_cifar10_order(tmp_path, monkeypatch):
    # $PRUNEKIT_DATA comes first; like torchvision's root it may hold cifar-10-batches-py/.
    _write_batches_py(tmp_path / "cifar-10-batches-py", *(np.zeros((5, 32, 32, 3), np.uint8),
                                                          np.zeros(5, np.int64)) * 2)
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path))
    assert find_cifar10() == tmp_path / "cifar-10-batches-py"


# --------------------------------------------------------------------------- MNIST

def test_mnist_full(mnist):
    assert mnist.name == "mnist" and mnist.num_classes == 10
    assert mnist.x_train.shape == (60000, 28, 28, 1) and mnist.x_test.shape == (10000, 28, 28, 1)
    assert mnist.x_train.dtype == np.uint8 and mnist.y_test.dtype == np.int64
    assert mnist.in_channels == 1 and mnist.image_size == 28
    assert sorted(np.unique(mnist.y_train)) == list(range(10))
    assert abs(mnist.x_train.mean() / 255 - mnist.mean[0]) < 1e-3
    assert abs(mnist.x_train.std() / 255 - mnist.std[0]) < 1e-3


def test_mnist_subset_matches_full(mnist):
    sub = load_dataset("mnist", train_limit=100, test_limit=30)
    assert np.bincount(sub.y_train).tolist() == [10] * 10 and np.bincount(sub.y_test).tolist() == [3] * 10
    first_seven = np.flatnonzero(mnist.y_train == 7)[0]
    np.testing.assert_array_equal(sub.x_train[sub.y_train == 7][0], mnist.x_train[first_seven])


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_idx_folder_uncompressed_as_fashion_mnist(mnist, tmp_path):
    # Fashion-MNIST ships the same four file names; here they hold MNIST images, un-gzipped.
    _write_idx(tmp_path / "train-images-idx3-ubyte", mnist.x_train[:40, :, :, 0])
    _write_idx(tmp_path / "train-labels-idx1-ubyte", mnist.y_train[:40])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", mnist.x_test[:20, :, :, 0])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", mnist.y_test[:20])
    ds = load_dataset("fashion-mnist", tmp_path)
    assert ds.name == "fashion_mnist" and ds.x_train.shape == (40, 28, 28, 1)
    np.testing.assert_array_equal(ds.x_test, mnist.x_test[:20])
    np.testing.assert_array_equal(ds.y_train, mnist.y_train[:40])


def test_read_idx_gzip_header_and_malformed(tmp_path):
    labels = find_mnist() / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(labels, "rb") as f:
        magic, count = struct.unpack(">II", f.read(8))
    assert magic == 0x801 and count == 10000 and read_idx(labels).shape == (10000,)
    bad = tmp_path / "bad-idx1-ubyte"
    bad.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"\0" * 3)  # says 10, holds 3
    with pytest.raises(DataError, match="holds 3 bytes"):
        read_idx(bad)


def test_mnist_missing_names_paths(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=str(tmp_path)):
        load_dataset("mnist", tmp_path)
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path))
    with pytest.raises(DataError, match=str(tmp_path / "fashion_mnist")):
        load_dataset("fashion_mnist")


def test_unknown_dataset_and_bad_limit():
    with pytest.raises(ConfigError) as err:
        load_dataset("imagenet")
    assert all(name in str(err.value) for name in DATASETS)
    with pytest.raises(ConfigError, match="train_limit"):
        load_dataset("mnist", train_limit=0)


# --------------------------------------------------------------------------- batching

@pytest.fixture(scope="module")
def images():
    """400 real MNIST digits, shaped like a small data set."""
    ds = load_dataset("mnist", train_limit=400, test_limit=10)
    return ds.x_train, ds.y_train


def _collect(iterator):
    xs, ys = zip(*iterator)
    return np.concatenate(xs), np.concatenate(ys)


def test_batches_shapes_and_normalisation(cifar):
    it = cifar.batches("test", 32)
    assert len(it) == it.num_batches == num_batches(100, 32, drop_last=False) == 4
    x, y = _collect(it)
    assert x.shape == (100, 3, 32, 32) and x.dtype == np.float32 and y.dtype == np.int64
    expected = (cifar.x_test.astype(np.float32) / 255 - cifar.mean) / cifar.std
    np.testing.assert_allclose(x, expected.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y, cifar.y_test)  # test split: in order, nothing dropped


def test_batches_deterministic_per_seed_and_epoch(images):
    x, y = images
    make = lambda **kw: _collect(batches(x, y, 64, **kw))
    a, b = make(seed=3, epoch=1), make(seed=3, epoch=1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert len(a[1]) == num_batches(400, 64) * 64 == 384  # drop_last
    assert not np.array_equal(a[1], make(seed=3, epoch=2)[1])
    assert not np.array_equal(a[1], make(seed=4, epoch=1)[1])
    # Epoch e's order is the permutation of default_rng([seed, e]), whatever came before.
    order = np.random.default_rng([3, 1]).permutation(400)[:384]
    np.testing.assert_array_equal(a[1], y[order])
    # Without dropping, every item comes exactly once.
    _, labels = make(seed=3, epoch=1, drop_last=False)
    assert sorted(labels) == sorted(y)


def test_batches_resume_at_batch(images):
    x, y = images
    full = list(batches(x, y, 50, seed=7, epoch=5, augment=True))
    resumed = batches(x, y, 50, seed=7, epoch=5, augment=True, start_batch=3)
    assert len(resumed) == len(full) - 3 == 5
    for (xa, ya), (xb, yb) in zip(full[3:], resumed):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    with pytest.raises(ConfigError):
        batches(x, y, 50, start_batch=9)


def _crop_flip_candidates(image, pad=4):
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    h, w = image.shape[:2]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy:dy + h, dx:dx + w]
            yield crop
            yield crop[:, ::-1]


def test_augmentation_crops_and_flips(cifar):
    kw = dict(seed=1, epoch=0, mean=None, std=None)
    plain = next(iter(batches(cifar.x_train, cifar.y_train, 64, **kw)))
    it = batches(cifar.x_train, cifar.y_train, 64, augment=True, **kw)
    augmented = next(iter(it))
    assert augmented[0].shape == plain[0].shape == (64, 3, 32, 32)
    np.testing.assert_array_equal(augmented[1], plain[1])  # same order, only pixels change
    assert not np.array_equal(augmented[0], plain[0])
    np.testing.assert_array_equal(augmented[0], next(iter(it))[0])  # seeded
    # Each augmented image is one of the 81 crops of the zero-padded original, maybe mirrored.
    for k in range(8):
        original = cifar.x_train[it.order[k]]
        got = np.rint(augmented[0][k].transpose(1, 2, 0) * 255).astype(np.uint8)
        assert any(np.array_equal(got, c) for c in _crop_flip_candidates(original))
    # Over a batch, some images are flipped and crops land in various places.
    assert 0 < it._flips[:64].sum() < 64 and len(np.unique(it._offsets[:64], axis=0)) > 10


def test_batch_iterator_rejects_bad_input(images):
    x, y = images
    with pytest.raises(ConfigError):
        BatchIterator(x.astype(np.float32), y, 8)
    with pytest.raises(ConfigError):
        BatchIterator(x, y[:-1], 8)
    with pytest.raises(ConfigError):
        BatchIterator(x, y, 0)
    with pytest.raises(ConfigError):
        BatchIterator(x, y, 8, mean=(0.5, 0.5), std=(1, 1))


def test_split_train_val(images):
    x, y = images
    xt, yt, xv, yv = split_train_val(x, y, 0.1, seed=0)
    assert len(xv) == 40 and len(xt) == 360 and xt.dtype == np.uint8
    again = split_train_val(x, y, 0.1, seed=0)
    np.testing.assert_array_equal(again[2], xv)
    assert not np.array_equal(split_train_val(x, y, 0.1, seed=1)[3], yv)
    # A partition: each image lands in exactly one part.
    assert sorted(np.concatenate([yt, yv])) == sorted(y)
    with pytest.raises(ConfigError):
        split_train_val(x, y, 1.0, seed=0)
    with pytest.raises(ConfigError):
        split_train_val(x[:5], y[:5], 0.01, seed=0)


def test_dataset_rejects_mismatched_arrays():
    x = np.zeros((4, 8, 8, 1), np.uint8)
    with pytest.raises(DataError):
        Dataset("toy", x, np.zeros(3, np.int64), x, np.zeros(4, np.int64), 2, (0.5,), (0.5,))
    with pytest.raises(DataError):
        Dataset("toy", x, np.zeros(4, np.int64), x, np.zeros(4, np.int64), 2, (0.5, 0.5), (0.5, 0.5))
