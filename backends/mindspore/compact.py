"""Physical channel pruning on MindSpore: :func:`compact` builds a new, narrower dense model.

The model is deep-copied (``copy.deepcopy`` gives new Parameters), then every Conv2d / Dense /
BatchNorm touched by a pruned channel group (:mod:`prunekit.decisions.channel_groups`) is replaced by a new,
smaller cell holding the kept slices of the old one's parameters and statistics: producers
lose output rows, consumers input columns (a Dense after a flatten loses whole blocks of
``spatial`` columns; a consumer of a concatenation the columns of each piece), depthwise convs
lose input, output and groups alike, grouped convs keep their groups with fewer channels in each,
a GroupNorm loses whole groups; convs keep their ``pad_mode`` and ``padding``. Every parameter is
then renamed to its full path (a cell set into a built model gets names relative to its parent,
and optimizers reject duplicates). The original model is not touched; the new handle
re-discovers its layers, so parameter and FLOPs counts are measured on the new cells.
Which layer keeps which indices is decided once for both backends
(:mod:`prunekit.decisions.compaction`); this file only narrows one layer or norm at a time.

Before the new handle is returned, the compacted copy is checked against the masked model (a
second copy with the removed channels zeroed) on a seeded probe batch, layer by layer
(:func:`prunekit.decisions.compaction.first_disagreement`, with the dtype's
:func:`~prunekit.decisions.compaction.tolerance`); a disagreement raises :class:`ModelError`
naming the first layer, as on PyTorch.
"""
from __future__ import annotations

import copy
from typing import Dict, Sequence

import numpy as np
import mindspore as ms
import mindspore.nn as nn

from prunekit.decisions.channel_groups import find_channel_groups, zeroed_entries
from prunekit.decisions.compaction import (LayerCut, compaction_cuts, grouped_columns, refuse_disagreement,
                                           narrowed_modules)
from prunekit.errors import ModelError

from .layers import _BN, PRUNABLE, MindSporeModelHandle, probe_mode


def _take(p, idx, axis: int) -> np.ndarray:
    a = p if isinstance(p, np.ndarray) else p.asnumpy()
    return a if idx is None else np.take(a, np.asarray(idx, np.int64), axis=axis)


def _param(cell_param: ms.Parameter, value: np.ndarray) -> None:
    cell_param.set_data(ms.Tensor(np.ascontiguousarray(value), cell_param.dtype))


def _narrow_conv(c: nn.Conv2d, cut: LayerCut) -> nn.Conv2d:
    if cut.depthwise:
        w = _take(c.weight, cut.out_idx, 0)
        group, n_in = w.shape[0], w.shape[0]
    elif cut.groups > 1:
        rows, cols = grouped_columns(cut, int(c.in_channels), int(c.out_channels))
        w = c.weight.asnumpy()[rows[:, None], cols]
        group, n_in = cut.groups, cols.shape[1] * cut.groups
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
    if isinstance(b, nn.GroupNorm):
        block = int(b.num_channels) // int(b.num_groups)
        new = nn.GroupNorm(len(idx) // block, len(idx), eps=b.eps, affine=b.affine, dtype=b.gamma.dtype)
        for leaf in ("gamma", "beta"):
            _param(getattr(new, leaf), _take(getattr(b, leaf), idx, 0))
            getattr(new, leaf).requires_grad = getattr(b, leaf).requires_grad
        return new
    if not isinstance(b, _BN):
        raise ModelError(f"{type(b).__name__} {name!r} normalises over all its channels and cannot be narrowed")
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
        # cells of a SequentialCell built from an OrderedDict have names, not numbers
        parent[int(attr) if attr.isdigit() else list(parent._cells).index(attr)] = cell
    else:
        setattr(parent, attr, cell)


def _layer_outputs(model: nn.Cell, x):
    """Each Conv2d/Dense cell's first output (float32 NumPy) and the model's output, in execution
    order, from one eval-mode PyNative forward."""
    seen: Dict[str, np.ndarray] = {}
    order = []

    def recorder(name):
        def hook(cell, inputs, output):
            if name not in seen and hasattr(output, "asnumpy"):
                seen[name] = output.asnumpy().astype(np.float32)
                order.append(name)
        return hook

    hooks = []
    try:
        with probe_mode(model):
            hooks = [c.register_forward_hook(recorder(n)) for n, c in model.cells_and_names() if isinstance(c, PRUNABLE)]
            y = model(x)
    finally:
        for h in hooks:
            h.remove()
    if isinstance(y, (tuple, list)) and y:
        y = y[0]
    if hasattr(y, "asnumpy"):
        seen["<output>"] = y.asnumpy().astype(np.float32)
        order.append("<output>")
    return seen, order


def check_compacted(handle: MindSporeModelHandle, small: nn.Cell, cuts, groups, keep, seed: int = 0) -> None:
    """Raise :class:`ModelError` naming the first layer where ``small`` (the compacted copy)
    disagrees with the masked model on a seeded batch of two probe inputs."""
    masked = MindSporeModelHandle(copy.deepcopy(handle.model), handle.input_shape, handle.model_name, handle.ops)
    state = handle.state_numpy()
    for key, removed in zeroed_entries(groups, keep).items():
        # norms other than BatchNorm keep MindSpore's leaf names (gamma, beta) in the shared state
        for k in (key, key[:-len(".weight")] + ".gamma" if key.endswith(".weight") else key[:-len(".bias")] + ".beta"):
            if k in state:
                state[k][removed] = 0
                break
    masked.load_state_numpy(state)
    gen = np.random.default_rng(seed)
    x = ms.Tensor(gen.standard_normal((2,) + tuple(handle.input_shape[-3:])).astype(np.float32))
    ref, order = _layer_outputs(masked.model, x)
    got, _ = _layer_outputs(small, x)
    dtype = next(iter(handle.model.get_parameters())).dtype
    refuse_disagreement(handle.model_name, cuts, ref, got, order, str(dtype))


def compact(handle: MindSporeModelHandle, keep: Dict[str, Sequence[int]], check: bool = True) -> MindSporeModelHandle:
    """A new handle over a narrower copy of the model keeping, per group name, those channels
    (groups not named keep all). Checks ``keep`` first: nothing is built on bad input. With
    ``check`` (the default) the copy is compared with the masked model (:func:`check_compacted`)
    and refused with :class:`ModelError` where they differ; the handle's model is never changed."""
    groups = find_channel_groups(handle)
    cuts = compaction_cuts(handle, keep, groups)
    model = copy.deepcopy(handle.model)
    cells = dict(model.cells_and_names())
    for path, old, new in narrowed_modules(cuts, cells, _narrow_conv, _narrow_dense, _narrow_norm):
        new.set_train(old.training)
        _set(model, cells, path, new)
    for path, param in model.parameters_and_names():
        param.name = path
    if check and (cuts.layers or cuts.norms):
        check_compacted(handle, model, cuts, groups, dict(keep))
    return MindSporeModelHandle(model, handle.input_shape, handle.model_name, handle.ops)
