"""Step-time cost of RPG's rank term and TRP's projection, against plain training.

For each backend and model: trainers on identical copies of the model, batch 128 of real
CIFAR-10 images; plain SGD, RPG with the rank term every step (rank_every = 1) and TRP acting
every step (m = 1), each with the fast spectrum method and with full SVD ("exact") beside it.
Steps alternate between the trainers in blocks so that machine noise hits them alike; the
medians are compared. RPG runs at a fixed sparsity (no mask update inside the window), so
the ratio isolates the rank machinery.

    python benchmarks/rank_overhead.py [--backends torch,mindspore] [--models resnet20,resnet56]
                                       [--methods gram,subspace,exact] [--write]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prunekit.app import data  # noqa: E402
from prunekit.algorithms.rpg import RPGConfig, RPGPruner  # noqa: E402
from prunekit.algorithms.trp import TRPConfig, TRPPruner  # noqa: E402
from prunekit.contract.backend import get_backend  # noqa: E402
from results import machine, write_section  # noqa: E402


def make_trainers(backend, model: str, methods):
    total = 100_000
    trainers = {}

    def trainer(algo):
        h = backend.model_handle(model, seed=0)
        return backend.Trainer(h, algo, "sgd", 0.05, 0.9, 5e-4, total_steps=total, lr_schedule="constant")

    trainers["plain"] = trainer(None)
    for m in methods:
        # frequency beyond the window: the rank term runs every step, masks stay as they are
        trainers[f"rpg/{m}"] = trainer(RPGPruner(RPGConfig(sparsity=0.9, rank_every=1, spectrum=m, frequency=total // 2)))
        trainers[f"trp/{m}"] = trainer(TRPPruner(TRPConfig(every=1, spectrum=m)))
    return trainers


def measure(trainers, batches, rounds: int, block: int):
    x, y = batches[0]
    for t in trainers.values():
        for _ in range(2):
            float(t.train_step(x, y))
    times = {k: [] for k in trainers}
    cpu = {k: [] for k in trainers}  # process CPU time, all threads: less sensitive to other load
    names = list(trainers)
    i = 0
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            for _ in range(block):
                bx, by = batches[i % len(batches)]
                i += 1
                t0, c0 = time.perf_counter(), time.process_time()
                float(trainers[k].train_step(bx, by))
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    return ({k: statistics.median(v) * 1e3 for k, v in times.items()},
            {k: statistics.median(v) * 1e3 for k, v in cpu.items()})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="torch,mindspore")
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--methods", default="gram,subspace,exact")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--block", type=int, default=3)
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    ds = data.load_dataset("cifar10", train_limit=1280, test_limit=10)
    batches = list(data.batches(ds.x_train, ds.y_train, 128, seed=0, epoch=0, augment=True, mean=ds.mean, std=ds.std))
    methods = [m for m in args.methods.split(",") if m]
    rows = []
    for b in [b for b in args.backends.split(",") if b]:
        backend = get_backend(b)
        for model in [m for m in args.models.split(",") if m]:
            ms, cpu = measure(make_trainers(backend, model, methods), batches, args.rounds, args.block)
            for k, v in ms.items():
                rows.append((b, model, k, v, v / ms["plain"], cpu[k] / cpu["plain"]))
                print(f"{b:<10} {model:<9} {k:<14} {v:8.1f} ms/step  {v / ms['plain']:.3f}x plain  "
                      f"(CPU time {cpu[k]:.1f} ms, {cpu[k] / cpu['plain']:.3f}x)", flush=True)
    if args.write:
        write(rows, methods)


def write(rows, methods):
    lines = [f"Machine: {machine()}. Command: `python benchmarks/rank_overhead.py --write`. "
             "`exact` (batched full SVD) is the full-SVD figure, for comparison.", "",
             "| backend | model | trainer | ms/step | × plain | CPU time × plain |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {b} | {m} | {k} | {v:.1f} | {r:.3f} | {c:.3f} |" for b, m, k, v, r, c in rows]
    write_section("Rank machinery: RPG (rank_every = 1) and TRP (m = 1) step time, batch 128, CPU", lines)

if __name__ == "__main__":
    main()
