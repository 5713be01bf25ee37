"""MindSpore side of channel-group discovery (:mod:`prunekit.decisions.channel_groups`): BatchNorm discovery
and the channel probe (PyNative; the probe switches to PyNative for its duration if the context
is in graph mode).

The probe runs one eval-mode forward in which every Conv2d/Dense is replaced by a function
returning a constant (:data:`~prunekit.decisions.channel_groups.PROBE_BASE`) plus the perturbation rows asked for that layer (the instance's ``construct`` is
overridden for the pass and restored after, so the layer's own computation is skipped; a
forward hook returning a new output also works in MindSpore 2.10 but pays for the convolution),
every norm layer (BatchNorm, GroupNorm, LayerNorm) by the identity, and records,
for the input of every Conv2d/Dense/norm and for the model's output, which channels (or
features) of each row differ from row 0.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import mindspore as ms
import mindspore.nn as nn

from prunekit.decisions.channel_groups import NormLayer, run_probe

from .layers import PRUNABLE, _BN, probe_forward

#: norm cells channel groups slice with their channels (LayerNorm and GroupNorm only where exact)
NORMS = _BN + (nn.GroupNorm, nn.LayerNorm)


def _norm(name: str, c) -> NormLayer:
    if isinstance(c, nn.GroupNorm):
        n, g = int(c.num_channels), int(c.num_groups)
        return NormLayer(name, n, 0 if g == 1 else n // g, "GroupNorm")
    if isinstance(c, nn.LayerNorm):
        return NormLayer(name, int(tuple(c.normalized_shape)[-1]), 0, type(c).__name__)
    return NormLayer(name, int(c.num_features), 1, type(c).__name__)


def norm_layers(handle) -> List[Tuple[str, int]]:
    """``(name, channels)`` of every norm cell, in definition order, as
    :class:`~prunekit.decisions.channel_groups.NormLayer` (which channels it normalises together)."""
    return [_norm(n, c) for n, c in handle.model.cells_and_names() if isinstance(c, NORMS)]


def _layout_error(name: str, c, x) -> Optional[str]:
    """Why a norm's input is not channels-first (None when it is)."""
    if isinstance(c, nn.LayerNorm) and len(x.shape) > 2:
        return (f"normalises the trailing axes {tuple(c.normalized_shape)} of a tensor of shape {tuple(x.shape)} "
                "(channels-last features or tokens)")
    return None


def _changed(x) -> np.ndarray:
    a = x.asnumpy()
    d = a != a[:1]
    if d.ndim > 2:
        d = d.reshape(d.shape[0], d.shape[1], -1).any(axis=2)
    return d


def _zeros_with_rows(shape, like, codes_at: Optional[Tuple[int, np.ndarray]], base: float = 0.0):
    out = np.full(tuple(int(s) for s in shape), base, np.float32)
    if codes_at is not None:
        start, codes = codes_at
        c = codes.reshape(codes.shape + (1,) * (out.ndim - 2))
        out[start:start + codes.shape[0]] += c
    return ms.Tensor(out, like.dtype if like is not None else ms.float32)


def probe_channels(handle, perturb: Dict[Optional[str], Tuple[int, np.ndarray]], rows: int) -> Dict[str, np.ndarray]:
    """One probe forward (:func:`~prunekit.decisions.channel_groups.run_probe`)."""
    return run_probe(handle, perturb, rows, handle.model.cells_and_names(), PRUNABLE, NORMS, "construct", _changed,
                     _zeros_with_rows, lambda x: probe_forward(handle.model, x), _layout_error)
