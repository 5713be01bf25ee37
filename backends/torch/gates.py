"""Channel gates for DSA on PyTorch: per-group gate values multiplied onto norm outputs.

Each gated norm layer gets a forward hook that returns ``output * gate`` (the gate broadcast over
the channel axis), so the gate acts after the norm and before the following ReLU or residual add.
A norm has one gate vector, assembled from the slices of every gated group it normalises, each at
its offset (a norm over a concatenation holds several groups: ``NormGateLayout`` in
``prunekit.decisions.channel_groups``); a group's gradient is the sum of its slices' gradients
over its norms (the group uses one mask). The gate tensors live on the model's device and are not
model parameters: the optimizer never sees them, and they require a gradient only inside
:meth:`ChannelGates.gradients` (``torch.autograd.grad`` with respect to the gates alone, so the
weights' ``.grad`` is untouched).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from prunekit.decisions.channel_groups import NormGateLayout
from prunekit.errors import ModelError


def _channels(module, default: int) -> int:
    """A norm layer's channel count (BatchNorm, GroupNorm, LayerNorm over channels)."""
    for attr in ("num_features", "num_channels"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    shape = getattr(module, "normalized_shape", None)
    return int(shape[-1]) if shape else default


class ChannelGates:
    """``groups``: ``{group name: (norm names, channels)}`` or ``(norm names, channels, {norm: offset})``."""

    def __init__(self, handle, groups: Dict[str, Tuple]):
        self.handle = handle
        self.model = handle.model
        modules = dict(self.model.named_modules())
        device = next(self.model.parameters()).device
        norms = {bn for spec in groups.values() for bn in spec[0]}
        missing = sorted(bn for bn in norms if bn not in modules)
        if missing:
            raise ModelError(f"channel gates name norm layer(s) {missing}, which the model does not have")
        self.layout = NormGateLayout(groups, {bn: _channels(modules[bn], 0) for bn in norms})
        self._values = {name: np.ones(int(spec[1]), np.float32) for name, spec in groups.items()}
        #: one gate tensor per gated norm
        self.gates: Dict[str, torch.Tensor] = {bn: torch.ones(n, device=device) for bn, n in self.layout.channels.items()}
        self._hooks = [modules[bn].register_forward_hook(self._hook(bn)) for bn in self.gates]

    def _hook(self, norm: str):
        def hook(module, inputs, output):
            gate = self.gates[norm].to(output.dtype)
            return output * gate.view((1, -1) + (1,) * (output.dim() - 2))
        return hook

    def set(self, values: Dict[str, np.ndarray]) -> None:
        """Write gate values (one float per channel) by group name."""
        for name, v in values.items():
            self._values[name] = np.asarray(v, np.float32).ravel().copy()
        with torch.no_grad():
            current = {bn: g.cpu().numpy() for bn, g in self.gates.items()}
            for bn, vec in self.layout.assemble(values, current).items():
                gate = self.gates[bn]
                gate.copy_(torch.as_tensor(vec, device=gate.device))

    def values(self) -> Dict[str, np.ndarray]:
        return {n: v.copy() for n, v in self._values.items()}

    def gradients(self, x: np.ndarray, y: np.ndarray) -> Tuple[float, Dict[str, np.ndarray]]:
        """Cross-entropy on one batch in training mode; ``(loss, ∂L/∂gate per group)``. Only the
        gates get gradients; BN running statistics update as in any training forward pass; the
        model is left in the mode it was in."""
        device = next(self.model.parameters()).device
        xb = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
        yb = torch.from_numpy(np.ascontiguousarray(y).astype(np.int64)).to(device)
        names = list(self.gates)
        tensors = [self.gates[n] for n in names]
        was_training = self.model.training
        self.model.train()
        for t in tensors:
            t.requires_grad_(True)
        try:
            loss = F.cross_entropy(self.model(xb), yb)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        finally:
            for t in tensors:
                t.requires_grad_(False)
            self.model.train(was_training)  # the caller's mode, as it was
        per_norm = {n: (g.detach().float().cpu().numpy() if g is not None else None) for n, g in zip(names, grads)}
        return float(loss.detach()), self.layout.split(per_norm)

    def remove(self) -> None:
        """Take the hooks off (the model computes without gates again)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
