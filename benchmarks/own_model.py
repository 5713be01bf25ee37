"""A user-style run of ``prunekit run`` (#13): a model from a model collection, trained and pruned on
an image folder, per backend.

The folder is cut from the shared CIFAR-10 JPEGs (``--classes`` classes, ``--train`` training and
``--val`` validation images per class: ``train/<class>/*.jpg`` and ``val/<class>/*.jpg``, the
files copied as they are) and read through the folder data set at ``--size`` x ``--size`` (the
32x32 images upsampled). For each ``backend=model`` pair the job runs dense training, then
magnitude pruning to ``--sparsity``; printed: accuracy before/after pruning, the sparsity of
the prunable weights read back from the run's ``weights.npz``, dense and effective MACs (the
report's, measured from the layers), and the time per epoch.

    python benchmarks/own_model.py --runs torch=torchvision:resnet18 mindspore=mindcv:mobilenet_v2_100 \
        [--classes 10 --train 200 --val 50 --size 64 --dense-epochs 1 --prune-epochs 1] [--out /tmp/own-bench]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prunekit.app.data import CIFAR10_CLASSES  # noqa: E402
from prunekit.app.job import RunConfig, run  # noqa: E402


def make_folder(out: str, classes: int, train: int, val: int) -> str:
    data = os.environ.get("PRUNEKIT_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets"))
    for split, zsplit, count in (("train", "train", train), ("val", "test", val)):
        with zipfile.ZipFile(os.path.join(data, "cifar10", f"{zsplit}.zip")) as z:
            names = sorted(z.namelist())
            for c in CIFAR10_CLASSES[:classes]:
                folder = os.path.join(out, split, c)
                os.makedirs(folder, exist_ok=True)
                members = [n for n in names if n.startswith(f"{zsplit}/{c}/") and n.endswith(".jpg")][:count]
                for m in members:
                    with open(os.path.join(folder, os.path.basename(m)), "wb") as f:
                        f.write(z.read(m))
    return out


def weight_sparsity(out: str) -> float:
    plan = json.load(open(os.path.join(out, "plan.json")))
    w = np.load(os.path.join(out, "weights.npz"))
    arrays = [w[f"{name}.weight"] for name, _ in plan["layer_signature"]]
    return sum(int((a == 0).sum()) for a in arrays) / sum(a.size for a in arrays)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", nargs="+", default=["torch=torchvision:resnet18", "mindspore=mindcv:mobilenet_v2_100"])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train", type=int, default=200)
    p.add_argument("--val", type=int, default=50)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--dense-epochs", type=int, default=1)
    p.add_argument("--prune-epochs", type=int, default=1)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--out", default="/tmp/own-bench")
    args = p.parse_args()
    folder = make_folder(os.path.join(args.out, "images"), args.classes, args.train, args.val)
    rows = []
    for spec in args.runs:
        backend, model = spec.split("=", 1)
        out = os.path.join(args.out, backend)
        cfg = RunConfig(backend=backend, model=model, dataset="folder", data_root=folder, input_size=args.size,
                        algorithm="magnitude", sparsity=args.sparsity, dense_epochs=args.dense_epochs,
                        prune_epochs=args.prune_epochs, batch_size=args.batch_size, lr=args.lr, train_limit=None,
                        test_limit=None, latency_batch=0, progress=False, out=out)
        report = run(cfg, echo=lambda *a: None)
        epochs = args.dense_epochs + args.prune_epochs
        row = {"backend": backend, "model": model, "before": report["accuracy"].get("before_pruning"),
               "after": report["accuracy"]["after_pruning"], "sparsity": weight_sparsity(out),
               "dense_macs": report["totals"]["dense_macs"],
               "effective_macs": report["totals"]["effective_macs"],
               "s_per_epoch": report["run"]["train_seconds"] / epochs}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| backend | model | accuracy before | accuracy after | weight sparsity | MACs dense -> effective | s/epoch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        macs = (f"{r['dense_macs'] / 1e6:.1f}M -> {r['effective_macs'] / 1e6:.1f}M" if r["dense_macs"] else "n/a")
        before = f"{r['before']:.1%}" if r["before"] is not None else "-"
        print(f"| {r['backend']} | {r['model']} | {before} | {r['after']:.1%} | {r['sparsity']:.2%} | {macs} | "
              f"{r['s_per_epoch']:.0f} |")


if __name__ == "__main__":
    main()
