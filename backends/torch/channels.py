"""PyTorch side of channel-group discovery (:mod:`prunekit.decisions.channel_groups`): BatchNorm discovery and
the channel probe.

The probe runs one eval-mode forward in which every Conv2d/Linear is replaced by a function
returning zeros plus the perturbation rows asked for that layer (its own computation is
skipped: the probe costs little more than the pooling and activations), every BatchNorm by the
identity (the instance's ``forward`` is overridden for the pass and restored after), and records,
for the input of every Conv2d/Linear/BatchNorm and for the model's output, which channels (or
features) of each row differ from row 0.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from prunekit.decisions.channel_groups import run_probe

from .layers import _BN, PRUNABLE, probe_forward


def norm_layers(handle) -> List[Tuple[str, int]]:
    """``(name, channels)`` of every BatchNorm, in definition order."""
    return [(n, int(m.num_features)) for n, m in handle.model.named_modules() if isinstance(m, _BN)]


def _changed(x: torch.Tensor) -> np.ndarray:
    d = x.detach() != x[:1].detach()
    if d.dim() > 2:
        d = d.flatten(2).any(dim=2)
    return d.cpu().numpy()


def probe_channels(handle, perturb: Dict[Optional[str], Tuple[int, np.ndarray]], rows: int) -> Dict[str, np.ndarray]:
    """One probe forward (:func:`~prunekit.decisions.channel_groups.run_probe`)."""
    param = next(handle.model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    def zeros_with_rows(shape, like: Optional[torch.Tensor], codes_at) -> torch.Tensor:
        out = torch.zeros(shape, dtype=like.dtype if like is not None else dtype,
                          device=like.device if like is not None else device)
        if codes_at is not None:
            start, codes = codes_at
            c = torch.as_tensor(codes, dtype=out.dtype, device=out.device)
            out[start:start + c.shape[0]] += c.reshape(c.shape + (1,) * (out.dim() - 2))
        return out

    return run_probe(handle, perturb, rows, handle.model.named_modules(), PRUNABLE, _BN, "forward", _changed,
                     zeros_with_rows, lambda x: probe_forward(handle.model, x))
