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
import mindspore.nn as nn

from prunekit.decisions.channel_groups import OUTPUT

from .layers import PRUNABLE, _BN



def norm_layers(handle) -> List[Tuple[str, int]]:
    """``(name, channels)`` of every BatchNorm, in definition order."""
    return [(n, int(c.num_features)) for n, c in handle.model.cells_and_names() if isinstance(c, _BN)]


def _changed(x) -> np.ndarray:
    a = x.asnumpy()
    d = a != a[:1]
    if d.ndim > 2:
        d = d.reshape(d.shape[0], d.shape[1], -1).any(axis=2)
    return d


def _with_rows(shape, dtype, codes_at: Optional[Tuple[int, np.ndarray]]):
    out = np.zeros(tuple(int(s) for s in shape), np.float32)
    if codes_at is not None:
        start, codes = codes_at
        c = codes.reshape(codes.shape + (1,) * (out.ndim - 2))
        out[start:start + codes.shape[0]] += c
    return ms.Tensor(out, dtype)


def probe_channels(handle, perturb: Dict[Optional[str], Tuple[int, np.ndarray]], rows: int) -> Dict[str, np.ndarray]:
    """One probe forward of ``rows`` rows. ``perturb[layer] = (first row, codes)`` adds
    ``codes`` (rows x channels) to that layer's (zeroed) output from ``first row`` on; the key
    None perturbs the image. Returns ``{layer or BN name or OUTPUT: (rows, width) bool}``."""
    model = handle.model
    seen: Dict[str, np.ndarray] = {}

    info = {l.name: l for l in handle.layers}

    def layer_construct(name, cell):
        # the layer's own computation is skipped: its output is zeros (plus the perturbation)
        def construct(x, *args, **kwargs):
            seen.setdefault(name, _changed(x))
            if isinstance(cell, nn.Conv2d):
                shape = (x.shape[0], int(cell.out_channels)) + tuple(info[name].output_hw)
            else:
                shape = tuple(x.shape[:-1]) + (int(cell.out_channels),)
            return _with_rows(shape, x.dtype, perturb.get(name))
        return construct

    def norm_construct(name):
        def construct(x, *args, **kwargs):
            seen.setdefault(name, _changed(x))
            return x
        return construct

    graph = ms.get_context("mode") != ms.PYNATIVE_MODE
    if graph:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    patched = []
    was_training = model.training
    try:
        for n, c in model.cells_and_names():
            if isinstance(c, PRUNABLE) and n in info:
                patched.append((c, c.__dict__.get("construct")))
                c.construct = layer_construct(n, c)
            elif isinstance(c, _BN):
                patched.append((c, c.__dict__.get("construct")))
                c.construct = norm_construct(n)
        model.set_train(False)
        x = _with_rows((rows,) + tuple(int(d) for d in handle.input_shape[-3:]), ms.float32, perturb.get(None))
        y = model(x)
    finally:
        for c, own in patched:
            if own is None:
                del c.construct
            else:
                c.construct = own
        model.set_train(was_training)
        if graph:
            ms.set_context(mode=ms.GRAPH_MODE)
    if isinstance(y, (tuple, list)) and y and isinstance(y[0], ms.Tensor):
        y = y[0]  # (logits, auxiliary outputs...): the logits come first
    if isinstance(y, ms.Tensor):
        seen[OUTPUT] = _changed(y)
    return seen
