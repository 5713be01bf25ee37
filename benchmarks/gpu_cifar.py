"""Full-length CIFAR-10 training with pruning on one CUDA GPU (PyTorch backend).

The CPU benchmark (``cifar_accuracy.py``) runs shortened schedules; this one runs the published
protocols where a GPU is lent. The data set lives on the GPU as uint8; each batch is normalised
and augmented there (random crop with 4-pixel zero padding, horizontal flip), drawn from a
seeded per-epoch permutation. The model runs in bf16 autocast, channels-last, optionally under
``torch.compile``; the pruning algorithm runs through the same :class:`PruningSession` as
everywhere else (its rank and mask work in float32 on the weights).

The run checkpoints every epoch (model, optimizer, step, the algorithm's state) and resumes from
the checkpoint if one is there, so a long protocol can span several calls. At the end it reports
the final-epoch test accuracy at the final sparsity (never the best epoch), the sparsity measured
from the weights, and for TRP the accuracy, parameters and FLOPs of the decomposed model.

    python benchmarks/gpu_cifar.py --algorithm trp --epochs 164 --lr-schedule step --wd 1e-4 --out runs/gpu/trp
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import prunekit.backends.torch as pk  # noqa: E402
from prunekit.app import data as datasets  # noqa: E402
from prunekit.algorithms import make_algorithm  # noqa: E402
from prunekit.algorithms.magnitude import MagnitudeConfig  # noqa: E402
from prunekit.algorithms.rpg import RPGConfig  # noqa: E402
from prunekit.algorithms.trp import TRPConfig  # noqa: E402
from prunekit.algorithms.trp import plan_decompositions  # noqa: E402
from prunekit.decisions.flops import count_model  # noqa: E402
from prunekit.decisions.schedules import LearningRateSchedule  # noqa: E402


def gpu_batches(x_u8, y, mean, std, batch, seed, epoch, augment, generator_device):
    """Normalised (and augmented) batches of a uint8 NCHW GPU tensor, in a seeded order."""
    n = x_u8.shape[0]
    g = torch.Generator(device=generator_device).manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, device=generator_device, generator=g) if augment else torch.arange(n, device=x_u8.device)
    steps = n // batch if augment else math.ceil(n / batch)
    for i in range(steps):
        idx = order[i * batch:(i + 1) * batch]
        xb = x_u8[idx].float().div_(255.0)
        xb = (xb - mean) / std
        if augment:
            b = xb.shape[0]
            padded = F.pad(xb, (4, 4, 4, 4))
            dx = torch.randint(0, 9, (b,), device=xb.device, generator=g)
            dy = torch.randint(0, 9, (b,), device=xb.device, generator=g)
            ar = torch.arange(32, device=xb.device)
            rows = (dy[:, None] + ar[None, :])[:, None, :, None].expand(b, 3, 32, 32)
            cols = (dx[:, None] + ar[None, :])[:, None, None, :].expand(b, 3, 32, 32)
            xb = padded[torch.arange(b, device=xb.device)[:, None, None, None],
                        torch.arange(3, device=xb.device)[None, :, None, None], rows, cols]
            flip = torch.rand(b, device=xb.device, generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
        yield xb.contiguous(memory_format=torch.channels_last), y[idx]


def config_for(algorithm: str, args):
    if algorithm == "magnitude":
        return MagnitudeConfig(sparsity=args.sparsity, schedule="exponential" if args.sparsity > 0 else "oneshot",
                               frequency=args.frequency, end_fraction=args.end_fraction)
    rank = {"spectrum": args.spectrum}
    if args.spectrum == "tracked":
        rank.update(refresh_every=args.refresh_every, solve_lag=args.solve_lag)
    if algorithm == "rpg":
        return RPGConfig(sparsity=args.sparsity, frequency=args.frequency, end_fraction=args.end_fraction, **rank)
    if algorithm == "trp":
        return TRPConfig(scheme=args.scheme, **rank)
    raise SystemExit(f"unknown algorithm {algorithm!r}")


def evaluate(model, x_u8, y, mean, std):
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast(x_u8.device.type, dtype=torch.bfloat16):
        for xb, yb in gpu_batches(x_u8, y, mean, std, 1000, 0, 0, False, x_u8.device):
            correct += int((model(xb).argmax(1) == yb).sum())
    model.train()
    return correct / int(y.shape[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algorithm", default="magnitude")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--sparsity", type=float, default=0.0)
    p.add_argument("--scheme", default="channel")
    p.add_argument("--epochs", type=int, default=164)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--lr-schedule", default="cosine", choices=("cosine", "step"))
    p.add_argument("--frequency", type=int, default=100)
    p.add_argument("--end-fraction", type=float, default=0.8)
    p.add_argument("--data-root", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--spectrum", default="tracked")
    p.add_argument("--refresh-every", type=int, default=10)
    p.add_argument("--solve-lag", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--train-limit", type=int, default=None, help="smoke tests only")
    p.add_argument("--out", required=True)
    p.add_argument("--stop-after", type=float, default=None, help="seconds; checkpoint and exit after this")
    args = p.parse_args(argv)
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    ds = datasets.load_dataset("cifar10", root=args.data_root, cache_dir=args.cache_dir, train_limit=args.train_limit,
                               test_limit=args.train_limit)
    x_train = torch.from_numpy(ds.x_train).permute(0, 3, 1, 2).contiguous().to(device)
    y_train = torch.from_numpy(ds.y_train).to(device)
    x_test = torch.from_numpy(ds.x_test).permute(0, 3, 1, 2).contiguous().to(device)
    y_test = torch.from_numpy(ds.y_test).to(device)
    mean = torch.as_tensor(ds.mean, device=device).view(1, 3, 1, 1)
    std = torch.as_tensor(ds.std, device=device).view(1, 3, 1, 1)
    steps_per_epoch = x_train.shape[0] // args.batch
    total = args.epochs * steps_per_epoch

    handle = pk.model_handle(args.model, 10, 3, 32, seed=args.seed, device=args.device)
    model = handle.model.to(memory_format=torch.channels_last)
    algorithm = make_algorithm(args.algorithm, config=config_for(args.algorithm, args))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    session = pk.PruningSession(handle, algorithm, optimizer, total)
    milestones = (int(total * 0.5), int(total * 0.75))  # epochs 82 and 123 of 164
    lr_at = LearningRateSchedule(args.lr, total, args.lr_schedule, milestones).lr_at
    forward = torch.compile(model) if args.compile else model

    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    log = []
    if os.path.exists(ckpt_path):
        # weights_only: tensors, plain data and the NumPy arrays of the algorithm's state, nothing callable
        numpy_types = [np.core.multiarray._reconstruct, np.ndarray, np.dtype] + [
            getattr(np.dtypes, n) for n in ("Float32DType", "Float64DType", "Int64DType", "Int32DType", "BoolDType",
                                            "UInt8DType")]
        with torch.serialization.safe_globals(numpy_types):
            ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        session.step = ck["step"]
        algorithm.load_state_dict(ck["algorithm"])
        algorithm.masks_changed = False
        log = ck["log"]
        print(f"resumed at step {session.step} (epoch {session.step // steps_per_epoch})", flush=True)

    def save():
        tmp = ckpt_path + ".tmp"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": session.step,
                    "algorithm": algorithm.state_dict(), "log": log}, tmp)
        os.replace(tmp, ckpt_path)

    epoch0 = session.step // steps_per_epoch
    for epoch in range(epoch0, args.epochs):
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        for xb, yb in gpu_batches(x_train, y_train, mean, std, args.batch, args.seed, epoch, True, device):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(session.step)
            session.before_step()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(forward(xb), yb)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            session.after_backward()
            if session.should_step():
                optimizer.step()
            session.after_optimizer_step()
            loss_sum += loss.detach()
        entry = {"epoch": epoch + 1, "loss": float(loss_sum) / steps_per_epoch, "seconds": round(time.time() - t0, 2),
                 "sparsity": float(getattr(algorithm, "current_sparsity", 0.0))}
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            entry["test_accuracy"] = evaluate(forward, x_test, y_test, mean, std)
        log.append(entry)
        print(json.dumps(entry), flush=True)
        save()
        if args.stop_after and time.time() - t_start > args.stop_after and epoch + 1 < args.epochs:
            print("stopping early to resume later", flush=True)
            return
    session.finish()
    final = evaluate(model, x_test, y_test, mean, std)
    weights = handle.weights_numpy()
    counts = count_model(handle.layers, weights, handle.state_numpy())
    result = {"algorithm": args.algorithm, "model": args.model, "epochs": args.epochs, "target_sparsity": args.sparsity,
              "final_epoch_test_accuracy": final, "measured_sparsity": counts["prunable_sparsity"],
              "nonzero_params": counts["total_nonzero"], "params": counts["total_params"],
              "dense_macs": counts["dense_macs"], "effective_macs": counts["effective_macs"],
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__, "compile": args.compile,
              "lr_schedule": args.lr_schedule, "wd": args.wd,
              "spectrum": args.spectrum, "refresh_every": args.refresh_every, "solve_lag": args.solve_lag, "log": log}
    if args.algorithm == "trp":
        decs = plan_decompositions(handle, algorithm.config.scheme, threshold=0.05,
                                   layers=[l.name for l in algorithm.layers])
        new = pk.apply_decompositions(handle, decs)
        new.model.to(device)
        after = count_model(new.layers, new.weights_numpy(), new.state_numpy())
        result["decomposed"] = {"test_accuracy": evaluate(new.model, x_test, y_test, mean, std),
                                "params_before": counts["total_params"], "params_after": after["total_params"],
                                "macs_before": counts["dense_macs"], "macs_after": after["dense_macs"],
                                "flops_reduction": counts["dense_macs"] / max(1, after["dense_macs"]),
                                "ranks": {d.layer: d.rank for d in decs}}
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "log"}), flush=True)


if __name__ == "__main__":
    main()
