"""Model surgery on MindSpore models: replace a conv by the two convs of a low-rank
decomposition (TRP). The replacement is an ``nn.SequentialCell`` at the same path, so its
parameters are named ``<layer>.0.weight`` and ``<layer>.1.weight`` / ``.1.bias``, as on PyTorch.

The factors' padding and dilation are taken from the replaced cell, not from the neutral
factors (which only know a symmetric padding): :func:`factor_geometry` gives each spatial axis
to the first factor with the original's kernel and stride on it, which gets the original's
dilation and padding there. ``pad_mode="same"`` stays ``"same"`` on every factor (exact whatever
the input size: a factor that does not carry an axis has kernel 1 and stride 1 on it, so
``"same"`` pads nothing there), ``"valid"`` stays ``"valid"``, and ``"pad"`` splits its
(top, bottom, left, right) between the factors carrying the rows and the columns.
"""
from __future__ import annotations

from typing import Sequence

import mindspore as ms
import mindspore.nn as nn
import numpy as np

from prunekit.algorithms.trp import ConvFactor, Decomposition
from prunekit.errors import ModelError

from .layers import PAD_MODES, MindSporeModelHandle, _pair, conv_pads


def factor_geometry(layer: str, old: nn.Conv2d, factors: Sequence[ConvFactor]) -> list:
    """``Conv2d`` keyword arguments (``pad_mode``, ``padding``, ``dilation``) per factor of the
    decomposition of ``old``, so that the factors' chain pads and dilates exactly as ``old``
    does (see the module doc); :class:`ModelError` naming ``layer`` where it cannot."""
    mode = str(old.pad_mode).lower()
    if mode not in PAD_MODES or int(old.group) != 1:
        raise ModelError(f"conv {layer!r} (pad_mode={old.pad_mode!r}, group={old.group}) cannot be decomposed: "
                         f"prunekit decomposes ungrouped convs with pad_mode {', '.join(PAD_MODES)}")
    kernel, stride, dilation = _pair(old.kernel_size), _pair(old.stride), _pair(old.dilation)
    pads = conv_pads(layer, old, (1, 1)) if mode == "pad" else (0, 0, 0, 0)
    carrier = [None, None]
    for axis in (0, 1):
        for i, f in enumerate(factors):
            if (int(f.weight.shape[2 + axis]), int(f.stride[axis])) == (kernel[axis], stride[axis]):
                carrier[axis] = i
                break
        for i, f in enumerate(factors):
            if i != carrier[axis] and (int(f.weight.shape[2 + axis]), int(f.stride[axis])) != (1, 1):
                raise ModelError(f"conv {layer!r}: its decomposition's factor {i} has kernel "
                                 f"{int(f.weight.shape[2 + axis])} and stride {int(f.stride[axis])} along axis "
                                 f"{axis}, where only one factor may span it; the padding cannot be reproduced")
        if carrier[axis] is None:
            raise ModelError(f"conv {layer!r}: no factor of its decomposition has the original kernel and stride "
                             f"along axis {axis}; the padding cannot be reproduced")
    out = []
    for i in range(len(factors)):
        rows, cols = carrier[0] == i, carrier[1] == i
        kw = {"dilation": (dilation[0] if rows else 1, dilation[1] if cols else 1), "pad_mode": mode}
        if mode == "pad":
            kw["padding"] = (pads[0] if rows else 0, pads[1] if rows else 0, pads[2] if cols else 0,
                             pads[3] if cols else 0)
        out.append(kw)
    return out


def _conv(factor: ConvFactor, geometry: dict) -> nn.Conv2d:
    """One factor as a conv; TRP's nd second factor is grouped (C_out groups of K channels)."""
    co, ci, kh, kw = factor.weight.shape
    groups = int(getattr(factor, "groups", 1))
    conv = nn.Conv2d(ci * groups, co, (kh, kw), tuple(int(s) for s in factor.stride), group=groups,
                     has_bias=factor.bias is not None, **geometry)
    conv.weight.set_data(ms.Tensor(np.ascontiguousarray(factor.weight), ms.float32))
    if factor.bias is not None:
        conv.bias.set_data(ms.Tensor(np.ascontiguousarray(np.asarray(factor.bias, np.float32))))
    return conv


def _locate(model: nn.Cell, path: str):
    cells = dict(model.cells_and_names())
    parent_path, _, attr = path.rpartition(".")
    return cells[parent_path] if parent_path else model, attr


def apply_decompositions(handle: MindSporeModelHandle, decompositions: Sequence[Decomposition]) -> MindSporeModelHandle:
    """Replace each decomposed conv in place and return a handle over the new layers."""
    model = handle.model
    cells = dict(model.cells_and_names())
    planned = []  # every decomposition is checked before the model is changed
    for d in decompositions:
        old = cells.get(d.layer)
        if not isinstance(old, nn.Conv2d):
            raise TypeError(f"{d.layer} is not a Conv2d")
        planned.append((d, factor_geometry(d.layer, old, (d.first, d.second))))
    for d, geometry in planned:
        parent, attr = _locate(model, d.layer)
        new = nn.SequentialCell([_conv(d.first, geometry[0]), _conv(d.second, geometry[1])])
        if isinstance(parent, (nn.SequentialCell, nn.CellList)):
            parent[int(attr)] = new
        else:
            setattr(parent, attr, new)
    # a cell set into a built model gets names relative to its parent ("conv1.0.weight" in every
    # block); optimizers need unique names, so give every parameter its full path again
    for path, param in model.parameters_and_names():
        param.name = path
    return MindSporeModelHandle(model, handle.input_shape, handle.model_name, handle.ops)
