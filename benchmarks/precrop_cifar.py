"""PreCropping against its unstructured PAI baseline on CIFAR-10 (same scores, same weight count).

Runs ``prunekit run --algorithm precrop`` for each configuration (structured: the narrow dense
model; unstructured: the PAI masks held fixed) with the same settings, and writes one section
of RESULTS.md from the runs' reports (every figure measured by the job). ``--reuse`` takes the
reports of runs already made in ``--out/<name>`` with exactly these settings instead of running.

    python benchmarks/precrop_cifar.py --epochs 4 --train-limit 10000 --write
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.results import machine, write_section  # noqa: E402
from prunekit.app.job import RunConfig, run  # noqa: E402

CONFIGS = [("channels", {"structure": "channels"}), ("unstructured", {"structure": "unstructured"})]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="torch")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--score", default="synflow")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--out", default="runs/precrop-bench")
    p.add_argument("--reuse", action="store_true", help="read the reports already in --out/<name>")
    p.add_argument("--write", action="store_true", help="write the section of benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    rows = []
    for name, params in CONFIGS:
        out = os.path.join(args.out, name)
        if args.reuse:
            with open(os.path.join(out, "report.json")) as f:
                report = json.load(f)
        else:
            cfg = RunConfig(backend=args.backend, model=args.model, algorithm="precrop", sparsity=args.sparsity,
                            dense_epochs=0, prune_epochs=args.epochs, train_limit=args.train_limit,
                            test_limit=args.test_limit, out=out, progress=False, overwrite=True,
                            params={"score": args.score, **params})
            report = run(cfg, echo=lambda *a: None)
        init, totals = report["at_initialization"], report["totals"]
        rows.append(f"| PreCropping {args.score}, {name} | {report['accuracy']['after_pruning']:.2%} | "
                    f"{totals['total_nonzero']:,} of {totals['total_params']:,} | "
                    f"{totals['prunable_nonzero']:,} | {totals['effective_macs'] / 1e6:.2f}M | "
                    f"{init['macs_before'] / max(1, totals['effective_macs']):.2f}× | {report['run']['train_seconds']} |")
        print(rows[-1])
    lines = [f"Machine: {machine()}, backend {args.backend}, no GPU; shared with other jobs while measured "
             "(seconds are not comparable across sections). "
             f"{args.model}, PAI score `{args.score}` at initialization, sparsity {args.sparsity} of the "
             f"scored weights; {args.epochs} epochs from scratch on {args.train_limit:,} training images, test on "
             f"{args.test_limit:,}. *channels*: the narrow dense model PreCropping builds (channel ratios per group, "
             "budget-matched); *unstructured*: the same PAI masks held fixed (the baseline at the same weight "
             "count). Parameters, MACs and accuracy are measured by the job on the trained model. Command: "
             f"`python benchmarks/precrop_cifar.py --epochs {args.epochs} --train-limit {args.train_limit} --write`"
             + (" (here `--reuse`: the reports of `prunekit run --algorithm precrop --set score="
                f"{args.score} --set structure=<name> --sparsity {args.sparsity} --prune-epochs {args.epochs} "
                f"--train-limit {args.train_limit} --test-limit {args.test_limit}` runs)." if args.reuse else "."),
             "",
             "| configuration | test accuracy | non-zero params (all) | non-zero conv/linear weights | "
             "effective MACs | FLOPs reduction | train seconds |",
             "| --- | --- | --- | --- | --- | --- | --- |"] + rows
    if args.write:
        write_section(f"PreCropping vs unstructured PAI, {args.model}, CIFAR-10, shortened schedule", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
