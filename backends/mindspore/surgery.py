"""Model surgery on MindSpore models: replace a conv by the two convs of a low-rank
decomposition (TRP). The replacement is an ``nn.SequentialCell`` at the same path, so its
parameters are named ``<layer>.0.weight`` and ``<layer>.1.weight`` / ``.1.bias``, as on PyTorch.
"""
from __future__ import annotations

from typing import Sequence

import mindspore as ms
import mindspore.nn as nn
import numpy as np

from prunekit.algorithms.trp import ConvFactor, Decomposition

from .layers import MindSporeModelHandle


def _conv(factor: ConvFactor) -> nn.Conv2d:
    co, ci, kh, kw = factor.weight.shape
    ph, pw = factor.padding
    conv = nn.Conv2d(ci, co, (kh, kw), tuple(factor.stride), pad_mode="pad", padding=(ph, ph, pw, pw),
                     has_bias=factor.bias is not None)
    conv.weight.set_data(ms.Tensor(np.ascontiguousarray(factor.weight), ms.float32))
    if factor.bias is not None:
        conv.bias.set_data(ms.Tensor(np.ascontiguousarray(np.asarray(factor.bias, np.float32))))
    return conv


def _grouped_conv(factor: ConvFactor) -> nn.Conv2d:
    """The grouped second conv of TRP's nd scheme (C_out groups of K channels)."""
    co, ci, kh, kw = factor.weight.shape
    ph, pw = factor.padding
    conv = nn.Conv2d(ci * factor.groups, co, (kh, kw), tuple(factor.stride), pad_mode="pad", padding=(ph, ph, pw, pw),
                     group=factor.groups, has_bias=factor.bias is not None)
    conv.weight.set_data(ms.Tensor(np.ascontiguousarray(factor.weight), ms.float32))
    if factor.bias is not None:
        conv.bias.set_data(ms.Tensor(np.ascontiguousarray(np.asarray(factor.bias, np.float32))))
    return conv


def _factor_conv(factor: ConvFactor) -> nn.Conv2d:
    return _grouped_conv(factor) if getattr(factor, "groups", 1) > 1 else _conv(factor)


def _locate(model: nn.Cell, path: str):
    cells = dict(model.cells_and_names())
    parent_path, _, attr = path.rpartition(".")
    return cells[parent_path] if parent_path else model, attr


def apply_decompositions(handle: MindSporeModelHandle, decompositions: Sequence[Decomposition]) -> MindSporeModelHandle:
    """Replace each decomposed conv in place and return a handle over the new layers."""
    model = handle.model
    for d in decompositions:
        parent, attr = _locate(model, d.layer)
        old = dict(model.cells_and_names())[d.layer]
        if not isinstance(old, nn.Conv2d):
            raise TypeError(f"{d.layer} is not a Conv2d")
        new = nn.SequentialCell([_factor_conv(d.first), _factor_conv(d.second)])
        if isinstance(parent, nn.SequentialCell):
            parent[int(attr)] = new
        else:
            setattr(parent, attr, new)
    # a cell set into a built model gets names relative to its parent ("conv1.0.weight" in every
    # block); optimizers need unique names, so give every parameter its full path again
    for path, param in model.parameters_and_names():
        param.name = path
    return MindSporeModelHandle(model, handle.input_shape, handle.model_name, handle.ops)
