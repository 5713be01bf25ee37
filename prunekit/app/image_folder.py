"""The ``folder`` data set: a user's images, one sub-folder per class.

Layouts (``--data-root DIR``):

* ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (``validation/`` or ``test/`` also name the
  second split): both splits as given; their class sets must be equal;
* ``DIR/<class>/*``: one set, from which a seeded, class-stratified share ``val_fraction`` is
  held out for testing (in every class ``round(n * val_fraction)`` images, at least one, at most
  ``n - 1``, drawn by ``np.random.default_rng([seed, class index])``).

Classes are the sub-folder names, sorted; images the files ending in .jpg, .jpeg, .png, .bmp,
.gif or .webp (other files and hidden entries are skipped), sorted by name. ``train_limit`` /
``test_limit`` keep a class-balanced subset (the first images of each class, as the other data
sets do) before anything is decoded.

Each image is decoded with Pillow to RGB, its shorter side resized to ``image_size`` (bilinear),
then center-cropped to ``image_size`` x ``image_size``: uint8 NHWC arrays, so batching,
augmentation and normalisation are :mod:`prunekit.app.data`'s, identical on every backend.
Normalisation statistics (``normalization``): ``"computed"`` (the default: per-channel mean and
std of the training images on the [0, 1] scale), ``"imagenet"`` (the usual constants), or stated
as ``"m1,m2,m3/s1,s2,s3"``.

Errors (:class:`~prunekit.errors.DataError`) name the folder or the file: no class sub-folders,
a class folder without images, an image that cannot be decoded, class sets that differ between
the splits.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from prunekit.errors import ConfigError, DataError

NAME = "folder"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
VAL_FOLDERS = ("val", "validation", "test")
DEFAULT_IMAGE_SIZE = 64
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def parse_normalization(text: Optional[str]) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """``None`` for ``"computed"`` (or None), the constants for ``"imagenet"``, the stated
    ``"m1,m2,m3/s1,s2,s3"`` values; :class:`ConfigError` for anything else."""
    if text is None or str(text).lower() == "computed":
        return None
    if str(text).lower() == "imagenet":
        return IMAGENET_STATS
    mean, sep, std = str(text).partition("/")
    try:
        m = tuple(float(v) for v in mean.split(","))
        s = tuple(float(v) for v in std.split(","))
    except ValueError:
        m = s = ()
    if not sep or not m or len(m) != len(s) or any(v <= 0 for v in s):
        raise ConfigError(f"normalization {text!r}: expected computed, imagenet, or MEAN/STD as per-channel "
                          "lists of equal length with std > 0, e.g. 0.5,0.5,0.5/0.25,0.25,0.25")
    return m, s


def _classes(folder: Path) -> List[str]:
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {folder} has no class sub-folders (expected {folder}/<class>/<image>)")
    return classes


def _files(folder: Path, classes: Sequence[str]) -> Tuple[List[Path], np.ndarray]:
    files, labels = [], []
    for index, name in enumerate(classes):
        found = sorted(p for p in (folder / name).iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"class folder {folder / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += found
        labels += [index] * len(found)
    return files, np.array(labels, dtype=np.int64)


def find_splits(root) -> Tuple[Path, Optional[Path]]:
    """``(train folder, validation folder or None)`` of a data root (see the module docstring)."""
    if root is None:
        raise ConfigError("dataset folder needs --data-root DIR (data_root in a recipe): the folder holding "
                          "train/ and val/, or one sub-folder per class")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    if (root / "train").is_dir():
        val = next((root / v for v in VAL_FOLDERS if (root / v).is_dir()), None)
        if val is None:
            raise DataError(f"image folder {root} has train/ but no {', '.join(v + '/' for v in VAL_FOLDERS)}"
                            " beside it (or use one folder of class sub-folders and a held-out split)")
        return root / "train", val
    return root, None


def _limit(labels: np.ndarray, limit: Optional[int], num_classes: int) -> np.ndarray:
    """Indices of a class-balanced subset: the first ``limit // classes`` of each class, in order."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    per_class, extra = divmod(limit, num_classes)
    keep = [np.flatnonzero(labels == c)[:per_class + (c < extra)] for c in range(num_classes)]
    return np.sort(np.concatenate(keep))


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {fraction!r}")
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            raise DataError(f"class {int(c)} has {len(idx)} image: a held-out split needs at least 2 per class")
        n_val = min(len(idx) - 1, max(1, int(round(len(idx) * fraction))))
        order = np.random.default_rng([seed, int(c)]).permutation(len(idx))
        val.append(idx[order[:n_val]])
        train.append(idx[order[n_val:]])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def decode(path: Path, size: int) -> np.ndarray:
    """One image as uint8 (size, size, 3): RGB, shorter side resized to ``size``, center crop."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            w, h = image.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            image = image.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {path}: {e}") from None


def _decode_all(files: Sequence[Path], size: int, desc: str, progress: bool) -> np.ndarray:
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(files), desc=desc, unit="image", mininterval=1.0, file=sys.stderr)
        except ImportError:
            bar = None
    try:
        for i, path in enumerate(files):
            out[i] = decode(path, size)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


def computed_stats(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 NHWC images on the [0, 1] scale (float64 sums)."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def load_image_folder(root, image_size: Optional[int] = None, train_limit: Optional[int] = None,
                      test_limit: Optional[int] = None, val_fraction: float = 0.2, seed: int = 0,
                      normalization: Optional[str] = None, progress: bool = False):
    """The :class:`prunekit.app.data.Dataset` of an image folder (see the module docstring); its
    ``classes`` attribute holds the class names."""
    from prunekit.app.data import Dataset

    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ConfigError(f"input_size must be an integer >= 8, got {image_size!r}")
    stats = parse_normalization(normalization)
    train_dir, val_dir = find_splits(root)
    classes = _classes(train_dir)
    files, labels = _files(train_dir, classes)
    if val_dir is not None:
        val_classes = _classes(val_dir)
        if val_classes != classes:
            only_train = sorted(set(classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(classes))
            raise DataError(f"class folders of {train_dir} and {val_dir} differ: only in {train_dir.name}: "
                            f"{', '.join(only_train) or 'none'}; only in {val_dir.name}: {', '.join(only_val) or 'none'}")
        test_files, test_labels = _files(val_dir, classes)
    else:
        train_idx, val_idx = _stratified_split(labels, val_fraction, seed)
        test_files, test_labels = [files[i] for i in val_idx], labels[val_idx]
        files, labels = [files[i] for i in train_idx], labels[train_idx]
    keep = _limit(labels, train_limit, len(classes))
    files, labels = [files[i] for i in keep], labels[keep]
    keep = _limit(test_labels, test_limit, len(classes))
    test_files, test_labels = [test_files[i] for i in keep], test_labels[keep]
    x_train = _decode_all(files, size, f"reading {train_dir}", progress)
    x_test = _decode_all(test_files, size, f"reading {val_dir or train_dir} (held out)" if val_dir is None
                         else f"reading {val_dir}", progress)
    if stats is None:
        mean, std = computed_stats(x_train)
    else:
        mean, std = stats
        if len(mean) != 3:
            raise ConfigError(f"normalization {normalization!r} gives {len(mean)} channel(s); images are RGB (3)")
    ds = Dataset(NAME, x_train, labels, x_test, test_labels, num_classes=len(classes), mean=mean, std=std)
    ds.classes = tuple(classes)
    ds.root = os.fspath(Path(root).expanduser())
    return ds
