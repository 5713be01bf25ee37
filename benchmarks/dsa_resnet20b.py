"""Issue #14: DSA at a 50 % FLOPs budget on the projection-shortcut ResNet-20 (``resnet20b``),
beside the option-A ``resnet20`` with the same settings: where the search puts the channels.

Each run is a ``prunekit.app.job.run`` (DSA's own defaults but the budget), on a short CPU
schedule (the images, epochs and batch below; the published search runs for hundreds of epochs on
GPUs): the figures show the allocation mechanism, not accuracy. Per stage it prints the kept
channels of the stage's residual stream (a prunable group only in ``resnet20b``: the stem or the
projection conv and every block's second conv produce it) and of the blocks' internal groups,
then the MACs of the compacted model (measured on its layers by the job) and their fraction.

    python benchmarks/dsa_resnet20b.py --threads 2 --write
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.results import machine, write_section  # noqa: E402
from prunekit.app.job import RunConfig, run  # noqa: E402

#: the group that is each stage's residual stream (named after its first producer)
STREAMS = {1: "conv1", 2: "layer2.0.conv2", 3: "layer3.0.conv2"}


def stage_of(group: str) -> int:
    return 1 if group == "conv1" else int(group[5])


def allocation(report: dict) -> dict:
    """Per stage: (kept, size) of the residual stream and of the block-internal groups."""
    groups = report["compaction"]["groups"]
    out = {}
    for s in (1, 2, 3):
        stream = groups.get(STREAMS[s])
        inner = [g for k, g in groups.items() if stage_of(k) == s and k != STREAMS[s]]
        out[s] = {"stream": (stream["kept"], stream["size"]) if stream else None,
                  "inner": (sum(g["kept"] for g in inner), sum(g["size"] for g in inner))}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet20b,resnet20")
    p.add_argument("--backend", default="torch")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--train-limit", type=int, default=4000)
    p.add_argument("--test-limit", type=int, default=1000)
    p.add_argument("--dense-epochs", type=int, default=1)
    p.add_argument("--prune-epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="runs/dsa-resnet20b")
    p.add_argument("--write", action="store_true", help="record the figures in benchmarks/RESULTS.md")
    a = p.parse_args(argv)
    if a.threads and a.backend == "torch":
        import torch
        torch.set_num_threads(a.threads)
    rows = []
    for model in a.models.split(","):
        cfg = RunConfig(backend=a.backend, model=model, algorithm="dsa", params={"budget": a.budget},
                        dense_epochs=a.dense_epochs, prune_epochs=a.prune_epochs, batch_size=a.batch,
                        train_limit=a.train_limit, test_limit=a.test_limit, out=os.path.join(a.out, model),
                        progress=False, latency_batch=0)
        t0 = time.time()
        report = run(cfg)
        seconds = time.time() - t0
        comp = report["compaction"]
        steps = report["run"]["steps"]
        alloc = allocation(report)
        rows.append((model, alloc, comp, steps, seconds, report))
        print(f"{model}: MACs {comp['macs_before']} -> {comp['macs_after']} ({comp['macs_kept_fraction']:.3f}), "
              f"{steps} steps, {seconds:.0f} s", flush=True)
        for s, v in alloc.items():
            st = f"{v['stream'][0]}/{v['stream'][1]}" if v["stream"] else "not prunable"
            print(f"  stage {s}: stream {st}, block-internal {v['inner'][0]}/{v['inner'][1]}")
    if a.write:
        cmd = "python benchmarks/dsa_resnet20b.py " + " ".join(argv if argv is not None else sys.argv[1:])
        lines = [f"**SHORT RUN** on CPU (a demonstration of the allocation, not the published protocol): "
                 f"{a.dense_epochs} dense + {a.prune_epochs} pruning epochs on {a.train_limit:,} CIFAR-10 training "
                 f"images (DSA takes its α steps on 10 % of them), batch {a.batch}, DSA's defaults but budget "
                 f"{a.budget} (search over the first 60 % of the pruning steps). Machine: {machine()}, backend "
                 f"{a.backend}, shared with other work. Command: `{cmd.strip()}`. Kept channels per stage from the "
                 f"job's compaction (kept / size); MACs measured on the compacted model's layers.", "",
                 "| model | training steps | stage 1 stream | stage 2 stream | stage 3 stream | stage 1 blocks | "
                 "stage 2 blocks | stage 3 blocks | MACs dense | MACs compacted | fraction | test accuracy |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for model, alloc, comp, steps, _, report in rows:
            cells = [(f"{alloc[s]['stream'][0]} / {alloc[s]['stream'][1]}" if alloc[s]["stream"] else "not prunable")
                     for s in (1, 2, 3)] + [f"{alloc[s]['inner'][0]} / {alloc[s]['inner'][1]}" for s in (1, 2, 3)]
            acc = report["accuracy"].get("after_compaction")
            acc_s = f"{acc:.2%}" if isinstance(acc, float) else str(acc)
            lines.append(f"| {model} | {steps} | " + " | ".join(cells) + f" | {comp['macs_before']:,} | "
                         f"{comp['macs_after']:,} | {comp['macs_kept_fraction']:.3f} | {acc_s} |")
        write_section("DSA at budget 0.5 on the projection-shortcut ResNet-20 (#14)", lines)
    return rows


if __name__ == "__main__":
    main()
