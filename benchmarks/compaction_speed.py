"""Realised speed-up of channel-compacted models against their dense originals.

For each backend and model, the channel baseline (``prunekit.algorithms.channel``) chooses the
channels that keep 50 % and 25 % of the dense MACs: with its global L1 ranking
(``allocation=global``) and with the same fraction of every group (``allocation=uniform``), each
with channel counts free (``round_to=1``) and in multiples of 8 and 16 per group;
``backend.compact`` builds the narrower dense models. Inference latency of dense and compacted
models, each deployed the same way, is the median of ``--repeats`` timed batches after warm-up:

* PyTorch ``--deploy compiled`` (default): ``torch.compile`` (Inductor) with ``freezing`` --
  BatchNorm folded, weights pre-packed, additions and ReLUs fused; ``--deploy frozen``:
  TorchScript ``trace`` + ``freeze`` + ``optimize_for_inference``; ``--deploy eager``: the
  ``nn.Module`` in eval mode, no gradient (``backends/torch/timing.py``);
* MindSpore: the forward compiled with ``mindspore.jit`` (PyNative pays about a millisecond
  per op, which would hide the arithmetic).

Printed: the measured MACs ratio (from the compacted layers) beside the latency ratio and their
quotient ("efficiency": realised speed-up / MACs speed-up; the target is >= 0.8). Models named
``tv:<name>`` are torchvision's (PyTorch only) at ``--tv-image`` pixels. Where both a CIFAR
ResNet and its projection-shortcut twin (``resnet20`` and ``resnet20b``) are measured, a second
table puts their efficiencies side by side per plan (issue #14: the option-A twins can only
prune block-internal channels, the ``b`` models also their residual streams).

    python benchmarks/compaction_speed.py                       # CPU, batch 64, both backends
    python benchmarks/compaction_speed.py --backends torch --models tv:resnet50 --round-to 16
    python benchmarks/compaction_speed.py --backends torch --device cuda --batch 256
    python benchmarks/compaction_speed.py --write               # also record in RESULTS.md
    python benchmarks/compaction_speed.py --models resnet20,resnet20b,resnet56,resnet56b --round-to 1 \
        --title "Compaction speed-up of the projection-shortcut ResNets (#14)" --write
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prunekit.algorithms.channel import choose_channels  # noqa: E402
from prunekit.contract.backend import get_backend  # noqa: E402
from prunekit.decisions.channel_groups import find_channel_groups  # noqa: E402
from prunekit.errors import ModelError  # noqa: E402
from prunekit.decisions.flops import count_model  # noqa: E402


def _handle(backend, backend_name: str, model: str, device: str, tv_image: int):
    if model.startswith("tv:"):
        if backend_name != "torch":
            return None
        import torch
        import torchvision
        from prunekit.backends.torch.layers import TorchModelHandle

        torch.manual_seed(0)
        name = model[3:]
        net = getattr(torchvision.models, name)(num_classes=1000).to(device).eval()
        return TorchModelHandle(net, (3, tv_image, tv_image), name)
    return backend.model_handle(model, 10, 3, 32, seed=0, device=device if backend_name == "torch" else None)


def measure(backend_name: str, model: str, ratios, batch: int, device: str, warmup: int, repeats: int,
            rounds=(1,), allocations=("global",), deploy: str = "compiled", tv_image: int = 224, timing_rounds: int = 3):
    """One model: every plan's compacted model timed side by side with the dense one
    (``backend.time_inference``: ``timing_rounds`` rounds of ``repeats`` batches each, in turn)."""
    backend = get_backend(backend_name)
    handle = _handle(backend, backend_name, model, device, tv_image)
    if handle is None:
        print(f"({backend_name} {model}: torchvision models are PyTorch only)")
        return []
    groups = find_channel_groups(handle)
    weights = handle.weights_numpy()
    dense_macs = count_model(handle.layers, weights, handle.state_numpy())["dense_macs"]
    plans = []
    for r, a, k in [(r, a, k) for r in ratios for a in allocations for k in rounds]:
        try:
            keep = choose_channels(handle.layers, groups, weights, r, "flops", round_to=k, allocation=a)
        except ModelError as e:  # e.g. 25 % of the MACs with whole units of 8 channels
            print(f"({backend_name} {model} target {r} {a} round_to {k}: {e})")
            continue
        small = backend.compact(handle, keep)
        macs = count_model(small.layers, small.weights_numpy(), small.state_numpy())["dense_macs"]
        plans.append((r, a, k, small, macs))
    timed = backend.time_inference([handle] + [p[3] for p in plans], batch, warmup, repeats,
                                   deploy if backend_name == "torch" else "jit", rounds=timing_rounds)
    dense_t, dense_min = timed[0]["median_ms"], timed[0]["min_ms"]
    rows = []
    for (r, a, k, _, macs), t in zip(plans, timed[1:]):
        flops_speedup = dense_macs / macs
        speedup = dense_t / t["median_ms"]
        rows.append({"backend": backend_name, "model": model, "target": r, "allocation": a, "round_to": k,
                     "macs_ratio": macs / dense_macs, "dense_ms": dense_t, "compact_ms": t["median_ms"],
                     "dense_min_ms": dense_min, "compact_min_ms": t["min_ms"], "latency_ratio": t["median_ms"] / dense_t,
                     "flops_speedup": flops_speedup, "speedup": speedup, "efficiency": speedup / flops_speedup,
                     "efficiency_min": (dense_min / t["min_ms"]) / flops_speedup})
    return rows


def twin_pairs(rows):
    """(option-A row, projection-shortcut row) for every plan measured on both ``<m>`` and ``<m>b``."""
    index = {(r["backend"], r["model"], r["target"], r["allocation"], r["round_to"]): r for r in rows}
    return [(index[(b, m[:-1], t, a, k)], r) for (b, m, t, a, k), r in index.items()
            if m.startswith("resnet") and m.endswith("b") and (b, m[:-1], t, a, k) in index]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="torch,mindspore")
    p.add_argument("--models", default="resnet20,resnet56,vgg16,mobilenetv2,tv:resnet18,tv:resnet50")
    p.add_argument("--ratios", default="0.5,0.25", help="fractions of the dense MACs kept")
    p.add_argument("--allocations", default="global,uniform", help="the channel baseline's allocation(s)")
    p.add_argument("--round-to", default="1,8,16", help="channel multiples the baseline keeps (one row each)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (PyTorch)")
    p.add_argument("--deploy", default="compiled", choices=("compiled", "frozen", "eager"),
                   help="how PyTorch runs the models (backends/torch/timing.py)")
    p.add_argument("--tv-image", type=int, default=224, help="input size of the tv:<name> models")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=4, help="timed batches of each model per round")
    p.add_argument("--rounds", type=int, default=4, help="rounds of timing, every model in turn")
    p.add_argument("--tv-repeats", type=int, default=1, help="timed batches per round for the tv:<name> models")
    p.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (0: its default)")
    p.add_argument("--ms-threads", type=int, default=0, help="MindSpore runtime threads (0: its default); on a "
                                                             "loaded machine 1 avoids waiting on preempted workers")
    p.add_argument("--write", action="store_true", help="record the figures in benchmarks/RESULTS.md")
    p.add_argument("--title", default=None, help="RESULTS.md section title (default: 'Compaction speed-up "
                                                   "(<device>, batch <n>)')")
    a = p.parse_args(argv)
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    if a.ms_threads and "mindspore" in a.backends:
        import mindspore
        mindspore.set_context(runtime_num_threads=a.ms_threads)
    ratios = [float(r) for r in a.ratios.split(",")]
    rounds = [int(k) for k in a.round_to.split(",")]
    allocations = a.allocations.split(",")
    rows = []
    header = (f"{'backend':10s} {'model':13s} {'target':>6s} {'alloc.':>7s} {'round':>5s} {'MACs kept':>9s} "
              f"{'dense ms':>9s} {'compact ms':>10s} {'latency':>8s} {'MACs x':>7s} {'real x':>7s} {'eff.':>5s} "
              f"{'eff.min':>7s}")
    print(header)
    for b in a.backends.split(","):
        if b == "mindspore" and a.device != "cpu":
            print(f"(mindspore skipped: --device {a.device} is PyTorch only here)")
            continue
        for m in a.models.split(","):
            repeats = a.tv_repeats if m.startswith("tv:") else a.repeats
            warmup = min(a.warmup, 2) if m.startswith("tv:") else a.warmup
            for row in measure(b, m, ratios, a.batch, a.device, warmup, repeats, rounds, allocations, a.deploy,
                               a.tv_image, a.rounds):
                rows.append(row)
                print(f"{row['backend']:10s} {row['model']:13s} {row['target']:6.2f} {row['allocation']:>7s} "
                      f"{row['round_to']:5d} {row['macs_ratio']:9.3f} {row['dense_ms']:9.1f} {row['compact_ms']:10.1f} "
                      f"{row['latency_ratio']:8.3f} {row['flops_speedup']:7.2f} {row['speedup']:7.2f} "
                      f"{row['efficiency']:5.2f} {row['efficiency_min']:7.2f}", flush=True)
    pairs = twin_pairs(rows)
    if pairs:
        print("\noption-A twin vs projection shortcuts (same plan): MACs kept, efficiency")
        for x, y in pairs:
            print(f"{x['backend']:10s} {x['model']:9s} {x['target']:5.2f} {x['allocation']:>7s} {x['round_to']:3d}  "
                  f"{x['macs_ratio']:.3f} {x['efficiency']:.2f}  |  {y['model']:10s} {y['macs_ratio']:.3f} "
                  f"{y['efficiency']:.2f}")
    if a.write:
        from benchmarks.results import machine, write_section
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        threads = a.threads or "default"
        threads = f"{threads}, MindSpore threads {a.ms_threads or 'default'}"
        cmd = "python benchmarks/compaction_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
        lines = [f"Machine: {machine()}; device {a.device}, batch {a.batch}, PyTorch threads {threads}, PyTorch "
                 f"deploy `{a.deploy}`, MindSpore `mindspore.jit`; each model's compacted versions timed side by side "
                 f"with it: {a.warmup} warm-up batches each, then {a.rounds} rounds of {a.repeats} batches of every "
                 f"model in turn ({a.tv_repeats} per round for the torchvision models, at {a.tv_image} px); median "
                 f"(and min) of those; load average "
                 f"{load:.1f} at the end of the run. Command: `{cmd.strip()}`.",
                 "Channels chosen by the channel baseline (group L1; `global`: one ranking over all groups, "
                 "`uniform`: the same fraction of every group) for a MACs target; MACs measured on the compacted "
                 "layers, random-initialised weights (seed 0). eff. = realised speed-up / MACs speed-up "
                 "(target >= 0.8); eff. (min) uses the fastest batch of each instead of the median.", "",
                 "| backend | model | target | allocation | multiple of | MACs kept | dense ms | compacted ms | "
                 "MACs speed-up | realised speed-up | eff. | eff. (min) |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['backend']} | {r['model']} | {r['target']:.2f} | {r['allocation']} | {r['round_to']} | "
                         f"{r['macs_ratio']:.3f} | {r['dense_ms']:.1f} | {r['compact_ms']:.1f} | "
                         f"{r['flops_speedup']:.2f} | {r['speedup']:.2f} | {r['efficiency']:.2f} | "
                         f"{r['efficiency_min']:.2f} |")
        if pairs:
            lines += ["", "Side by side, the same plan on the option-A twin and on the projection-shortcut model "
                      "(eff. = realised / MACs speed-up, median; both models timed in the same run):", "",
                      "| backend | target | allocation | multiple of | model | MACs kept | eff. | model | MACs kept | "
                      "eff. |", "|---|---|---|---|---|---|---|---|---|---|"]
            for x, y in pairs:
                lines.append(f"| {x['backend']} | {x['target']:.2f} | {x['allocation']} | {x['round_to']} | "
                             f"{x['model']} | {x['macs_ratio']:.3f} | {x['efficiency']:.2f} | {y['model']} | "
                             f"{y['macs_ratio']:.3f} | {y['efficiency']:.2f} |")
        write_section(a.title or f"Compaction speed-up ({a.device}, batch {a.batch})", lines)
    return rows


if __name__ == "__main__":
    main()
