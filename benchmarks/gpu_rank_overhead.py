"""Step-time cost of RPG's rank term and TRP's projection on a GPU: torchvision ResNet-50.

The issue's GPU setting: torchvision ResNet-50, batch 256, bf16 autocast, channels-last, one
CUDA GPU. Inputs are random 224x224 tensors held on the GPU (a speed measurement: no ImageNet
here, and the step's cost does not depend on pixel values). Trainers: plain SGD, RPG with the
rank term every step (``rank_every = 1``, fixed masks inside the window so the ratio isolates the
rank machinery) and TRP acting every step (``m = 1``), each with the given spectrum methods;
``exact`` (batched full SVD) is the full-SVD figure beside them; ``tracked@N/L`` solves every N
steps on the host, installed L steps later (prunekit/decisions/spectrum_tracking.py). Steps alternate between the
trainers in blocks; medians of per-step times (CUDA-synchronised) are compared.

    python benchmarks/gpu_rank_overhead.py [--model resnet50] [--methods tracked,gram,exact] [--tracked 10:8,20:16]
                                           [--batch 256] [--image 224] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

from prunekit.backends.torch import PruningSession, TorchModelHandle, model_handle  # noqa: E402
from prunekit.algorithms.rpg import RPGConfig, RPGPruner  # noqa: E402
from prunekit.algorithms.trp import TRPConfig, TRPPruner  # noqa: E402


class GpuTrainer:
    """One ResNet-50 with its own optimizer and pruning session; a bf16 autocast step."""

    def __init__(self, algorithm, seed: int, total: int, device: str, image: int, model_name: str = "resnet50"):
        torch.manual_seed(seed)
        if model_name == "resnet50":
            model = torchvision.models.resnet50(num_classes=1000).to(device).to(memory_format=torch.channels_last)
            self.handle = TorchModelHandle(model, (3, image, image), "resnet50")
        else:  # a prunekit reference model (CIFAR ResNets, VGG, MobileNetV2)
            self.handle = model_handle(model_name, 10, 3, image, seed=seed, device=device)
            model = self.handle.model.to(memory_format=torch.channels_last)
        self.model = model
        self.device_type = torch.device(device).type
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.session = PruningSession(self.handle, algorithm, self.optimizer, total)

    def step(self, x, y):
        self.model.train()
        self.session.before_step()
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        self.session.after_backward()
        if self.session.should_step():
            self.optimizer.step()
        self.session.after_optimizer_step()
        return loss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50", help="torchvision resnet50, or a prunekit reference model")
    p.add_argument("--methods", default="tracked,gram,exact")
    p.add_argument("--tracked", default="10:8", help="refresh_every:solve_lag settings of the tracked method")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.backends.cudnn.benchmark = True
    total = 100_000
    methods = [m for m in args.methods.split(",") if m]
    algorithms = {"plain": lambda: None}
    variants = []
    for m in methods:
        if m == "tracked":
            for setting in args.tracked.split(","):
                refresh, lag = (int(v) for v in setting.split(":"))
                variants.append((f"tracked@{refresh}/{lag}", m, {"refresh_every": refresh, "solve_lag": lag}))
        else:
            variants.append((m, m, {}))
    for label, m, extra in variants:
        algorithms[f"rpg/{label}"] = lambda m=m, x=extra: RPGPruner(RPGConfig(sparsity=0.9, rank_every=1, spectrum=m,
                                                                              frequency=total // 2, **x))
        algorithms[f"trp/{label}"] = lambda m=m, x=extra: TRPPruner(TRPConfig(every=1, spectrum=m, **x))
    trainers = {k: GpuTrainer(make(), 0, total, device, args.image, args.model) for k, make in algorithms.items()}
    classes = 1000 if args.model == "resnet50" else 10
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, 3, args.image, args.image, device=device, generator=g).to(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (args.batch,), device=device, generator=g)
    for t in trainers.values():  # warm-up: cudnn autotuning, first spectra
        for _ in range(3):
            t.step(x, y)
    sync()
    times = {k: [] for k in trainers}
    names = list(trainers)
    for r in range(args.rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            for _ in range(args.block):
                sync()
                t0 = time.perf_counter()
                trainers[k].step(x, y)
                sync()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    rows = [(k, med[k], med[k] / med["plain"]) for k in names]
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    for k, v, r in rows:
        print(f"{args.model} {k:<22} {v:8.1f} ms/step  {r:.3f}x plain", flush=True)
    print(f"device: {gpu}, torch {torch.__version__}, {args.model}, batch {args.batch}, image {args.image}, bf16 autocast")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": gpu, "torch": torch.__version__, "model": args.model, "batch": args.batch, "image": args.image,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
