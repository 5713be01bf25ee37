"""Cost of ``prunekit run``'s checkpoints (and trajectory records) against the time of an epoch.

ResNet-20 on the full CIFAR-10 training set (50,000 images, batch 128: 390 steps an epoch) in
the pruning phase with an algorithm bound (magnitude or RPG, masks set), on the CPU. The job
checkpoints once per epoch by default, so the overhead is (one checkpoint write) / (one epoch).
The epoch time is extrapolated from ``--steps`` measured training steps (steps x 390); the
checkpoint is written with the job's own code (:class:`prunekit.app.run_state.RunProgress.save`:
model, optimizer, algorithm state, random states, atomic write with fsync) ``--saves`` times,
and read back (what ``--resume`` does first) as many times. A trajectory record (sparsity
measured from the masks, mean rank; one every 39 steps by default) is timed as well.

    python benchmarks/checkpoint_overhead.py [--backends torch,mindspore] [--algorithm rpg]
                                             [--steps 20] [--saves 5] [--write]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prunekit.app import checkpoint as ckpt  # noqa: E402
from prunekit.app import data  # noqa: E402
from prunekit.algorithms import make_algorithm  # noqa: E402
from prunekit.contract.backend import get_backend  # noqa: E402
from prunekit.app.job import RunConfig  # noqa: E402
from prunekit.app.run_state import RunProgress  # noqa: E402
from results import machine, write_section  # noqa: E402

BATCH = 128


def measure(backend_name: str, algorithm: str, ds, steps: int, saves: int) -> dict:
    backend = get_backend(backend_name)
    steps_per_epoch = data.num_batches(len(ds.y_train), BATCH)
    total = 3 * steps_per_epoch
    handle = backend.model_handle("resnet20", 10, 3, 32, seed=0)
    cfg = RunConfig(backend=backend_name, model="resnet20", algorithm=algorithm, sparsity=0.9, frequency=5)
    algo = make_algorithm(algorithm, **cfg.algorithm_kwargs(total))
    trainer = backend.Trainer(handle, algo, "sgd", 0.05, 0.9, 5e-4, total_steps=total)
    batches = data.batches(ds.x_train, ds.y_train, BATCH, seed=0, epoch=0, augment=True, mean=ds.mean, std=ds.std)
    it = iter(batches)
    for _ in range(6):  # warm-up (compilation, first mask updates: masks are set from here on)
        x, y = next(it)
        float(trainer.train_step(x, y))
    step_times = []
    for _ in range(steps):
        x, y = next(it)
        t0 = time.perf_counter()
        float(trainer.train_step(x, y))  # float(): waits for the step to finish
        step_times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as out:
        progress = RunProgress(steps_per_epoch, 0, 3, None, {"backend": backend_name}, out, backend, handle)
        progress.step = trainer.session.step
        save_times, load_times, record_times = [], [], []
        for _ in range(saves):
            t0 = time.perf_counter()
            progress.save(trainer, algo, "prune")
            save_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ckpt.read_checkpoint(ckpt.checkpoint_path(out))
            load_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            progress.record("prune", algo, 1.0)
            record_times.append(time.perf_counter() - t0)
        size = os.path.getsize(ckpt.checkpoint_path(out))
    step = statistics.median(step_times)
    epoch = step * steps_per_epoch
    save = statistics.median(save_times)
    record = statistics.median(record_times)
    return {"backend": backend_name, "algorithm": algorithm, "step": step, "epoch": epoch, "steps": steps,
            "steps_per_epoch": steps_per_epoch, "save": save, "save_max": max(save_times),
            "load": statistics.median(load_times), "size": size, "record": record,
            "records_per_epoch": steps_per_epoch // progress.record_every,
            "overhead": save / epoch,
            "record_overhead": record * (steps_per_epoch // progress.record_every) / epoch}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="torch")
    p.add_argument("--algorithm", default="magnitude")
    p.add_argument("--steps", type=int, default=20, help="training steps timed (the epoch is extrapolated)")
    p.add_argument("--saves", type=int, default=5)
    p.add_argument("--write", action="store_true", help="write the section of benchmarks/RESULTS.md")
    p.add_argument("--synthetic", action="store_true",
                   help="random uint8 images of CIFAR-10's shape and count (where the data set is not at hand; "
                        "step times do not depend on pixel values)")
    p.add_argument("--note", default="", help="a remark on the machine for RESULTS.md (e.g. shared, loaded)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    args = p.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.synthetic:
        import numpy as np
        rng = np.random.default_rng(0)
        ds = data.Dataset("cifar10", rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8),
                          rng.integers(0, 10, 50000), np.zeros((1, 32, 32, 3), np.uint8), np.zeros(1, np.int64),
                          num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    else:
        ds = data.load_dataset("cifar10", test_limit=1)
    rows = []
    for name in [b for b in args.backends.split(",") if b]:
        r = measure(name, args.algorithm, ds, args.steps, args.saves)
        rows.append(r)
        print(f"{name} {r['algorithm']}: step {r['step'] * 1e3:.1f} ms -> epoch {r['epoch']:.1f} s (extrapolated from "
              f"{r['steps']} steps x {r['steps_per_epoch']}); checkpoint write {r['save'] * 1e3:.1f} ms "
              f"(max {r['save_max'] * 1e3:.1f}), {r['size'] / 1e6:.2f} MB, read {r['load'] * 1e3:.1f} ms; "
              f"overhead {r['overhead']:.3%} of an epoch; trajectory record {r['record'] * 1e3:.2f} ms "
              f"x {r['records_per_epoch']} = {r['record_overhead']:.3%}")
    if args.write:
        import torch
        where = (f"Machine: {machine()}, torch using {torch.get_num_threads()} threads; {args.note}. " if args.note
                 else f"Machine: {machine()}, torch using {torch.get_num_threads()} threads. ")
        images = ("synthetic CIFAR-10-shaped images (50,000 random uint8 32x32x3; the data set was not on this "
                  "machine, and step time does not depend on pixel values)" if args.synthetic
                  else "the full CIFAR-10 training set (50,000 images)")
        lines = [where + f"ResNet-20 on {images}, "
                 f"batch {BATCH}, {rows[0]['steps_per_epoch']} steps an epoch, pruning phase with "
                 f"{args.algorithm} bound (masks set), CPU. Epoch time **extrapolated** from the median of "
                 f"{args.steps} measured steps x steps per epoch. Checkpoint: the job's own write (model, "
                 "optimizer, algorithm state, random states; temporary file, fsync, rename), median of "
                 f"{args.saves}; the job writes one per epoch by default. "
                 f"Command: `python benchmarks/checkpoint_overhead.py {' '.join(argv if argv is not None else sys.argv[1:])}`.",
                 "",
                 "| backend | step | epoch (extrapolated) | checkpoint write | size | read back | overhead per epoch "
                 "| trajectory records per epoch |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            lines.append(f"| {r['backend']} | {r['step'] * 1e3:.0f} ms | {r['epoch']:.0f} s | {r['save'] * 1e3:.0f} ms "
                         f"(max {r['save_max'] * 1e3:.0f}) | {r['size'] / 1e6:.2f} MB | {r['load'] * 1e3:.0f} ms | "
                         f"{r['overhead']:.3%} | {r['records_per_epoch']} x {r['record'] * 1e3:.1f} ms = "
                         f"{r['record_overhead']:.3%} |")
        lines += ["", "Target: checkpoint overhead <= 2 % of an epoch."]
        write_section(f"Checkpoint overhead, ResNet-20 on CIFAR-10, {args.algorithm}, CPU", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
