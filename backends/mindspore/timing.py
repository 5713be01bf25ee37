"""Inference latency of a model handle (MindSpore): what compaction buys, measured.

``inference_latency(handle, batch)`` runs the forward compiled with ``mindspore.jit`` (PyNative
pays about a millisecond per op, which would hide the arithmetic) in eval mode on a random batch
of the handle's input shape and returns the median and fastest of the timed batches, each waited
for (``asnumpy``), after untimed warm-up ones (the first compiles). ``deploy`` is accepted for the
same signature as the PyTorch backend; MindSpore's is always the compiled graph ("jit"). The
model's train flag is restored.
"""
from __future__ import annotations

import statistics
import time

import mindspore as ms
import numpy as np

DEPLOYS = ("eager", "frozen", "jit")


def inference_latency(handle, batch: int, warmup: int = 2, repeats: int = 5, deploy: str = "jit") -> dict:
    if deploy not in DEPLOYS:
        raise ValueError(f"unknown deploy {deploy!r}; expected one of {', '.join(DEPLOYS)}")
    model = handle.model
    was_training = bool(model.training)
    model.set_train(False)
    x = ms.Tensor(np.random.default_rng(0).standard_normal((int(batch),) + tuple(handle.input_shape))
                  .astype(np.float32))

    @ms.jit
    def forward(inp):
        return model(inp)

    try:
        for _ in range(max(1, int(warmup))):
            forward(x).asnumpy()
        times = []
        for _ in range(int(repeats)):
            t0 = time.perf_counter()
            forward(x).asnumpy()
            times.append(time.perf_counter() - t0)
    finally:
        model.set_train(was_training)
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "batch": int(batch),
            "deploy": "jit", "repeats": int(repeats)}
