"""Inference latency of model handles on their device (PyTorch): what compaction buys, measured.

``time_inference(handles, batch)`` runs each model in eval mode without gradients on one random
batch of its input shape and returns, per model, the median and fastest of its timed batches
(CUDA synchronised), timed side by side by :func:`prunekit.app.timing.time_handles`. How the
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

from contextlib import contextmanager
from typing import List, Sequence

import torch

from prunekit.app.timing import time_handles

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
    cuda = any(next(h.model.parameters()).device.type == "cuda" for h in handles)

    def prepare(handle):
        p = next(handle.model.parameters())
        x = torch.randn((int(batch),) + tuple(handle.input_shape), device=p.device, dtype=p.dtype)
        run = _runner(handle.model, x, deploy)

        def once():
            run(x)
            if cuda:
                torch.cuda.synchronize()
        return once

    @contextmanager
    def inference():
        with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=False,
                                                         cache_size_limit=max(8, 2 * len(handles))):
            yield

    return time_handles(handles, batch, deploy, prepare, warmup, repeats, rounds, inference)
