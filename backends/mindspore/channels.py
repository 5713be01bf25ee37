"""MindSpore side of channel-group discovery (:mod:`prunekit.decisions.channel_groups`): BatchNorm discovery
and the channel probe (PyNative; the probe switches to PyNative for its duration if the context
is in graph mode).

The probe runs one eval-mode forward in which every Conv2d/Dense is replaced by a function
returning zeros plus the perturbation rows asked for that layer (the instance's ``construct`` is
overridden for the pass and restored after, so the layer's own computation is skipped; a
forward hook returning a new output also works in MindSpore 2.10 but pays for the convolution),
every BatchNorm by the identity, and records,
for the input of every Conv2d/Dense/BatchNorm and for the model's output, which channels (or
features) of each row differ from row 0.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import mindspore as ms

from prunekit.decisions.channel_groups import run_probe

from .layers import PRUNABLE, _BN, probe_forward


def norm_layers(handle) -> List[Tuple[str, int]]:
    """``(name, channels)`` of every BatchNorm, in definition order."""
    return [(n, int(c.num_features)) for n, c in handle.model.cells_and_names() if isinstance(c, _BN)]


def _changed(x) -> np.ndarray:
    a = x.asnumpy()
    d = a != a[:1]
    if d.ndim > 2:
        d = d.reshape(d.shape[0], d.shape[1], -1).any(axis=2)
    return d


def _zeros_with_rows(shape, like, codes_at: Optional[Tuple[int, np.ndarray]]):
    out = np.zeros(tuple(int(s) for s in shape), np.float32)
    if codes_at is not None:
        start, codes = codes_at
        c = codes.reshape(codes.shape + (1,) * (out.ndim - 2))
        out[start:start + codes.shape[0]] += c
    return ms.Tensor(out, like.dtype if like is not None else ms.float32)


def probe_channels(handle, perturb: Dict[Optional[str], Tuple[int, np.ndarray]], rows: int) -> Dict[str, np.ndarray]:
    """One probe forward (:func:`~prunekit.decisions.channel_groups.run_probe`)."""
    return run_probe(handle, perturb, rows, handle.model.cells_and_names(), PRUNABLE, _BN, "construct", _changed,
                     _zeros_with_rows, lambda x: probe_forward(handle.model, x))
