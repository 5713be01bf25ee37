"""One training run per algorithm for the data-parallel tests (``tests/app/test_distributed.py``).

Run as a plain process it trains single-process; launched by ``torchrun`` or ``msrun`` it trains
data-parallel (each rank its share of the same global batches). Either way it writes, for each
algorithm, ``<out>/<algorithm>_rank<r>.npz`` holding the final masks (``mask/<layer>``), ranks
(``rank/<layer>``), every parameter (``w/<name>``) and the guard's counters.

Model: ``mnist_cnn`` (no BatchNorm, so data parallel equals the single-process run over the
same global batches) on real CIFAR-10 images, centre-cropped to 28x28.

    python tests/app/distributed_worker.py --backend torch --out DIR [--algorithms magnitude,rpg,trp]
    python tests/app/distributed_worker.py --backend mindspore --graph-mode --out DIR   # GRAPH_MODE
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<group>/<file>
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from prunekit.app import data as datasets  # noqa: E402
from prunekit.algorithms import make_algorithm  # noqa: E402
from prunekit.contract.backend import get_backend  # noqa: E402
from prunekit.app.distributed import start_distributed, trainer_class, world  # noqa: E402

TRAIN_IMAGES = 256
GLOBAL_BATCH = 64
STEPS = 8
#: settings that make every hook act within STEPS steps (mask updates, RigL regrowth, rank terms)
SETTINGS = {
    "magnitude": {"sparsity": 0.8, "frequency": 2, "end_fraction": 0.75},
    "rpg": {"sparsity": 0.8, "frequency": 2, "end_fraction": 0.75, "drop_alpha": 0.3, "lam": 0.5},
    "trp": {"energy": 0.9, "lam": 3e-4, "every": 2},
}


def global_batches(steps: int = STEPS, batch: int = GLOBAL_BATCH):
    """The global batches, identical in every process: real CIFAR-10 images cropped to 28x28."""
    ds = datasets.load_dataset("cifar10", train_limit=TRAIN_IMAGES, test_limit=10)
    out, epoch = [], 0
    while len(out) < steps:
        for x, y in datasets.batches(ds.x_train, ds.y_train, batch, seed=0, epoch=epoch, mean=ds.mean, std=ds.std):
            out.append((np.ascontiguousarray(x[:, :, 2:30, 2:30]), y))
        epoch += 1
    return out[:steps]


def train(backend, algorithm_name: str, batches, trainer_cls) -> dict:
    handle = backend.model_handle("mnist_cnn", num_classes=10, in_channels=3, image_size=28, seed=0)
    algorithm = make_algorithm(algorithm_name, **SETTINGS[algorithm_name])
    trainer = trainer_cls(handle, algorithm, "sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                          total_steps=len(batches))
    for x, y in batches:
        trainer.train_step(x, y)
    trainer.finish()
    guard = getattr(trainer.session, "guard", None)
    out = {f"w/{k}": v for k, v in handle.state_numpy().items()}
    out.update({f"mask/{k}": v for k, v in algorithm.plan().masks.items()})
    out.update({f"rank/{k}": np.array(v) for k, v in (algorithm.ranks or {}).items()})
    out["mask_syncs"] = np.array(guard.mask_syncs if guard else 0)
    out["mismatched_entries"] = np.array(guard.mismatched_entries if guard else 0)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--algorithms", default="magnitude,rpg,trp")
    p.add_argument("--graph-mode", action="store_true", help="MindSpore: train in GRAPH_MODE")
    p.add_argument("--steps", type=int, default=STEPS, help="global batches trained on (default %(default)s)")
    args = p.parse_args(argv)
    backend = get_backend(args.backend)
    if args.graph_mode:
        import mindspore
        mindspore.set_context(mode=mindspore.GRAPH_MODE)
    if args.backend == "torch":
        import torch
        torch.set_num_threads(1)
    comm = start_distributed(backend)
    trainer_cls = trainer_class(backend, comm)
    batches = global_batches(args.steps)
    os.makedirs(args.out, exist_ok=True)
    for name in args.algorithms.split(","):
        result = train(backend, name, batches, trainer_cls)
        np.savez(os.path.join(args.out, f"{name}_rank{world().rank}.npz"), **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
