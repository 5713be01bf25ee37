"""Realised speed-up of channel-compacted models against their dense originals.

For each backend and model, the channel baseline (``prunekit.algorithms.channel``) chooses the
channels that keep 50 % and 25 % of the dense MACs, once freely (``--round-to 1``) and once in
multiples of 8 per group (``round_to=8``); ``backend.compact`` builds the narrower dense models. Inference latency (eval mode, no gradient) of dense and compacted models is the median
of ``--repeats`` timed batches after warm-up; MindSpore runs the forward compiled with
``mindspore.jit`` (PyNative pays about a millisecond per op, which would hide the arithmetic).
Printed: the measured MACs ratio (from the compacted layers) beside the latency ratio and
their quotient ("efficiency": realised speed-up / MACs speed-up; the target is >= 0.8).

    python benchmarks/compaction_speed.py                       # CPU, batch 64, both backends
    python benchmarks/compaction_speed.py --backends torch --device cuda --batch 256
    python benchmarks/compaction_speed.py --write               # also record in RESULTS.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prunekit.algorithms.channel import choose_channels  # noqa: E402
from prunekit.backend import get_backend  # noqa: E402
from prunekit.channels import find_channel_groups  # noqa: E402
from prunekit.errors import ModelError  # noqa: E402
from prunekit.flops import count_model  # noqa: E402


def _torch_timer(handle, batch: int, device: str):
    import torch

    model = handle.model.to(device).eval()
    x = torch.randn((batch,) + tuple(handle.input_shape), device=device)

    def run():
        with torch.no_grad():
            model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return run


def _mindspore_timer(handle, batch: int, device: str):
    import mindspore as ms

    model = handle.model
    model.set_train(False)
    x = ms.Tensor(np.random.default_rng(0).standard_normal((batch,) + tuple(handle.input_shape)).astype(np.float32))

    @ms.jit
    def forward(inp):
        return model(inp)

    def run():
        forward(x).asnumpy()  # waits for the result
    return run


def latency(timer, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        timer()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        timer()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(backend_name: str, model: str, ratios, batch: int, device: str, warmup: int, repeats: int,
            rounds=(1,)):
    backend = get_backend(backend_name)
    handle = backend.model_handle(model, 10, 3, 32, seed=0, device=device if backend_name == "torch" else None)
    groups = find_channel_groups(handle)
    weights = handle.weights_numpy()
    dense_macs = count_model(handle.layers, weights, handle.state_numpy())["dense_macs"]
    make = _torch_timer if backend_name == "torch" else _mindspore_timer
    dense_t = latency(make(handle, batch, device), warmup, repeats)
    rows = []
    for r, k in [(r, k) for r in ratios for k in rounds]:
        try:
            keep = choose_channels(handle.layers, groups, weights, r, "flops", round_to=k)
        except ModelError as e:  # e.g. 25 % of the MACs with whole units of 8 channels
            print(f"({backend_name} {model} target {r} round_to {k}: {e})")
            continue
        small = backend.compact(handle, keep)
        macs = count_model(small.layers, small.weights_numpy(), small.state_numpy())["dense_macs"]
        t = latency(make(small, batch, device), warmup, repeats)
        flops_speedup = dense_macs / macs
        speedup = dense_t / t
        rows.append({"backend": backend_name, "model": model, "target": r, "round_to": k, "macs_ratio": macs / dense_macs,
                     "dense_ms": dense_t * 1e3, "compact_ms": t * 1e3, "latency_ratio": t / dense_t,
                     "flops_speedup": flops_speedup, "speedup": speedup, "efficiency": speedup / flops_speedup})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="torch,mindspore")
    p.add_argument("--models", default="resnet20,resnet56,mobilenetv2")
    p.add_argument("--ratios", default="0.5,0.25", help="fractions of the dense MACs kept")
    p.add_argument("--round-to", default="1,8", help="channel multiples the baseline keeps (one row each)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (PyTorch)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (0: its default)")
    p.add_argument("--write", action="store_true", help="record the figures in benchmarks/RESULTS.md")
    a = p.parse_args(argv)
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    ratios = [float(r) for r in a.ratios.split(",")]
    rows = []
    rounds = [int(k) for k in a.round_to.split(",")]
    header = (f"{'backend':10s} {'model':12s} {'target':>6s} {'round':>5s} {'MACs kept':>9s} {'dense ms':>9s} {'compact ms':>10s} "
              f"{'latency':>8s} {'MACs x':>7s} {'real x':>7s} {'eff.':>5s}")
    print(header)
    for b in a.backends.split(","):
        if b == "mindspore" and a.device != "cpu":
            print(f"(mindspore skipped: --device {a.device} is PyTorch only here)")
            continue
        for m in a.models.split(","):
            for row in measure(b, m, ratios, a.batch, a.device, a.warmup, a.repeats, rounds):
                rows.append(row)
                print(f"{row['backend']:10s} {row['model']:12s} {row['target']:6.2f} {row['round_to']:5d} {row['macs_ratio']:9.3f} "
                      f"{row['dense_ms']:9.1f} {row['compact_ms']:10.1f} {row['latency_ratio']:8.3f} "
                      f"{row['flops_speedup']:7.2f} {row['speedup']:7.2f} {row['efficiency']:5.2f}", flush=True)
    if a.write:
        from benchmarks.results import machine, write_section
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        lines = [f"Machine: {machine()}; device {a.device}, batch {a.batch}, median of {a.repeats} batches after "
                 f"{a.warmup} warm-up; load average {load:.1f} at the end of the run.",
                 "Channels chosen by the channel baseline (group L1, FLOPs target); MACs measured on the compacted "
                 "layers. efficiency = realised speed-up / MACs speed-up (target >= 0.8).", "",
                 "| backend | model | channels kept in multiples of | MACs kept | dense ms | compacted ms | "
                 "latency ratio | MACs speed-up | realised speed-up | efficiency |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['backend']} | {r['model']} | {r['round_to']} | {r['macs_ratio']:.3f} | {r['dense_ms']:.1f} | "
                         f"{r['compact_ms']:.1f} | {r['latency_ratio']:.3f} | {r['flops_speedup']:.2f} | "
                         f"{r['speedup']:.2f} | {r['efficiency']:.2f} |")
        write_section(f"Compaction speed-up ({a.device}, batch {a.batch})", lines)
    return rows


if __name__ == "__main__":
    main()
