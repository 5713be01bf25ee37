"""PyTorch side of channel-group discovery (:mod:`prunekit.decisions.channel_groups`): norm discovery and
the channel probe.

The probe runs one eval-mode forward in which every Conv2d/Linear is replaced by a function
returning a constant (:data:`~prunekit.decisions.channel_groups.PROBE_BASE`) plus the
perturbation rows asked for that layer (its own computation is skipped: the probe costs little
more than the pooling and activations), every norm layer (BatchNorm, GroupNorm, LayerNorm and
its subclasses) by the identity (the instance's ``forward`` is overridden for the pass and
restored after), and records, for the input of every Conv2d/Linear/norm and for the model's
output, which channels (or features) of each row differ from row 0. The probe runs in the
model's floating dtype.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from prunekit.decisions.channel_groups import NormLayer, run_probe

from .layers import NORMS, PRUNABLE, model_dtype, probe_forward


def _norm(name: str, m: nn.Module) -> NormLayer:
    if isinstance(m, nn.GroupNorm):
        c, g = int(m.num_channels), int(m.num_groups)
        return NormLayer(name, c, 0 if g == 1 else c // g, "GroupNorm")
    if isinstance(m, nn.LayerNorm):
        return NormLayer(name, int(m.normalized_shape[-1]), 0, type(m).__name__)
    return NormLayer(name, int(m.num_features), 1, type(m).__name__)


def norm_layers(handle) -> List[Tuple[str, int]]:
    """``(name, channels)`` of every norm layer, in definition order, as
    :class:`~prunekit.decisions.channel_groups.NormLayer` (which channels it normalises together)."""
    return [_norm(n, m) for n, m in handle.model.named_modules() if isinstance(m, NORMS)]


def _layout_error(name: str, m: nn.Module, x: torch.Tensor) -> Optional[str]:
    """Why a norm's input is not channels-first (None when it is)."""
    if isinstance(m, nn.LayerNorm) and x.dim() > 2:
        c = int(m.normalized_shape[-1])
        if len(m.normalized_shape) > 1:
            return f"normalises over the trailing axes {tuple(m.normalized_shape)}"
        if type(m).forward is nn.LayerNorm.forward or int(x.shape[1]) != c:
            return (f"normalises the last axis of a {x.dim()}-axis tensor of shape {tuple(x.shape)} "
                    "(channels-last features or tokens)")
    return None


def _changed(x: torch.Tensor) -> np.ndarray:
    d = x.detach() != x[:1].detach()
    if d.dim() > 2:
        d = d.flatten(2).any(dim=2)
    return d.cpu().numpy()


def probe_channels(handle, perturb: Dict[Optional[str], Tuple[int, np.ndarray]], rows: int) -> Dict[str, np.ndarray]:
    """One probe forward (:func:`~prunekit.decisions.channel_groups.run_probe`)."""
    param = next(handle.model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = model_dtype(handle.model)

    def zeros_with_rows(shape, like: Optional[torch.Tensor], codes_at, base: float = 0.0) -> torch.Tensor:
        out = torch.full(shape, float(base), dtype=like.dtype if like is not None else dtype,
                         device=like.device if like is not None else device)
        if codes_at is not None:
            start, codes = codes_at
            c = torch.as_tensor(codes, dtype=out.dtype, device=out.device)
            out[start:start + c.shape[0]] += c.reshape(c.shape + (1,) * (out.dim() - 2))
        return out

    return run_probe(handle, perturb, rows, handle.model.named_modules(), PRUNABLE, NORMS, "forward", _changed,
                     zeros_with_rows, lambda x: probe_forward(handle.model, x), _layout_error)
