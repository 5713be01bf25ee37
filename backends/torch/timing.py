"""Inference latency of model handles on their device (PyTorch): what compaction buys, measured.

``time_inference(handles, batch)`` runs each model in eval mode without gradients on one random
batch of its input shape and returns, per model, the median and fastest of its timed batches
(CUDA synchronised), timed side by side by :func:`prunekit.app.timing.time_side_by_side`. How the
models run (``deploy``):

* ``"eager"``: the ``nn.Module`` itself;
* ``"frozen"``: traced, frozen and ``optimize_for_inference``-d TorchScript (BatchNorm folded into
  the convolutions, oneDNN layouts and fused ReLUs on a CPU);
* ``"compiled"``: ``torch.compile`` (Inductor) with ``freezing`` (BatchNorm folded, weights
  pre-packed, additions and activations fused into generated kernels), each model compiled for
  its own static shapes (no automatic dynamic shapes, a cache large enough for all of them).

The models are left as they were (eval/train mode restored).
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from prunekit.app.timing import time_side_by_side

DEPLOYS = ("eager", "frozen", "compiled")


def _runner(model, x, deploy: str):
    if deploy == "frozen":
        return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x)))
    if deploy == "compiled":
        return torch.compile(model, options={"freezing": True})
    return model


def time_inference(handles: Sequence, batch: int, warmup: int = 2, repeats: int = 5, deploy: str = "eager",
                   rounds: int = 1) -> List[dict]:
    if deploy not in DEPLOYS:
        raise ValueError(f"unknown deploy {deploy!r}; expected one of {', '.join(DEPLOYS)}")
    models = [h.model for h in handles]
    modes = [m.training for m in models]
    params = [next(m.parameters()) for m in models]
    inputs = [torch.randn((int(batch),) + tuple(h.input_shape), device=p.device, dtype=p.dtype)
              for h, p in zip(handles, params)]
    cuda = any(p.device.type == "cuda" for p in params)

    def call(run, x):
        def once():
            run(x)
            if cuda:
                torch.cuda.synchronize()
        return once
    try:
        for m in models:
            m.eval()
        with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False,
                                                         cache_size_limit=max(8, 2 * len(models))):
            runners = [_runner(m, x, deploy) for m, x in zip(models, inputs)]
            stats = time_side_by_side([call(r, x) for r, x in zip(runners, inputs)], warmup, repeats, rounds)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return [{**t, "batch": int(batch), "deploy": deploy} for t in stats]

