"""Per-step cost of the divergence check (``prunekit.app.divergence.FiniteGuard``).

For each backend: two trainers on identical ResNet-20 copies with magnitude pruning (masks set,
the steady state), one with the end-of-step finite check and one with it switched off
(``session.finite.enabled = False``). Steps alternate between the two in blocks and the medians
are compared, so the ratio is measured side by side in one process; the check alone is timed
too (50 calls), which a loaded machine disturbs less than whole steps. With --write the figures go
to benchmarks/RESULTS.md.

    python benchmarks/finite_check_overhead.py [--backends torch,mindspore] [--batch 128] [--rounds 6] [--threads 1] [--write]
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
from prunekit.algorithms.magnitude import MagnitudeConfig, MagnitudePruner  # noqa: E402
from prunekit.contract.backend import get_backend  # noqa: E402
from results import machine, write_section  # noqa: E402


def measure(name: str, batches, rounds: int, block: int) -> dict:
    backend = get_backend(name)
    total = 10_000
    trainers = {}
    for label in ("checked", "unchecked"):
        handle = backend.model_handle("resnet20", seed=0)
        algo = MagnitudePruner(MagnitudeConfig(sparsity=0.9, schedule="oneshot", begin_fraction=0.0, frequency=total))
        trainers[label] = backend.Trainer(handle, algo, "sgd", 0.05, 0.9, 5e-4, total_steps=total,
                                          lr_schedule="constant")
    trainers["unchecked"].session.finite.enabled = False
    x, y = batches[0]
    for t in trainers.values():
        for _ in range(2):
            float(t.train_step(x, y))
    times = {k: [] for k in trainers}
    i = 0
    for r in range(rounds):
        order = ("checked", "unchecked") if r % 2 == 0 else ("unchecked", "checked")
        for label in order:
            for _ in range(block):
                bx, by = batches[i % len(batches)]
                i += 1
                t0 = time.perf_counter()
                float(trainers[label].train_step(bx, by))  # forces the step to finish on every backend
                times[label].append(time.perf_counter() - t0)
    # the check alone, as the session runs it at the end of a step (loss noted, every weight summed)
    guard, loss = trainers["checked"].session.finite, trainers["checked"].train_step(x, y)
    alone = []
    for _ in range(50):
        t0 = time.perf_counter()
        guard.note_loss(loss)
        guard.check(0)
        alone.append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()} | {"steps": len(times["checked"]),
                                                                         "check_ms": statistics.median(alone) * 1e3}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="torch,mindspore")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--block", type=int, default=3)
    p.add_argument("--write", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="PyTorch intra-op threads (steadier timings on a shared machine)")
    args = p.parse_args(argv)
    if "torch" in args.backends:
        import torch

        torch.set_num_threads(args.threads)
    ds = data.load_dataset("cifar10", train_limit=8 * args.batch, test_limit=10)
    batches = list(data.batches(ds.x_train, ds.y_train, args.batch, seed=0, epoch=0, mean=ds.mean, std=ds.std))
    rows = []
    for name in [b for b in args.backends.split(",") if b]:
        r = measure(name, batches, args.rounds, args.block)
        overhead = r["checked"] / r["unchecked"] - 1
        print(f"{name}: with the finite check {r['checked']:.1f} ms/step, without {r['unchecked']:.1f} ms/step "
              f"-> {overhead:+.2%} ({r['steps']} steps each); the check alone {r['check_ms']:.2f} ms "
              f"({r['check_ms'] / r['unchecked']:.2%} of a step)")
        rows.append(f"| {name} | {r['unchecked']:.1f} ms | {r['checked']:.1f} ms | {overhead:+.2%} | {r['steps']} | "
                    f"{r['check_ms']:.2f} ms ({r['check_ms'] / r['unchecked']:.2%}) |")
    if args.write:
        write_section(f"Divergence check overhead, ResNet-20, batch {args.batch}, CPU",
                      [f"Machine: {machine()}. Command: `python benchmarks/finite_check_overhead.py --batch "
                       f"{args.batch} --rounds {args.rounds} --block {args.block} --write`. On a loaded machine "
                       "whole-step times move by +-15 % from run to run: the check timed alone is the figure to read.",
                       "", "| backend | step without check | step with check | overhead | steps each | the check alone |",
                       "| --- | --- | --- | --- | --- | --- |", *rows])


if __name__ == "__main__":
    main()
