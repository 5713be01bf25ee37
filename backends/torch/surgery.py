"""Model surgery on PyTorch models: replace a conv by the two convs of a low-rank
decomposition (TRP; with the nd scheme the second conv is grouped). The replacement is an
``nn.Sequential`` at the same path, so its parameters are named ``<layer>.0.weight`` and
``<layer>.1.weight`` / ``.1.bias`` on both backends.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from prunekit.algorithms.trp import ConvFactor, Decomposition

from .layers import TorchModelHandle


def _conv(factor: ConvFactor, like: nn.Conv2d) -> nn.Conv2d:
    co, ci, kh, kw = factor.weight.shape
    groups = int(getattr(factor, "groups", 1))  # TRP's nd scheme: the second conv is grouped
    conv = nn.Conv2d(ci * groups, co, (kh, kw), tuple(factor.stride), tuple(factor.padding), groups=groups,
                     bias=factor.bias is not None)
    conv.to(device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.as_tensor(factor.weight))
        if factor.bias is not None:
            conv.bias.copy_(torch.as_tensor(np.asarray(factor.bias)))
    return conv


def _parent(model: nn.Module, path: str):
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def apply_decompositions(handle: TorchModelHandle, decompositions: Sequence[Decomposition]) -> TorchModelHandle:
    """Replace each decomposed conv in place and return a handle over the new layers."""
    model = handle.model
    for d in decompositions:
        parent, attr = _parent(model, d.layer)
        old = getattr(parent, attr)
        if not isinstance(old, nn.Conv2d):
            raise TypeError(f"{d.layer} is not a Conv2d")
        setattr(parent, attr, nn.Sequential(_conv(d.first, old), _conv(d.second, old)))
    return TorchModelHandle(model, handle.input_shape, handle.model_name)
