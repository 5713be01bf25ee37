"""sDprun measured on real CIFAR-10: structured sparsity reached and accuracy right after pruning.

Starts from the trained ResNet-20 in ``tests/data/resnet20_cifar10.npz`` (or from scratch with
``--scratch``), runs sDprun (gRDA with group soft-thresholding over filters) for ``--steps``
steps on a CIFAR-10 subset, then measures, on the test subset:

* the zero-filter fraction of the managed layers along the run;
* test accuracy of the trained start, of the thresholded net, and of the channel-pruned net
  (removed channels' BN shifts and biases zeroed: what ``finish()`` leaves);
* ``backend.compact`` with ``channel_keep``: its outputs against the channel-pruned net's, and
  parameters and MACs before and after.

    python benchmarks/sdprun_cifar.py --backend torch --steps 300 --c 0.02 --mu 0.51
"""
import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from prunekit.app import data  # noqa: E402
from prunekit.algorithms.sdprun import SDPrunConfig, SDPrunPruner  # noqa: E402
from prunekit.contract.backend import get_backend  # noqa: E402
from prunekit.decisions.flops import count_model  # noqa: E402


def accuracy(handle, ds, limit=None):
    hits, n = 0, 0
    for x, y in data.batches(ds.x_test, ds.y_test, 250, seed=0, epoch=0, shuffle=False, drop_last=False,
                             mean=ds.mean, std=ds.std):
        hits += int((handle.predict(x).argmax(1) == y).sum())
        n += len(y)
    return hits / max(1, n)


def counts(handle):
    c = count_model(handle.layers, handle.weights_numpy(), handle.state_numpy())
    return c["total_params"], c["dense_macs"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="torch")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--scratch", action="store_true", help="start from the shared init, not the trained weights")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--c", type=float, default=5e-4)
    p.add_argument("--mu", type=float, default=0.51)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--coupling", default="filter")
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write the measurements as JSON here")
    a = p.parse_args()

    backend = get_backend(a.backend)
    if a.backend == "torch":
        import torch
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    ds = data.load_dataset("cifar10", train_limit=a.train_limit, test_limit=a.test_limit)
    h = backend.model_handle(a.model, 10, 3, 32, seed=0, device=a.device)
    if not a.scratch:
        h.load_state_numpy(dict(np.load(os.path.join(ROOT, "tests", "data", "resnet20_cifar10.npz"))))
    acc_start = accuracy(h, ds)
    params0, macs0 = counts(h)
    algo = SDPrunPruner(SDPrunConfig(c=a.c, mu=a.mu, lr=a.lr, coupling=a.coupling))
    ov = algo.trainer_overrides()
    tr = backend.Trainer(h, algo, ov["optimizer"], ov["lr"], ov["momentum"], ov["weight_decay"],
                         total_steps=a.steps, lr_schedule=ov["lr_schedule"], device=a.device)
    curve, step, epoch, t0 = [], 0, 0, time.perf_counter()
    while step < a.steps:
        for x, y in data.batches(ds.x_train, ds.y_train, a.batch, seed=0, epoch=epoch, augment=True,
                                 mean=ds.mean, std=ds.std):
            tr.train_step(x, y)
            step += 1
            if step % max(1, a.steps // 10) == 0 or step == a.steps:
                curve.append((step, round(algo.current_sparsity, 4), round(algo.lam, 6)))
            if step == a.steps:
                break
        epoch += 1
    seconds = time.perf_counter() - t0
    acc_thresholded = accuracy(h, ds)
    tr.finish()
    acc_pruned = accuracy(h, ds)
    small = backend.compact(h, algo.channel_keep)
    x = next(iter(data.batches(ds.x_test, ds.y_test, 64, seed=0, epoch=0, shuffle=False, mean=ds.mean, std=ds.std)))[0]
    diff = float(np.abs(small.predict(x) - h.predict(x)).max())
    acc_compact = accuracy(small, ds)
    params1, macs1 = counts(small)
    s = algo.summary
    result = {
        "backend": a.backend, "model": a.model, "start": "scratch" if a.scratch else "trained (tests/data)",
        "steps": a.steps, "batch": a.batch, "c": a.c, "mu": a.mu, "lr": a.lr, "coupling": a.coupling,
        "train_images": len(ds.y_train), "test_images": len(ds.y_test), "seconds": round(seconds, 1),
        "lambda_final": s["lambda"], "sparsity_curve (step, zero-filter weight fraction, lambda)": curve,
        "zero_filters": f"{s['zero_filters']}/{s['filters']}", "filter_sparsity": round(s["filter_sparsity"], 4),
        "channels_removed": f"{s['channels_removed']}/{s['channels']}", "channel_sparsity": round(s["channel_sparsity"], 4),
        "acc_start": acc_start, "acc_thresholded": acc_thresholded, "acc_channel_pruned": acc_pruned,
        "acc_compacted": acc_compact, "compact_vs_masked_max_abs_logit_diff": diff,
        "params": [params0, params1], "macs": [macs0, macs1],
    }
    print(json.dumps(result, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
