"""Inference latency of a model handle on its device (PyTorch): what compaction buys, measured.

``inference_latency(handle, batch)`` runs the model in eval mode without gradients on a random
batch of the handle's input shape and returns the median and fastest of the timed batches (after
untimed warm-up ones; CUDA synchronised). ``deploy="frozen"`` first traces, freezes and
``optimize_for_inference``-s the model (BatchNorm folded into the convolutions, oneDNN layouts on
a CPU), as one deploys it; ``"eager"`` times the ``nn.Module`` itself. The model is left as it
was (eval/train mode restored).
"""
from __future__ import annotations

import statistics
import time

import torch

DEPLOYS = ("eager", "frozen")


def inference_latency(handle, batch: int, warmup: int = 2, repeats: int = 5, deploy: str = "eager") -> dict:
    if deploy not in DEPLOYS:
        raise ValueError(f"unknown deploy {deploy!r}; expected one of {', '.join(DEPLOYS)}")
    model = handle.model
    param = next(model.parameters())
    x = torch.randn((int(batch),) + tuple(handle.input_shape), device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run = model
            if deploy == "frozen":
                run = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x)))
            sync = torch.cuda.synchronize if param.device.type == "cuda" else (lambda: None)
            for _ in range(int(warmup)):
                run(x)
            sync()
            times = []
            for _ in range(int(repeats)):
                t0 = time.perf_counter()
                run(x)
                sync()
                times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "batch": int(batch),
            "deploy": deploy, "repeats": int(repeats)}
