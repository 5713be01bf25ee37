"""Step time of 2-process data-parallel training against one process, same global batch.

ResNet-20 on a CIFAR-10 subset with gradual magnitude pruning (a mask update every 4 steps, so
the guard's mask broadcasts are in the figure), global batch 128: one process trains on the
whole batch; ``torchrun`` (PyTorch DDP, gloo) or ``msrun`` (MindSpore, DistributedGradReducer)
start 2 processes that train on 64 images each. The first ``--warmup`` steps (compilation,
allocator) are not timed; each timed step ends with the loss read on the host, so asynchronous
work is inside the step.

    python benchmarks/data_parallel.py [--backends torch,mindspore] [--steps 12] [--write]

Each configuration runs in its own processes (``--inner`` is the inner mode).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from benchmarks.results import machine, write_section  # noqa: E402

VENV_BIN = os.path.dirname(sys.executable)


def worker(args) -> None:
    from prunekit.app import data as datasets
    from prunekit.algorithms import make_algorithm
    from prunekit.contract.backend import get_backend
    from prunekit.app.distributed import start_distributed, trainer_class

    backend = get_backend(args.backend)
    comm = start_distributed(backend)
    total = args.warmup + args.steps
    ds = datasets.load_dataset("cifar10", train_limit=args.batch * total, test_limit=10)
    handle = backend.model_handle("resnet20", 10, 3, 32, seed=0)
    algorithm = make_algorithm("magnitude", sparsity=0.9, frequency=4, end_fraction=1.0)
    trainer = trainer_class(backend, comm)(handle, algorithm, "sgd", lr=0.05, total_steps=total)
    batches = list(datasets.batches(ds.x_train, ds.y_train, args.batch, seed=0, augment=True,
                                    mean=ds.mean, std=ds.std))[:total]
    times, cpu = [], []
    for i, (x, y) in enumerate(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = float(trainer.train_step(x, y))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    trainer.finish()
    if comm is not None:  # CPU seconds of all processes together, per step
        cpu = [float(c) for c in comm.allreduce_sum(np.array(cpu, np.float64))]
    if comm is None or comm.is_main:
        guard = getattr(trainer.session, "guard", None)
        with open(args.out, "w") as f:
            json.dump({"times": times, "cpu": cpu, "loss": loss, "processes": 1 if comm is None else comm.size,
                       "threads": os.environ.get("OMP_NUM_THREADS", "default"),
                       "mask_syncs": guard.mask_syncs if guard else 0}, f)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(backend: str, processes: int, args, threads=None) -> dict:
    me = os.path.abspath(__file__)
    out = tempfile.mktemp(suffix=".json")
    inner = [me, "--inner", "--backend", backend, "--out", out, "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--batch", str(args.batch)]
    if processes == 1:
        cmd = [sys.executable] + inner
    elif backend == "torch":
        cmd = [os.path.join(VENV_BIN, "torchrun"), f"--nproc_per_node={processes}", f"--master_port={_port()}"] + inner
    else:
        cmd = [os.path.join(VENV_BIN, "msrun"), f"--worker_num={processes}", f"--local_worker_num={processes}",
               f"--master_port={_port()}", "--join=True", f"--log_dir={tempfile.mkdtemp()}"] + inner
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    result["wall"] = wall
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="torch,mindspore")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=128, help="global batch (default %(default)s)")
    p.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)  # not --worker: msrun would take it
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner:
        worker(args)
        return 0
    rows = ["| backend | processes × threads | batch per process | median ms/step | × one process | "
            "CPU ms/step, all processes | × one process | wall s (launch to exit) | mask broadcasts |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for backend in [b for b in args.backends.split(",") if b]:
        # PyTorch: one process on 1 thread and on its default threads; torchrun sets 1 thread a process
        configs = [(1, 1), (1, None), (2, None)] if backend == "torch" else [(1, None), (2, None)]
        results = [measure(backend, n, args, threads) for n, threads in configs]
        base, base_cpu = float(np.median(results[0]["times"])), float(np.median(results[0]["cpu"]))
        for r in results:
            med, med_cpu = float(np.median(r["times"])), float(np.median(r["cpu"]))
            threads = "1" if r["processes"] > 1 and backend == "torch" else r["threads"]
            rows.append(f"| {backend} | {r['processes']} × {threads} | {args.batch // r['processes']} "
                        f"| {med * 1e3:.1f} | {med / base:.2f} | {med_cpu * 1e3:.1f} | {med_cpu / base_cpu:.2f} "
                        f"| {r['wall']:.1f} | {r['mask_syncs']} |")
        print("\n".join(rows[-len(results):]), flush=True)
    lines = [f"Machine: {machine()}; the 2 cores were shared with other sessions' jobs while this ran, so "
             "figures move between runs. Command: `python benchmarks/data_parallel.py --write`. ResNet-20, "
             f"CIFAR-10, global batch {args.batch}, gradual magnitude pruning (mask update every 4 steps), "
             f"{args.steps} timed steps after {args.warmup} warm-up steps; data-parallel processes take "
             "1/2 of each global batch. Ratios are against the first row of each backend. CPU ms/step is "
             "process CPU time (all threads) summed over the processes: the work a step costs, which "
             "the load from other jobs changes less than it changes wall time. torchrun sets "
             "OMP_NUM_THREADS=1 in each process; MindSpore keeps its own thread pool.", "", *rows]
    if args.write:
        write_section("Data-parallel training: 2 processes against 1, same global batch, CPU", lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
