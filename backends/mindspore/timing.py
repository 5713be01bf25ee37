"""Inference latency of model handles (MindSpore): what compaction buys, measured.

``time_inference(handles, batch)`` runs each model's forward compiled with ``mindspore.jit``
(PyNative pays about a millisecond per op, which would hide the arithmetic) in eval mode on one
random batch of its input shape and returns, per model, the median and fastest of its timed
batches, each waited for (``asnumpy``), timed side by side by
:func:`prunekit.app.timing.time_handles` (at least one warm-up call: the first compiles).
``deploy`` is accepted for the PyTorch backend's signature; MindSpore's is always the compiled
graph ("jit"). Train flags are restored.
"""
from __future__ import annotations

from typing import List, Sequence

import mindspore as ms
import numpy as np

from prunekit.app.timing import time_handles

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
    rng = np.random.default_rng(0)

    def prepare(handle):
        x = ms.Tensor(rng.standard_normal((int(batch),) + tuple(handle.input_shape)).astype(np.float32))
        run = _forward(handle.model)
        return lambda: run(x).asnumpy()  # waits for the result

    return time_handles(handles, batch, "jit", prepare, max(1, int(warmup)), repeats, rounds)
