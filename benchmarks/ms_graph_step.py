"""Step time of pruning in MindSpore's GRAPH_MODE train cell against plain GRAPH_MODE training and
against the same pruned cell in PyNative (issue #12).

ResNet-20 (prunekit's twin), batch 128, synthetic CIFAR-shaped data, SGD with momentum. Each
trainer is what ``Model.train`` runs per step with :class:`PruningCallback`: the session's
``before_step``, one call of the train cell, ``after_optimizer_step``; "plain" is
``nn.TrainOneStepCell``. All trainers live in one process and are timed interleaved in blocks
(the machine is shared; the order rotates every block), medians compared. Recompilation: every graph compile MindSpore starts
during the timed steps is counted per trainer (its compile path calls
``mindspore.graph.api._check_recompile``, the function that warns "compiled again"; a cache hit
does not), and MindSpore's log is scanned for "compiled again".

    python benchmarks/ms_graph_step.py [--steps 10] [--block 2] [--algorithms magnitude,rpg,trp]
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10, help="timed steps per trainer")
    p.add_argument("--block", type=int, default=2, help="steps per trainer per interleaved block")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--algorithms", default="magnitude,rpg,trp")
    args = p.parse_args(argv)

    log = tempfile.NamedTemporaryFile(prefix="ms_graph_step_", suffix=".log", delete=False)
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)  # MindSpore's C++ log ("compiled again") goes to fd 2
    try:
        rows = run(args)
    finally:
        os.dup2(saved, 2)
    text = open(log.name, errors="replace").read()
    again = [l for l in text.splitlines() if "compiled again" in l]
    base = rows[("plain", "graph")]
    compiles = rows.pop("compiles")
    print(f"| trainer | mode | ms/step | x plain GRAPH_MODE | graph compiles in timed steps |\n| --- | --- | --- | --- | --- |")
    for (name, mode), t in rows.items():
        print(f"| {name} | {mode} | {1000 * t:.1f} | {t / base:.3f} | {compiles[(name, mode)]} |")
    print(f"'compiled again' lines in MindSpore's log: {len(again)}")
    for l in again[:5]:
        print("  ", l[:200])


def run(args):
    import mindspore as ms
    import mindspore.nn as nn

    import prunekit.backends.mindspore as bm
    from prunekit.algorithms import make_algorithm

    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32))
    y = ms.Tensor(rng.integers(0, 10, args.batch).astype(np.int32))
    total = 1000  # schedules as in a real run (mask updates every 100 steps, rank term every step)
    settings = {"magnitude": dict(sparsity=0.9), "rpg": dict(sparsity=0.9), "trp": dict()}

    def trainer(name, mode):
        handle = bm.model_handle("resnet20", seed=0)
        net = handle.model
        net.set_train(True)
        opt = nn.SGD(net.trainable_params(), learning_rate=0.05, momentum=0.9, weight_decay=5e-4)
        loss_net = nn.WithLossCell(net, nn.CrossEntropyLoss())
        if name == "plain":
            cell = nn.TrainOneStepCell(loss_net, opt)
            return mode, lambda: cell(x, y)
        ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
        session = bm.PruningSession(handle, make_algorithm(name, **settings[name]), opt, total)
        cell = bm.PruningTrainOneStepCell(loss_net, opt, session)

        def step():
            session.before_step()
            loss = cell(x, y)
            session.after_optimizer_step()
            return loss
        return mode, step

    import mindspore.graph.api as graph_api

    compiling = [0]
    original = graph_api._check_recompile

    def counting(*a, **k):
        compiling[0] += 1
        return original(*a, **k)
    graph_api._check_recompile = counting

    names = [a for a in args.algorithms.split(",") if a]
    configs = [("plain", "graph")] + [(n, "graph") for n in names] + [(n, "pynative") for n in names]
    runners = {c: trainer(*c) for c in configs}
    times = {c: [] for c in configs}
    compiles = {c: 0 for c in configs}

    def go(c, n, record):
        mode, step = runners[c]
        ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
        for _ in range(n):
            before = compiling[0]
            t0 = time.perf_counter()
            step().asnumpy()  # synchronise
            if record:
                times[c].append(time.perf_counter() - t0)
                compiles[c] += compiling[0] - before

    for c in configs:
        go(c, args.warmup, False)
    for r in range(max(1, args.steps // args.block)):
        for c in configs[r % len(configs):] + configs[:r % len(configs)]:  # rotated: no trainer always first
            go(c, args.block, True)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    graph_api._check_recompile = original
    out = {c: float(np.median(times[c])) for c in configs}
    out["compiles"] = compiles
    return out


if __name__ == "__main__":
    main()
