"""Small image folders for the tests, cut from the shared CIFAR-10 JPEG zips (bytes copied as they are)."""
from __future__ import annotations

import functools
import os
import zipfile
from pathlib import Path

import pytest

CLASSES = ("airplane", "cat", "ship")


def cifar_zip(split: str) -> Path:
    root = os.environ.get("PRUNEKIT_DATA")
    path = Path(root) / "cifar10" / f"{split}.zip" if root else None
    if path is None or not path.is_file():
        pytest.skip("the CIFAR-10 JPEG zips are not available ($PRUNEKIT_DATA/cifar10)")
    return path


def make_image_folder(root: Path, per_class: int = 8, val_per_class: int = 4, classes=CLASSES,
                      split_layout: bool = True) -> Path:
    """``root/train/<class>/*.jpg`` + ``root/val/<class>/*.jpg`` (or ``root/<class>/*.jpg`` with
    ``split_layout=False``), the first images of each class of the CIFAR-10 train/test zips."""
    for split, zsplit, count in (("train", "train", per_class), ("val", "test", val_per_class)):
        if not split_layout and split == "val":
            break
        for c in classes:
            folder = root / split / c if split_layout else root / c
            folder.mkdir(parents=True, exist_ok=True)
            for name, raw in _jpegs(zsplit, c)[:count]:
                (folder / name).write_bytes(raw)
    return root


@functools.lru_cache(maxsize=None)
def _jpegs(split: str, cls: str, most: int = 12):
    """``(file name, JPEG bytes)`` of the first ``most`` images of a class of a CIFAR-10 zip (read once)."""
    with zipfile.ZipFile(cifar_zip(split)) as z:
        members = sorted(n for n in z.namelist() if n.startswith(f"{split}/{cls}/") and n.endswith(".jpg"))[:most]
        return tuple((os.path.basename(m), z.read(m)) for m in members)
