"""Physical channel pruning on MindSpore: :func:`compact` builds a new, narrower dense model.

The model is deep-copied (``copy.deepcopy`` gives new Parameters), then every Conv2d / Dense /
BatchNorm touched by a pruned channel group (:mod:`prunekit.decisions.channel_groups`) is replaced by a new,
smaller cell holding the kept slices of the old one's parameters and statistics: producers
lose output rows, consumers input columns (a Dense after a flatten loses whole blocks of
``spatial`` columns), depthwise convs lose input, output and groups alike. Every parameter is
then renamed to its full path (a cell set into a built model gets names relative to its parent,
and optimizers reject duplicates). The original model is not touched; the new handle
re-discovers its layers, so parameter and FLOPs counts are measured on the new cells.
Which layer keeps which indices is decided once for both backends
(:mod:`prunekit.decisions.compaction`); this file only narrows one layer or norm at a time.
"""
from __future__ import annotations

import copy
from typing import Dict, Sequence

import numpy as np
import mindspore as ms
import mindspore.nn as nn

from prunekit.decisions.compaction import LayerCut, compaction_cuts, narrowed_modules

from .layers import _BN, MindSporeModelHandle


def _take(p, idx, axis: int) -> np.ndarray:
    a = p if isinstance(p, np.ndarray) else p.asnumpy()
    return a if idx is None else np.take(a, np.asarray(idx, np.int64), axis=axis)


def _param(cell_param: ms.Parameter, value: np.ndarray) -> None:
    cell_param.set_data(ms.Tensor(np.ascontiguousarray(value), cell_param.dtype))


def _narrow_conv(c: nn.Conv2d, cut: LayerCut) -> nn.Conv2d:
    if cut.depthwise:
        w = _take(c.weight, cut.out_idx, 0)
        group, n_in = w.shape[0], w.shape[0]
    else:
        w = _take(_take(c.weight, cut.out_idx, 0), cut.in_idx, 1)
        group, n_in = 1, w.shape[1]
    new = nn.Conv2d(n_in, w.shape[0], c.kernel_size, c.stride, pad_mode=c.pad_mode, padding=c.padding,
                    dilation=c.dilation, group=group, has_bias=c.has_bias, weight_init="zeros",
                    bias_init="zeros", data_format=c.data_format, dtype=c.weight.dtype)
    return _fill(new, c, w, cut.out_idx)


def _narrow_dense(d: nn.Dense, cut: LayerCut) -> nn.Dense:
    w = _take(_take(d.weight, cut.out_idx, 0), cut.in_idx, 1)
    new = nn.Dense(w.shape[1], w.shape[0], weight_init="zeros", bias_init="zeros", has_bias=d.has_bias,
                   activation=d.activation if d.activation_flag else None, dtype=d.weight.dtype)
    return _fill(new, d, w, cut.out_idx)


def _fill(new: nn.Cell, old: nn.Cell, weight: np.ndarray, out_idx) -> nn.Cell:
    _param(new.weight, weight)
    if old.has_bias:
        _param(new.bias, _take(old.bias, out_idx, 0))
    return new


def _narrow_norm(b, idx, name: str):
    if not isinstance(b, _BN):
        raise TypeError(f"{name} is a {type(b).__name__}, not a BatchNorm")
    new = type(b)(len(idx), eps=b.eps, momentum=1.0 - b.momentum, affine=bool(b.gamma.requires_grad),
                  use_batch_statistics=b.use_batch_statistics, data_format=b.format)
    for leaf in ("gamma", "beta", "moving_mean", "moving_variance"):
        _param(getattr(new, leaf), _take(getattr(b, leaf), idx, 0))
        getattr(new, leaf).requires_grad = getattr(b, leaf).requires_grad
    return new


def _set(model: nn.Cell, cells: Dict[str, nn.Cell], path: str, cell: nn.Cell) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = cells[parent_path] if parent_path else model
    if isinstance(parent, (nn.SequentialCell, nn.CellList)):
        parent[int(attr)] = cell
    else:
        setattr(parent, attr, cell)


def compact(handle: MindSporeModelHandle, keep: Dict[str, Sequence[int]]) -> MindSporeModelHandle:
    """A new handle over a narrower copy of the model keeping, per group name, those channels
    (groups not named keep all). Checks ``keep`` first: nothing is built on bad input."""
    cuts = compaction_cuts(handle, keep)
    model = copy.deepcopy(handle.model)
    cells = dict(model.cells_and_names())
    for path, old, new in narrowed_modules(cuts, cells, _narrow_conv, _narrow_dense, _narrow_norm):
        new.set_train(old.training)
        _set(model, cells, path, new)
    for path, param in model.parameters_and_names():
        param.name = path
    return MindSporeModelHandle(model, handle.input_shape, handle.model_name, handle.ops)
