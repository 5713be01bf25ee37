"""Physical channel pruning on PyTorch: :func:`compact` builds a new, narrower dense model.

The model is deep-copied, then every Conv2d / Linear / norm layer touched by a pruned channel
group (:mod:`prunekit.decisions.channel_groups`) is replaced by a new, smaller module holding the kept slices of
the old one's parameters and statistics: producers lose output rows, consumers input columns
(a linear after a flatten loses whole blocks of ``spatial`` columns; a consumer of a
concatenation loses the columns of each piece), depthwise convs lose input, output and groups
alike, grouped convs keep their groups with fewer channels in each, a GroupNorm loses whole
groups. New modules keep the old ones' dtype, device and memory format (channels_last).

Before the new handle is returned, the compacted copy is checked against the masked model (a
second copy with the removed channels zeroed) on a seeded probe batch, layer by layer
(:func:`prunekit.decisions.compaction.first_disagreement`, in float32, with the dtype's
:func:`~prunekit.decisions.compaction.tolerance`); a disagreement raises :class:`ModelError`
naming the first layer. The original model is never touched; the new handle re-discovers its
layers, so parameter and FLOPs counts are measured on the new modules.
"""
from __future__ import annotations

import copy
from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn as nn

from prunekit.decisions.channel_groups import find_channel_groups, zeroed_entries
from prunekit.decisions.compaction import (LayerCut, compaction_cuts, grouped_columns, refuse_disagreement,
                                           narrowed_modules)
from prunekit.errors import ModelError

from .layers import PRUNABLE, TorchModelHandle, model_dtype


def _select(t: torch.Tensor, idx, dim: int) -> torch.Tensor:
    """``t`` restricted to the indices ``idx`` along ``dim`` (None: all of it), detached."""
    t = t.detach()
    return t if idx is None else t.index_select(dim, torch.as_tensor(np.asarray(idx, np.int64), device=t.device))


def _like(old: nn.Module, **params: torch.Tensor) -> nn.Module:
    """A copy of ``old`` (its class, attributes and submodules: a timm ``BatchNormAct2d`` keeps its
    activation, a ``Conv2dSame`` its padding) holding the given parameters and buffers."""
    saved = {k: old._parameters.get(k, None) for k in params if k in old._parameters}
    saved_buffers = {k: old._buffers.get(k, None) for k in params if k in old._buffers}
    try:  # do not deep-copy the tensors about to be replaced
        for k in saved:
            old._parameters[k] = None
        for k in saved_buffers:
            old._buffers[k] = None
        new = copy.deepcopy(old)
    finally:
        old._parameters.update(saved)
        old._buffers.update(saved_buffers)
    for k, v in params.items():
        if k in saved and saved[k] is not None:
            new._parameters[k] = nn.Parameter(v.clone(), requires_grad=saved[k].requires_grad)
        elif k in saved_buffers and saved_buffers[k] is not None:
            new._buffers[k] = v.clone()
    return new


def _memory_format(new: nn.Module, old: nn.Module) -> nn.Module:
    w = old.weight
    if w.dim() == 4 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last):
        new.weight.data = new.weight.data.contiguous(memory_format=torch.channels_last)
    return new


def _narrow_conv(m: nn.Conv2d, cut: LayerCut) -> nn.Conv2d:
    if cut.depthwise:
        w = _select(m.weight, cut.out_idx, 0)
        groups = n_in = w.shape[0]
    elif cut.groups > 1:
        rows, cols = grouped_columns(cut, m.in_channels, m.out_channels)
        w = m.weight.detach()[torch.as_tensor(rows)[:, None], torch.as_tensor(cols)]
        groups, n_in = cut.groups, cols.shape[1] * cut.groups
    else:
        w = _select(_select(m.weight, cut.out_idx, 0), cut.in_idx, 1)
        groups, n_in = 1, w.shape[1]
    params = {"weight": w}
    if m.bias is not None:
        params["bias"] = _select(m.bias, cut.out_idx, 0)
    new = _like(m, **params)
    new.in_channels, new.out_channels, new.groups = int(n_in), int(w.shape[0]), int(groups)
    return _memory_format(new, m)


def _narrow_linear(m: nn.Linear, cut: LayerCut) -> nn.Linear:
    w = _select(_select(m.weight, cut.out_idx, 0), cut.in_idx, 1)
    params = {"weight": w}
    if m.bias is not None:
        params["bias"] = _select(m.bias, cut.out_idx, 0)
    new = _like(m, **params)
    new.in_features, new.out_features = int(w.shape[1]), int(w.shape[0])
    return new


def _narrow_norm(m, idx, name: str):
    if isinstance(m, nn.LayerNorm):
        raise ModelError(f"{type(m).__name__} {name!r} normalises over all its channels and cannot be narrowed")
    params = {leaf: _select(getattr(m, leaf), idx, 0) for leaf in ("weight", "bias", "running_mean", "running_var")
              if getattr(m, leaf, None) is not None}
    new = _like(m, **params)
    if isinstance(m, nn.GroupNorm):
        new.num_groups = len(idx) // (m.num_channels // m.num_groups)
        new.num_channels = len(idx)
    else:
        new.num_features = len(idx)
    return new


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, module)


def _layer_outputs(model: nn.Module, x: torch.Tensor):
    """Each conv/linear layer's first output (float32 NumPy) and the model's output, in execution
    order, from one eval-mode forward."""
    seen: Dict[str, np.ndarray] = {}
    order = []

    def recorder(name):
        def hook(module, inputs, output):
            if name not in seen and isinstance(output, torch.Tensor):
                seen[name] = output.detach().float().cpu().numpy()
                order.append(name)
        return hook

    hooks = [m.register_forward_hook(recorder(n)) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            y = model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    if isinstance(y, (tuple, list)) and y:
        y = y[0]
    if isinstance(y, torch.Tensor):
        seen["<output>"] = y.detach().float().cpu().numpy()
        order.append("<output>")
    return seen, order


def check_compacted(handle: TorchModelHandle, small: nn.Module, cuts, groups, keep, seed: int = 0) -> None:
    """Raise :class:`ModelError` naming the first layer where ``small`` (the compacted copy)
    disagrees with the masked model on a seeded batch of two probe inputs."""
    masked = copy.deepcopy(handle.model)
    params = dict(masked.named_parameters())
    with torch.no_grad():
        for key, removed in zeroed_entries(groups, keep).items():
            if key in params:
                params[key][torch.as_tensor(removed, device=params[key].device)] = 0
    param = next(handle.model.parameters())
    gen = np.random.default_rng(seed)
    x = torch.as_tensor(gen.standard_normal((2,) + tuple(handle.input_shape[-3:])).astype(np.float32),
                        device=param.device).to(model_dtype(handle.model))
    if any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
           for p in handle.model.parameters()):
        x = x.contiguous(memory_format=torch.channels_last)
    ref, order = _layer_outputs(masked, x)
    got, _ = _layer_outputs(small, x)
    refuse_disagreement(handle.model_name, cuts, ref, got, order, str(model_dtype(handle.model)))


def compact(handle: TorchModelHandle, keep: Dict[str, Sequence[int]], check: bool = True) -> TorchModelHandle:
    """A new handle over a narrower copy of the model keeping, per group name, those channels
    (groups not named keep all). Checks ``keep`` first: nothing is built on bad input. With
    ``check`` (the default) the copy is compared with the masked model (:func:`check_compacted`)
    and refused with :class:`ModelError` where they differ; the handle's model is never changed."""
    groups = find_channel_groups(handle)
    cuts = compaction_cuts(handle, keep, groups)
    model = copy.deepcopy(handle.model)
    for path, old, new in narrowed_modules(cuts, dict(model.named_modules()), _narrow_conv, _narrow_linear,
                                           _narrow_norm):
        new.train(old.training)
        _set(model, path, new)
    if check and (cuts.layers or cuts.norms):
        check_compacted(handle, model, cuts, groups, {k: v for k, v in keep.items()})
    return TorchModelHandle(model, handle.input_shape, handle.model_name)
