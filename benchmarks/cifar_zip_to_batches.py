"""Write one split of the CIFAR-10 JPEG zips as the standard ``cifar-10-batches-py`` pickles.

The GPU machine takes at most 64 MiB per call, and the two zips together are 62 MiB beside the
repository, so they travel in two calls and are unpacked there into the standard layout that
``prunekit.app.data.load_dataset`` reads (``data_batch_1..5`` from train.zip, ``test_batch`` from test.zip).

    python benchmarks/cifar_zip_to_batches.py ZIP_FOLDER OUT_FOLDER train|test
"""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prunekit.app.data import _load_cifar10_zip  # noqa: E402


def main(zip_folder: str, out: str, split: str) -> None:
    x, y = _load_cifar10_zip(Path(zip_folder) / f"{split}.zip", split, None, None)
    os.makedirs(out, exist_ok=True)
    flat = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # NHWC -> rows of CHW, as the pickles hold
    parts = [("test_batch", slice(None))] if split == "test" else \
        [(f"data_batch_{i + 1}", slice(i * 10000, (i + 1) * 10000)) for i in range(5)]
    for name, sl in parts:
        with open(os.path.join(out, name), "wb") as f:
            pickle.dump({b"data": flat[sl], b"labels": [int(v) for v in y[sl]]}, f)
    print(f"{split}: {len(x)} images -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
