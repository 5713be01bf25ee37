"""Per-step cost of prunekit's pruning machinery, and MindSpore against PyTorch.

For each backend: two trainers on identical ResNet-20 copies, batch 128 (CIFAR-10 images),
one plain and one with magnitude pruning at 90 % sparsity whose masks are already set, so
each step pays gradient masking and weight re-masking (the steady state between mask
updates). Steps alternate between the two in blocks, and the medians are compared. The
cost of one mask update (global top-k over all weights), amortised over its interval, is
measured separately. Results go to stdout and, with --write, to benchmarks/RESULTS.md.

    python benchmarks/step_overhead.py [--backends torch,mindspore] [--rounds 8] [--write]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prunekit.app import data  # noqa: E402
from prunekit.algorithms.magnitude import MagnitudeConfig, MagnitudePruner  # noqa: E402
from prunekit.contract.backend import get_backend  # noqa: E402
from results import machine, write_section  # noqa: E402


def _sync_loss(loss):
    return float(loss)  # forces the step to finish on every backend


def measure_backend(name: str, batches, rounds: int, block: int, frequency: int):
    backend = get_backend(name)
    plain_h = backend.model_handle("resnet20", seed=0)
    pruned_h = backend.model_handle("resnet20", seed=0)
    total = 10_000
    plain = backend.Trainer(plain_h, None, "sgd", 0.05, 0.9, 5e-4, total_steps=total, lr_schedule="constant")
    algo = MagnitudePruner(MagnitudeConfig(sparsity=0.9, schedule="oneshot", begin_fraction=0.0, frequency=total))
    pruned = backend.Trainer(pruned_h, algo, "sgd", 0.05, 0.9, 5e-4, total_steps=total, lr_schedule="constant")
    x, y = batches[0]
    for _ in range(3):  # warm-up; the pruned trainer sets its masks on its first step
        _sync_loss(plain.train_step(x, y))
        _sync_loss(pruned.train_step(x, y))
    times = {"plain": [], "pruned": []}
    i = 0
    for r in range(rounds):
        order = (("plain", plain), ("pruned", pruned)) if r % 2 == 0 else (("pruned", pruned), ("plain", plain))
        for label, trainer in order:
            for _ in range(block):
                bx, by = batches[i % len(batches)]
                i += 1
                t0 = time.perf_counter()
                _sync_loss(trainer.train_step(bx, by))
                times[label].append(time.perf_counter() - t0)
    # one mask update (global top-k over all prunable weights), amortised over `frequency` steps
    upd = []
    for _ in range(5):
        t0 = time.perf_counter()
        algo.update_masks(0.9)
        algo.ops.to_numpy(next(iter(algo.masks.values())))
        upd.append(time.perf_counter() - t0)
    sparsity = 1 - sum(np.count_nonzero(w) for w in pruned_h.weights_numpy().values()) / sum(
        w.size for w in pruned_h.weights_numpy().values())
    return {
        "plain_ms": statistics.median(times["plain"]) * 1e3,
        "pruned_ms": statistics.median(times["pruned"]) * 1e3,
        "update_ms": statistics.median(upd) * 1e3,
        "frequency": frequency,
        "measured_sparsity": sparsity,
        "steps": len(times["plain"]),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="torch,mindspore")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--block", type=int, default=4)
    p.add_argument("--frequency", type=int, default=100, help="mask-update interval used to amortise its cost")
    p.add_argument("--write", action="store_true", help="write the figures into benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    ds = data.load_dataset("cifar10", train_limit=1280, test_limit=10)
    batches = list(data.batches(ds.x_train, ds.y_train, 128, seed=0, epoch=0, augment=True, mean=ds.mean, std=ds.std))
    results = {}
    for name in [b for b in args.backends.split(",") if b]:
        r = measure_backend(name, batches, args.rounds, args.block, args.frequency)
        results[name] = r
        overhead = r["pruned_ms"] / r["plain_ms"] - 1
        amortised = (r["pruned_ms"] + r["update_ms"] / r["frequency"]) / r["plain_ms"] - 1
        print(f"{name}: plain {r['plain_ms']:.1f} ms/step, with masks {r['pruned_ms']:.1f} ms/step "
              f"-> overhead {overhead:+.2%}; mask update {r['update_ms']:.1f} ms, amortised over "
              f"{r['frequency']} steps {amortised:+.2%}; measured sparsity {r['measured_sparsity']:.2%}")
    if "torch" in results and "mindspore" in results:
        ratio = results["mindspore"]["plain_ms"] / results["torch"]["plain_ms"]
        print(f"MindSpore / PyTorch plain step time: {ratio:.2f}x")
    if args.write:
        write_results(results)


def write_results(results):
    lines = [f"Machine: {machine()}. Command: `python benchmarks/step_overhead.py --write`.", "",
             "| backend | plain step | step with masks | overhead | mask update | amortised over 100 steps | measured sparsity |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['plain_ms']:.1f} ms | {r['pruned_ms']:.1f} ms | {r['pruned_ms'] / r['plain_ms'] - 1:+.2%} | "
                     f"{r['update_ms']:.1f} ms | {(r['pruned_ms'] + r['update_ms'] / r['frequency']) / r['plain_ms'] - 1:+.2%} | "
                     f"{r['measured_sparsity']:.2%} |")
    if "torch" in results and "mindspore" in results:
        lines += ["", f"MindSpore / PyTorch plain step time, same model, batch and machine: "
                      f"{results['mindspore']['plain_ms'] / results['torch']['plain_ms']:.2f}x"]
    write_section("Pruning-machinery overhead, ResNet-20, batch 128, CPU", lines)

if __name__ == "__main__":
    main()
