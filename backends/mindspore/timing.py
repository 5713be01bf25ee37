"""Inference latency of model handles (MindSpore): what compaction buys, measured.

``time_inference(handles, batch)`` runs each model's forward compiled with ``mindspore.jit``
(PyNative pays about a millisecond per op, which would hide the arithmetic) in eval mode on one
random batch of its input shape and returns, per model, the median and fastest of its timed
batches, each waited for (``asnumpy``), timed side by side by
:func:`prunekit.app.timing.time_side_by_side` (at least one warm-up call: the first compiles).
``deploy`` is accepted for the PyTorch backend's signature; MindSpore's is always the compiled
graph ("jit"). Train flags are restored.
"""
from __future__ import annotations

from typing import List, Sequence

import mindspore as ms
import numpy as np

from prunekit.app.timing import time_side_by_side

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

    def call(run, x):
        return lambda: run(x).asnumpy()  # waits for the result
    try:
        for m in models:
            m.set_train(False)
        runners = [_forward(m) for m in models]
        stats = time_side_by_side([call(r, x) for r, x in zip(runners, inputs)], max(1, int(warmup)), repeats,
                                  rounds)
    finally:
        for m, mode in zip(models, modes):
            m.set_train(mode)
    return [{**t, "batch": int(batch), "deploy": "jit"} for t in stats]

