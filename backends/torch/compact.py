"""Physical channel pruning on PyTorch: :func:`compact` builds a new, narrower dense model.

The model is deep-copied, then every Conv2d / Linear / BatchNorm touched by a pruned channel
group (:mod:`prunekit.decisions.channel_groups`) is replaced by a new, smaller module holding the kept slices of
the old one's parameters and statistics: producers lose output rows, consumers input columns
(a linear after a flatten loses whole blocks of ``spatial`` columns), depthwise convs lose
input, output and groups alike. The original model is not touched; the new handle re-discovers
its layers, so parameter and FLOPs counts are measured on the new modules.
"""
from __future__ import annotations

import copy
from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn as nn

from prunekit.decisions.channel_groups import check_keep, find_channel_groups, layer_slices

from .layers import TorchModelHandle



def _index(idx, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(idx, np.int64), device=device)


def _narrow_conv(m: nn.Conv2d, out_idx, in_idx, depthwise: bool) -> nn.Conv2d:
    dev = m.weight.device
    w = m.weight.detach()
    if depthwise:
        groups = len(out_idx)
        n_in = groups
        w = w.index_select(0, _index(out_idx, dev))
    else:
        groups = 1
        n_in = m.in_channels if in_idx is None else len(in_idx)
        if out_idx is not None:
            w = w.index_select(0, _index(out_idx, dev))
        if in_idx is not None:
            w = w.index_select(1, _index(in_idx, dev))
    new = nn.Conv2d(n_in, w.shape[0], m.kernel_size, m.stride, m.padding, m.dilation, groups,
                    m.bias is not None, m.padding_mode, device=dev, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if m.bias is not None:
            b = m.bias.detach()
            new.bias.copy_(b if out_idx is None else b.index_select(0, _index(out_idx, dev)))
    return new


def _narrow_linear(m: nn.Linear, out_idx, in_idx) -> nn.Linear:
    dev = m.weight.device
    w = m.weight.detach()
    if out_idx is not None:
        w = w.index_select(0, _index(out_idx, dev))
    if in_idx is not None:
        w = w.index_select(1, _index(in_idx, dev))
    new = nn.Linear(w.shape[1], w.shape[0], m.bias is not None, device=dev, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if m.bias is not None:
            b = m.bias.detach()
            new.bias.copy_(b if out_idx is None else b.index_select(0, _index(out_idx, dev)))
    return new


def _narrow_norm(m, idx):
    ref = m.weight if m.weight is not None else m.running_mean
    new = type(m)(len(idx), m.eps, m.momentum, m.affine, m.track_running_stats,
                  device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
    sel = _index(idx, ref.device if ref is not None else "cpu")
    with torch.no_grad():
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            old = getattr(m, leaf)
            if old is not None:
                getattr(new, leaf).copy_(old.detach().index_select(0, sel))
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
    groups = find_channel_groups(handle)
    kept = check_keep(groups, keep)
    out_keep, in_keep, norm_keep, dw_keep = layer_slices(groups, kept)
    model = copy.deepcopy(handle.model)
    modules = dict(model.named_modules())
    for name in sorted(set(out_keep) | set(in_keep) | set(dw_keep)):
        m = modules[name]
        if isinstance(m, nn.Conv2d):
            new = _narrow_conv(m, dw_keep.get(name, out_keep.get(name)), in_keep.get(name), name in dw_keep)
        elif isinstance(m, nn.Linear):
            new = _narrow_linear(m, out_keep.get(name), in_keep.get(name))
        else:
            raise TypeError(f"{name} is a {type(m).__name__}, not a Conv2d or Linear")
        new.train(m.training)
        _set(model, name, new)
    for name, idx in norm_keep.items():
        m = modules[name]
        new = _narrow_norm(m, idx)
        new.train(m.training)
        _set(model, name, new)
    return TorchModelHandle(model, handle.input_shape, handle.model_name)
