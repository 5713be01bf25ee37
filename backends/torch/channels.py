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
import torch.nn as nn

from prunekit.decisions.channel_groups import OUTPUT

from .layers import _BN, PRUNABLE



def norm_layers(handle) -> List[Tuple[str, int]]:
    """``(name, channels)`` of every BatchNorm, in definition order."""
    return [(n, int(m.num_features)) for n, m in handle.model.named_modules() if isinstance(m, _BN)]


def _changed(x: torch.Tensor) -> np.ndarray:
    d = x.detach() != x[:1].detach()
    if d.dim() > 2:
        d = d.flatten(2).any(dim=2)
    return d.cpu().numpy()


def probe_channels(handle, perturb: Dict[Optional[str], Tuple[int, np.ndarray]], rows: int) -> Dict[str, np.ndarray]:
    """One probe forward of ``rows`` rows. ``perturb[layer] = (first row, codes)`` adds
    ``codes`` (rows x channels) to that layer's (zeroed) output from ``first row`` on; the key
    None perturbs the image. Returns ``{layer or BN name or OUTPUT: (rows, width) bool}``."""
    model = handle.model
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    seen: Dict[str, np.ndarray] = {}

    def add_rows(out: torch.Tensor, name: Optional[str]) -> torch.Tensor:
        if name in perturb:
            start, codes = perturb[name]
            c = torch.as_tensor(codes, dtype=out.dtype, device=out.device)
            c = c.reshape(c.shape + (1,) * (out.dim() - 2))
            out[start:start + c.shape[0]] += c
        return out

    info = {l.name: l for l in handle.layers}

    def layer_forward(name, module):
        # the layer's own computation is skipped: its output is zeros (plus the perturbation)
        def forward(x, *args, **kwargs):
            seen.setdefault(name, _changed(x))
            if isinstance(module, nn.Conv2d):
                shape = (x.shape[0], module.out_channels) + tuple(info[name].output_hw)
            else:
                shape = tuple(x.shape[:-1]) + (module.out_features,)
            return add_rows(torch.zeros(shape, dtype=x.dtype, device=x.device), name)
        return forward

    def norm_forward(name):
        def forward(x, *args, **kwargs):
            seen.setdefault(name, _changed(x))
            return x
        return forward

    patched = []
    was_training = model.training
    try:
        for n, m in model.named_modules():
            if isinstance(m, PRUNABLE) and n in info:
                patched.append((m, m.__dict__.get("forward")))
                m.forward = layer_forward(n, m)
            elif isinstance(m, _BN):
                patched.append((m, m.__dict__.get("forward")))
                m.forward = norm_forward(n)
        model.eval()
        x = torch.zeros((rows,) + tuple(handle.input_shape[-3:]), dtype=dtype, device=device)
        with torch.no_grad():
            add_rows(x, None)
            y = model(x)
    finally:
        for m, own in patched:
            if own is None:
                del m.forward
            else:
                m.forward = own
        model.train(was_training)
    if isinstance(y, (tuple, list)) and y and isinstance(y[0], torch.Tensor):
        y = y[0]  # (logits, auxiliary outputs...): the logits come first
    if isinstance(y, torch.Tensor):
        seen[OUTPUT] = _changed(y)
    return seen
