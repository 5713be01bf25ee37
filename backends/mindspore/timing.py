"""Inference latency of model handles (MindSpore): what compaction buys, measured.

``time_inference(handles, batch)`` runs each model's forward compiled with ``mindspore.jit``
(PyNative pays about a millisecond per op, which would hide the arithmetic) in eval mode on one
random batch of its input shape and returns, per model, the median and fastest of its timed
batches, each waited for (``asnumpy``). The models are timed side by side: after ``warmup``
untimed calls each (the first compiles), ``rounds`` rounds each time ``repeats`` calls of every
model in turn, so a slow spell of a shared machine falls on all of them alike. ``deploy`` is
accepted for the PyTorch backend's signature; MindSpore's is always the compiled graph ("jit").
``inference_latency(handle, batch)`` is the same for one model. Train flags are restored.
"""
from __future__ import annotations

import statistics
import time
from typing import List, Sequence

import mindspore as ms
import numpy as np

DEPLOYS = ("eager", "frozen", "compiled", "jit")


def _forward(model):
    @ms.jit
    def forward(inp):
        return model(inp)
    return forward


def time_inference(handles: Sequence, batch: int, warmup: int = 2, repeats: int = 5, deploy: str = "jit",
                   rounds: int = 1) -> List[dict]:
    if deploy not in DEPLOYS:
        raise ValueError(f"unknown deploy {deploy!r}; expected one of {', '.join(DEPLOYS)}")
    models = [h.model for h in handles]
    modes = [bool(m.training) for m in models]
    rng = np.random.default_rng(0)
    inputs = [ms.Tensor(rng.standard_normal((int(batch),) + tuple(h.input_shape)).astype(np.float32))
              for h in handles]
    times: List[List[float]] = [[] for _ in handles]
    try:
        for m in models:
            m.set_train(False)
        runners = [_forward(m) for m in models]
        for run, x in zip(runners, inputs):
            for _ in range(max(1, int(warmup))):
                run(x).asnumpy()
        for _ in range(int(rounds)):
            for i, (run, x) in enumerate(zip(runners, inputs)):
                for _ in range(int(repeats)):
                    t0 = time.perf_counter()
                    run(x).asnumpy()
                    times[i].append(time.perf_counter() - t0)
    finally:
        for m, mode in zip(models, modes):
            m.set_train(mode)
    return [{"median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3, "batch": int(batch), "deploy": "jit",
             "timed": len(t)} for t in times]


def inference_latency(handle, batch: int, warmup: int = 2, repeats: int = 5, deploy: str = "jit") -> dict:
    return time_inference([handle], batch, warmup, repeats, deploy)[0]
