"""Accuracy of RPG, TRP and gradual magnitude pruning on real CIFAR-10, side by side.

Runs the main job (``prunekit.app.job.run``) for each configuration with the same data, model,
seed, epochs and learning-rate schedule, and records the final-epoch test accuracy at the final
sparsity (never the best epoch), with the measured sparsity / FLOPs from the report.

The published protocols (TRP: 164 epochs; RPG: 300 epochs, ResNet-32 ×2) need a GPU; on a
CPU this runs a **shortened schedule**, stated in the results. Comparisons are only meaningful
between rows of one run.

    python benchmarks/cifar_accuracy.py [--epochs 4] [--train-limit all] [--backend torch] [--write]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prunekit.app.job import RunConfig, run  # noqa: E402
from results import machine, write_section  # noqa: E402

CONFIGS = [
    ("dense baseline (magnitude at 0 %)", dict(algorithm="magnitude", sparsity=0.0)),
    ("TRP channel, e = 0.9", dict(algorithm="trp", sparsity=0.0, params={"scheme": "channel"})),
    ("magnitude 95 %", dict(algorithm="magnitude", sparsity=0.95, schedule="exponential")),
    ("RPG 95 %", dict(algorithm="rpg", sparsity=0.95)),
    ("magnitude 99 %", dict(algorithm="magnitude", sparsity=0.99, schedule="exponential")),
    ("RPG 99 %", dict(algorithm="rpg", sparsity=0.99)),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="torch")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-limit", default="all")
    p.add_argument("--only", default=None, help="comma-separated substrings of configuration names")
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    limit = None if args.train_limit == "all" else int(args.train_limit)
    rows = []
    for label, extra in CONFIGS:
        if args.only and not any(s in label for s in args.only.split(",")):
            continue
        cfg = RunConfig(backend=args.backend, model=args.model, dataset="cifar10", dense_epochs=0,
                        prune_epochs=args.epochs, train_limit=limit, test_limit=None, lr=0.1,
                        end_fraction=0.8, out=os.path.join("runs", "bench", label.split()[0].lower()),
                        progress=False, overwrite=True, **extra)
        t0 = time.perf_counter()
        report = run(cfg, echo=lambda *a: None)
        seconds = time.perf_counter() - t0
        acc = report["accuracy"]
        final = acc.get("after_decomposition", acc["after_pruning"])
        t = report["totals"]
        dec = report.get("decomposition")
        rows.append((label, final, t["prunable_sparsity"], dec["flops_reduction"] if dec else t["dense_macs"] / max(1, t["effective_macs"]),
                     dec["params_after"] if dec else t["total_nonzero"], seconds))
        print(f"{label:<36} final-epoch accuracy {final:.2%}  measured sparsity {t['prunable_sparsity']:.2%}  "
              f"FLOPs reduction {rows[-1][3]:.2f}x  params {rows[-1][4]:,}  ({seconds:.0f} s)", flush=True)
    if args.write:
        write(rows, args, limit)


def write(rows, args, limit):
    lines = [f"Machine: {machine()}, backend {args.backend}, no GPU. **Shortened schedule**: {args.epochs} epochs from "
             f"scratch on {'all 50,000' if limit is None else f'{limit:,}'} training images (SGD 0.1 cosine, batch 128, "
             "wd 5e-4, pruning over the first 80 %), test on all 10,000. The published protocols are 164 (TRP) and "
             "300 (RPG) epochs; these figures compare methods at equal epochs only. Final-epoch accuracy at the final "
             "sparsity. TRP row: accuracy of the decomposed model (singular values >= 0.05), FLOPs reduction measured "
             "from its layers. Command: `python benchmarks/cifar_accuracy.py --write` with the settings above.", "",
             "| configuration | final-epoch test accuracy | measured sparsity | FLOPs reduction | non-zero params | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {l} | {a:.2%} | {s:.2%} | {f:.2f}× | {n:,} | {sec:.0f} |" for l, a, s, f, n, sec in rows]
    write_section(f"CIFAR-10 accuracy, {args.model}, shortened schedule", lines)

if __name__ == "__main__":
    main()
