"""Physical channel pruning on PyTorch: :func:`compact` builds a new, narrower dense model.

The model is deep-copied, then every Conv2d / Linear / BatchNorm touched by a pruned channel
group (:mod:`prunekit.decisions.channel_groups`) is replaced by a new, smaller module holding the kept slices of
the old one's parameters and statistics: producers lose output rows, consumers input columns
(a linear after a flatten loses whole blocks of ``spatial`` columns), depthwise convs lose
input, output and groups alike. The original model is not touched; the new handle re-discovers
its layers, so parameter and FLOPs counts are measured on the new modules.
Which layer keeps which indices is decided once for both backends
(:mod:`prunekit.decisions.compaction`); this file only narrows one layer or norm at a time.
"""
from __future__ import annotations

import copy
from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn as nn

from prunekit.decisions.compaction import LayerCut, compaction_cuts, narrowed_modules

from .layers import TorchModelHandle


def _select(t: torch.Tensor, idx, dim: int) -> torch.Tensor:
    """``t`` restricted to the indices ``idx`` along ``dim`` (None: all of it), detached."""
    t = t.detach()
    return t if idx is None else t.index_select(dim, torch.as_tensor(np.asarray(idx, np.int64), device=t.device))


def _narrow_conv(m: nn.Conv2d, cut: LayerCut) -> nn.Conv2d:
    if cut.depthwise:
        w = _select(m.weight, cut.out_idx, 0)
        groups = n_in = w.shape[0]
    else:
        w = _select(_select(m.weight, cut.out_idx, 0), cut.in_idx, 1)
        groups, n_in = 1, w.shape[1]
    new = nn.Conv2d(n_in, w.shape[0], m.kernel_size, m.stride, m.padding, m.dilation, groups,
                    m.bias is not None, m.padding_mode, device=w.device, dtype=w.dtype)
    return _fill(new, m, w, cut.out_idx)


def _narrow_linear(m: nn.Linear, cut: LayerCut) -> nn.Linear:
    w = _select(_select(m.weight, cut.out_idx, 0), cut.in_idx, 1)
    return _fill(nn.Linear(w.shape[1], w.shape[0], m.bias is not None, device=w.device, dtype=w.dtype), m, w,
                 cut.out_idx)


def _fill(new: nn.Module, old: nn.Module, weight: torch.Tensor, out_idx) -> nn.Module:
    with torch.no_grad():
        new.weight.copy_(weight)
        if old.bias is not None:
            new.bias.copy_(_select(old.bias, out_idx, 0))
    return new


def _narrow_norm(m, idx, name: str):
    ref = m.weight if m.weight is not None else m.running_mean
    new = type(m)(len(idx), m.eps, m.momentum, m.affine, m.track_running_stats,
                  device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
    with torch.no_grad():
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            old = getattr(m, leaf)
            if old is not None:
                getattr(new, leaf).copy_(_select(old, idx, 0))
        if m.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(m.num_batches_tracked)
    return new


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, module)


def compact(handle: TorchModelHandle, keep: Dict[str, Sequence[int]]) -> TorchModelHandle:
    """A new handle over a narrower copy of the model keeping, per group name, those channels
    (groups not named keep all). Checks ``keep`` first: nothing is built on bad input."""
    cuts = compaction_cuts(handle, keep)
    model = copy.deepcopy(handle.model)
    for path, old, new in narrowed_modules(cuts, dict(model.named_modules()), _narrow_conv, _narrow_linear,
                                           _narrow_norm):
        new.train(old.training)
        _set(model, path, new)
    return TorchModelHandle(model, handle.input_shape, handle.model_name)
