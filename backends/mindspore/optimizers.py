"""Optimizers for MindSpore loops: the training driver's, and those running prunekit's neutral update math.

:func:`make_optimizer` builds the optimizer of :class:`~.driver.Trainer` ("sgd": ``nn.SGD``;
"adam": :class:`Adam`, ``torch.optim.Adam`` exactly), both with ``torch.optim`` semantics.
:class:`SDPrun` is an ``nn.Optimizer`` for the functional ``value_and_grad`` loop (PyNative):
gRDA with group soft-thresholding over filters (sDprun, :mod:`prunekit.algorithms.sdprun`) for
the parameters in ``grda``, plain SGD (same learning rate, no momentum) for the others; each
tuple in ``joint`` is thresholded as one group (row i of all its parameters together)::

    opt = SDPrun.from_handle(handle, learning_rate=0.1, c=5e-4, mu=0.51)
    grad_fn = mindspore.value_and_grad(forward_fn, None, opt.parameters)
    for x, y in loader:
        loss, grads = grad_fn(x, y)
        opt(grads)

Call it eagerly (its update is Python over the neutral ops), not inside ``mindspore.jit``.
Without ``grda``, every parameter with two or more dimensions is managed (the logits layer
included); ``from_handle`` manages only the producers of prunable channel groups.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as msops

from prunekit.algorithms.sdprun import (COUPLINGS, SDPrunConfig, accumulate, group_soft_threshold, LambdaSchedule,
                                        managed_units)
from prunekit.app.session import optimizer_key
from prunekit.errors import ConfigError
from prunekit.decisions.spectrum import rank_ops

from .layers import write_
from .ops import MindSporeOps


class Adam(nn.Optimizer):
    """``torch.optim.Adam`` exactly: L2 weight decay added to the gradient, bias-corrected
    moments, eps added to ``sqrt(v_hat)``. (``nn.Adam`` adds eps to ``sqrt(v)`` before the bias
    correction, which differs where gradients are tiny.) State: ``moment1``, ``moment2``."""

    def __init__(self, params, learning_rate=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        super().__init__(learning_rate, params)
        if weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.beta1, self.beta2, self.eps, self.wd = float(beta1), float(beta2), float(eps), float(weight_decay)
        self.moment1 = self._parameters.clone(prefix="moment1", init="zeros")
        self.moment2 = self._parameters.clone(prefix="moment2", init="zeros")
        self.beta1_power = ms.Parameter(ms.Tensor(1.0, ms.float32), name="beta1_power")
        self.beta2_power = ms.Parameter(ms.Tensor(1.0, ms.float32), name="beta2_power")

    @ms.jit  # compiled once even when called eagerly: the per-parameter loop is ~70 small ops
    def construct(self, gradients):
        lr = self.get_lr()
        b1p = self.beta1_power * self.beta1
        b2p = self.beta2_power * self.beta2
        msops.assign(self.beta1_power, b1p)
        msops.assign(self.beta2_power, b2p)
        step_size = lr / (1.0 - b1p)
        bias2_sqrt = msops.sqrt(1.0 - b2p)
        for p, m, v, g in zip(self._parameters, self.moment1, self.moment2, gradients):
            if self.wd > 0.0:
                g = g + self.wd * p
            m_new = self.beta1 * m + (1.0 - self.beta1) * g
            v_new = self.beta2 * v + (1.0 - self.beta2) * g * g
            msops.assign(m, m_new)
            msops.assign(v, v_new)
            msops.assign(p, p - step_size * m_new / (msops.sqrt(v_new) / bias2_sqrt + self.eps))
        return True


def make_optimizer(model: nn.Cell, name: str = "sgd", lr: float = 0.1, momentum: float = 0.9,
                   weight_decay: float = 5e-4, nesterov: bool = False) -> nn.Optimizer:
    """SGD or Adam with ``torch.optim`` semantics (weight decay on every parameter, BN included).

    "sgd" is ``nn.SGD`` (dampening 0): weight decay is added to the gradient before the momentum
    (``accum = momentum * accum + g``, first step ``accum = g``), as torch's SGD, Nesterov
    included. (``nn.Momentum`` would match without Nesterov, but its CPU kernel ignores
    ``use_nesterov`` in MindSpore 2.10.) A parameter group carries the weight decay so that it
    also applies to BN's gamma/beta, which MindSpore's ungrouped default would skip.
    """
    key = optimizer_key(name)
    params = model.trainable_params()
    if key == "sgd":
        return nn.SGD([{"params": params, "weight_decay": float(weight_decay)}], learning_rate=float(lr),
                      momentum=float(momentum), dampening=0.0, nesterov=bool(nesterov and momentum > 0))
    return Adam(params, learning_rate=float(lr), weight_decay=float(weight_decay))


@ms.jit
def _sgd(params, grads, lr):
    """``p -= lr * g`` for every pair, as one compiled call (pass tuples through ``mutable``)."""
    for p, g in zip(params, grads):
        msops.assign(p, p - g * lr)
    return True


class SDPrun(nn.Optimizer):
    def __init__(self, params, learning_rate: float = 0.1, c: float = 5e-4, mu: float = 0.51,
                 grda: Optional[Sequence] = None, joint: Sequence[Sequence] = (), update_on: str = "auto"):
        SDPrunConfig(c=c, mu=mu, lr=learning_rate, update_on=update_on)  # validates
        super().__init__(float(learning_rate), params)
        self.c, self.mu, self._lr0 = float(c), float(mu), float(learning_rate)
        # on a CPU the update's dozen small ops per parameter run far faster in NumPy (as SDPrunPruner's "auto")
        self._ops = rank_ops(MindSporeOps(), update_on)
        self._host = not isinstance(self._ops, MindSporeOps)
        plist = list(self._parameters)
        index = {}
        for i, p in enumerate(plist):
            index[id(p)] = i
            index.setdefault(p.name, i)

        def find(x):
            key = id(x) if isinstance(x, ms.Parameter) else x
            if key not in index:
                raise ConfigError(f"sdprun: {getattr(x, 'name', x)!r} is not one of the optimizer's parameters")
            return index[key]

        managed = sorted({find(x) for x in grda}) if grda is not None else [i for i, p in enumerate(plist) if len(p.shape) >= 2]
        units: List[List[int]] = []
        in_joint = set()
        for tup in joint:
            idx = [find(x) for x in tup]
            if not set(idx) <= set(managed):
                raise ConfigError("sdprun: every jointly thresholded parameter must also be gRDA-managed")
            if in_joint & set(idx):
                raise ConfigError("sdprun: a parameter appears in two joint groups")
            in_joint |= set(idx)
            units.append(idx)
        units += [[i] for i in managed if i not in in_joint]
        self._units = units
        self._managed = managed
        self._plain = [i for i in range(len(plist)) if i not in set(managed)]
        self._acc: Dict[int, ms.Tensor] = {}
        self.schedule = LambdaSchedule(c, mu)  # λ_n, advanced once per step

    @classmethod
    def from_handle(cls, handle, groups: Optional[Sequence] = None, coupling: str = "filter",
                    exclude: Sequence[str] = (), learning_rate: float = 0.1, c: float = 5e-4,
                    mu: float = 0.51, update_on: str = "auto") -> "SDPrun":
        """All trainable parameters of a model handle; gRDA for the producers of prunable channel
        groups (jointly per group with ``coupling="channel"``)."""
        if coupling not in COUPLINGS:
            raise ConfigError(f"unknown coupling {coupling!r}; expected one of {', '.join(COUPLINGS)}")
        if groups is None:
            from prunekit.decisions.channel_groups import find_channel_groups
            groups = find_channel_groups(handle)
        units = managed_units(handle.layers, groups, coupling, exclude)
        ws = [[handle.module(n).weight for n in u] for u in units]
        return cls(handle.model.trainable_params(), learning_rate, c, mu,
                   grda=[w for u in ws for w in u], joint=[u for u in ws if len(u) > 1], update_on=update_on)

    def construct(self, gradients):
        lr = float(self.get_lr().asnumpy()) if isinstance(self.get_lr(), ms.Tensor) else float(self.get_lr())
        if abs(lr - self._lr0) <= 1e-7 * abs(self._lr0):  # the rate given, not its float32 rounding
            lr = self._lr0
        params = self._parameters
        if self._plain:
            _sgd(ms.mutable(tuple(params[i] for i in self._plain)),
                 ms.mutable(tuple(gradients[i] for i in self._plain)), ms.Tensor(lr, ms.float32))
        self.schedule.advance(lr)
        ops = self._ops
        for i in self._managed:
            acc = self._acc.get(i)
            if acc is None:  # A_0 = w_0
                acc = params[i].asnumpy().copy()
                acc = acc if self._host else ms.Tensor(acc)
            g = gradients[i].asnumpy() if self._host else gradients[i]
            self._acc[i] = accumulate(ops, acc, g, lr)
        for unit in self._units:
            new = group_soft_threshold(ops, [self._acc[i] for i in unit], self.schedule.value)
            for i, w in zip(unit, new):
                write_(params[i], ms.Tensor(w) if self._host else w)
        return True

    @property
    def lam(self) -> float:
        """The current threshold λ_n."""
        return self.schedule.value

    @property
    def n(self) -> int:
        """Steps taken."""
        return self.schedule.n

    def accumulator(self, param) -> ms.Tensor:
        """The gRDA accumulator of a managed parameter (after at least one step)."""
        for i, p in enumerate(self._parameters):
            if p is param or p.name == param:
                return ms.Tensor(self._acc[i]) if self._host else self._acc[i]
        raise KeyError(param)
