"""Optimizers for PyTorch loops: the training driver's, and those running prunekit's neutral update math.

:func:`make_optimizer` builds the optimizer of :class:`~.driver.Trainer` ("sgd" or "adam").
:class:`SDPrun` is a ``torch.optim.Optimizer``: gRDA with group soft-thresholding over filters
(sDprun, :mod:`prunekit.algorithms.sdprun`) for the parameters of param groups with
``grda=True``, plain SGD (same learning rate, no momentum) for the others. A param group with
``joint=True`` thresholds row i of all its parameters as one group (coupled filters)::

    opt = SDPrun(SDPrun.param_groups_for(handle), lr=0.1, c=5e-4, mu=0.51)
    for x, y in loader:
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()

Without ``param_groups_for``, ``SDPrun(model.parameters())`` applies gRDA to every parameter
with two or more dimensions (conv and linear weights, the logits layer included).
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import torch

from prunekit.algorithms.sdprun import (COUPLINGS, SDPrunConfig, accumulate, group_soft_threshold, lambda_increment,
                                        managed_units)
from prunekit.app.session import optimizer_key
from prunekit.errors import ConfigError

from .ops import TorchOps


def make_optimizer(model: torch.nn.Module, name: str = "sgd", lr: float = 0.1, momentum: float = 0.9,
                   weight_decay: float = 5e-4, nesterov: bool = False) -> torch.optim.Optimizer:
    if optimizer_key(name) == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov and momentum > 0)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


class SDPrun(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.1, c: float = 5e-4, mu: float = 0.51):
        SDPrunConfig(c=c, mu=mu, lr=lr)  # validates
        super().__init__(params, dict(lr=float(lr), c=float(c), mu=float(mu), grda=None, joint=False))
        self._ops = TorchOps()

    @staticmethod
    def param_groups_for(handle, groups: Optional[Sequence] = None, coupling: str = "filter",
                         exclude: Sequence[str] = ()) -> List[dict]:
        """Param groups for a model handle: gRDA for the producers of prunable channel groups
        (one param group per thresholding unit), plain SGD for every other parameter."""
        if coupling not in COUPLINGS:
            raise ConfigError(f"unknown coupling {coupling!r}; expected one of {', '.join(COUPLINGS)}")
        if groups is None:
            from prunekit.decisions.channel_groups import find_channel_groups
            groups = find_channel_groups(handle)
        units = managed_units(handle.layers, groups, coupling, exclude)
        out, seen = [], set()
        for unit in units:
            ws = [handle.module(n).weight for n in unit]
            seen.update(id(w) for w in ws)
            out.append({"params": ws, "grda": True, "joint": len(ws) > 1})
        rest = [p for p in handle.model.parameters() if id(p) not in seen and p.requires_grad]
        if rest:
            out.append({"params": rest, "grda": False})
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ops = self._ops
        for group in self.param_groups:
            lr = group["lr"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grda = group["grda"]
            managed, plain = [], []
            for p in params:
                (managed if (p.dim() >= 2 if grda is None else grda) else plain).append(p)
            if plain:
                torch._foreach_add_(plain, [p.grad for p in plain], alpha=-lr)
            if not managed:
                continue
            for p in managed:
                state = self.state[p]
                if "accumulator" not in state:
                    state["accumulator"] = p.detach().clone()  # A_0 = w_0
                    state["step"], state["lambda"] = 0, 0.0
                state["accumulator"] = accumulate(ops, state["accumulator"], p.grad, lr)
                state["step"] += 1
                state["lambda"] += lambda_increment(group["c"], group["mu"], lr, state["step"])
            units = [managed] if group["joint"] else [[p] for p in managed]
            for unit in units:
                lam = self.state[unit[0]]["lambda"]
                new = group_soft_threshold(ops, [self.state[p]["accumulator"] for p in unit], lam)
                for p, w in zip(unit, new):
                    p.copy_(w)
        return loss
