"""Channel gates for DSA on PyTorch: a per-group gate vector multiplied onto BN outputs.

Each gated BatchNorm gets a forward hook that returns ``output * gate`` (the gate broadcast over
the channel axis), so the gate acts after BN and before the following ReLU or residual add. All
BNs of one channel group share one gate tensor, so its gradient is the sum over them (the group
uses one mask). The gate tensors live on the model's device and are not model parameters: the
optimizer never sees them, and they require a gradient only inside :meth:`ChannelGates.gradients`
(``torch.autograd.grad`` with respect to the gates alone, so the weights' ``.grad`` is untouched).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from prunekit.errors import ModelError


def _channels(module, default: int) -> int:
    """A norm layer's channel count (BatchNorm, GroupNorm, LayerNorm over channels)."""
    for attr in ("num_features", "num_channels"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    shape = getattr(module, "normalized_shape", None)
    return int(shape[-1]) if shape else default


class ChannelGates:
    """``groups``: ``{group name: (BN module names, channels)}``."""

    def __init__(self, handle, groups: Dict[str, Tuple[Tuple[str, ...], int]]):
        self.handle = handle
        self.model = handle.model
        modules = dict(self.model.named_modules())
        device = next(self.model.parameters()).device
        self.gates: Dict[str, torch.Tensor] = {}
        self._hooks = []
        for name, (norms, size) in groups.items():
            gate = torch.ones(int(size), device=device)
            self.gates[name] = gate
            for bn in norms:
                module = modules.get(bn)
                if module is None:
                    raise ModelError(f"channel group {name!r} names BatchNorm {bn!r}, which the model does not have")
                channels = _channels(module, size)
                if channels != size:
                    raise ModelError(f"norm {bn!r} has {channels} channels, group {name!r} {size} (a norm over a "
                                     "concatenation holds several groups; gates need one group per norm)")
                self._hooks.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, inputs, output):
            gate = self.gates[name]
            return output * gate.view((1, -1) + (1,) * (output.dim() - 2))
        return hook

    def set(self, values: Dict[str, np.ndarray]) -> None:
        """Write gate values (one float per channel) by group name."""
        with torch.no_grad():
            for name, v in values.items():
                gate = self.gates[name]
                gate.copy_(torch.as_tensor(np.asarray(v, dtype=np.float32), device=gate.device))

    def values(self) -> Dict[str, np.ndarray]:
        return {n: g.detach().cpu().numpy().copy() for n, g in self.gates.items()}

    def gradients(self, x: np.ndarray, y: np.ndarray) -> Tuple[float, Dict[str, np.ndarray]]:
        """Cross-entropy on one batch in training mode; ``(loss, ∂L/∂gate per group)``. Only the
        gates get gradients; BN running statistics update as in any training forward pass."""
        device = next(self.model.parameters()).device
        xb = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
        yb = torch.from_numpy(np.ascontiguousarray(y).astype(np.int64)).to(device)
        names = list(self.gates)
        tensors = [self.gates[n] for n in names]
        self.model.train()
        for t in tensors:
            t.requires_grad_(True)
        try:
            loss = F.cross_entropy(self.model(xb), yb)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        finally:
            for t in tensors:
                t.requires_grad_(False)
        out = {n: (g.detach().cpu().numpy() if g is not None else np.zeros(t.shape, np.float32))
               for n, g, t in zip(names, grads, tensors)}
        return float(loss.detach()), out

    def remove(self) -> None:
        """Take the hooks off (the model computes without gates again)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
