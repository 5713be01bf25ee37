"""Optimizers for MindSpore loops: the training driver's, and those running prunekit's neutral update math.

:func:`make_optimizer` builds the optimizer of :class:`~.driver.Trainer` ("sgd": ``nn.SGD``;
"adam": :class:`Adam`, ``torch.optim.Adam`` exactly), both with ``torch.optim`` semantics.
:class:`SDPrun` is an ``nn.Optimizer`` (any mode, any loop):
gRDA with group soft-thresholding over filters (sDprun, :mod:`prunekit.algorithms.sdprun`) for
the parameters in ``grda``, plain SGD (same learning rate, no momentum) for the others; each
tuple in ``joint`` is thresholded as one group (row i of all its parameters together)::

    opt = SDPrun.from_handle(handle, learning_rate=0.1, c=5e-4, mu=0.51)
    grad_fn = mindspore.value_and_grad(forward_fn, None, opt.parameters)
    for x, y in loader:
        loss, grads = grad_fn(x, y)
        opt(grads)

Its update is one compiled graph: call it eagerly (PyNative or GRAPH_MODE), inside a
``@mindspore.jit`` train step, or as the optimizer of ``mindspore.train.Model``.
Without ``grda``, every parameter with two or more dimensions is managed (the logits layer
included); ``from_handle`` manages only the producers of prunable channel groups.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np

import mindspore as ms
import mindspore.nn as nn
import mindspore.ops as msops

from prunekit.algorithms.sdprun import _TINY, COUPLINGS, SDPrunConfig, managed_units
from prunekit.app.session import optimizer_key
from prunekit.errors import ConfigError


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


class SDPrun(nn.Optimizer):
    """gRDA + group soft-thresholding as one compiled update (``construct`` is graph code): usable
    in PyNative, in GRAPH_MODE, inside a ``@mindspore.jit`` train step and in ``Model.train``.
    The accumulators, the step count and the threshold λ (float64, as the neutral
    :class:`~prunekit.algorithms.sdprun.LambdaSchedule`) are Parameters. ``update_on`` is
    checked and accepted for compatibility; the update always runs in the graph."""

    def __init__(self, params, learning_rate: float = 0.1, c: float = 5e-4, mu: float = 0.51,
                 grda: Optional[Sequence] = None, joint: Sequence[Sequence] = (), update_on: str = "auto"):
        SDPrunConfig(c=c, mu=mu, lr=learning_rate, update_on=update_on)  # validates
        super().__init__(float(learning_rate), params)
        self.c, self.mu, self._lr0 = float(c), float(mu), float(learning_rate)
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
            rows = {int(plist[i].shape[0]) for i in idx}
            if len(rows) != 1:
                raise ConfigError(f"sdprun: jointly thresholded parameters need the same number of rows, got {sorted(rows)}")
            in_joint |= set(idx)
            units.append(idx)
        units += [[i] for i in managed if i not in in_joint]
        slot = {i: j for j, i in enumerate(managed)}
        self._managed = tuple(managed)
        self._plain = tuple(i for i in range(len(plist)) if i not in set(managed))
        # per unit: (accumulator slots, parameter indices, sqrt of entries per row)
        self._units = tuple((tuple(slot[i] for i in u), tuple(u),
                             math.sqrt(sum(int(np.prod(plist[i].shape[1:], dtype=np.int64)) for i in u)))
                            for u in units)
        self._acc = ms.ParameterTuple([ms.Parameter(ms.Tensor(np.zeros(tuple(plist[i].shape), np.float32)),
                                                    name=f"grda_acc.{plist[i].name}", requires_grad=False)
                                       for i in managed])
        self._started = ms.Parameter(ms.Tensor(0.0, ms.float32), name="grda_started", requires_grad=False)
        self._n = ms.Parameter(ms.Tensor(0.0, ms.float64), name="grda_n", requires_grad=False)
        self._lam = ms.Parameter(ms.Tensor(0.0, ms.float64), name="grda_lambda", requires_grad=False)
        self._coef = ms.Tensor(self.c, ms.float64)
        self._mu64 = ms.Tensor(self.mu, ms.float64)
        self._lr0_64 = ms.Tensor(self._lr0, ms.float64)
        self._lr0_32 = ms.Tensor(self._lr0, ms.float32)

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

    @ms.jit  # compiled once even when called eagerly (a dozen small ops per parameter)
    def construct(self, gradients):
        lr = self.get_lr()
        params = self._parameters
        for i in self._plain:
            msops.assign(params[i], params[i] - gradients[i] * lr)
        # λ_n += c·lr^(0.5+μ)·(n^μ − (n−1)^μ) in float64; the rate given, not its float32 rounding
        lr64 = msops.select(lr == self._lr0_32, self._lr0_64, msops.cast(lr, ms.float64))
        n = self._n + 1.0
        mu = self._mu64  # a float64 tensor: a Python float exponent would be rounded to float32
        lam = self._lam + self._coef * msops.pow(lr64, mu + 0.5) * (msops.pow(n, mu) - msops.pow(n - 1.0, mu))
        msops.assign(self._n, n)
        msops.assign(self._lam, lam)
        started = self._started
        for j in range(len(self._managed)):  # A_0 = w_0 at the first step, then A -= lr·g
            i = self._managed[j]
            a = self._acc[j] * started + params[i] * (1.0 - started)
            msops.assign(self._acc[j], a - gradients[i] * lr)
        msops.assign(self._started, msops.ones_like(started))
        for slots, idx, root in self._units:  # w_g = max(0, 1 − λ·sqrt|g| / ‖A_g‖)·A_g, rows jointly
            sq = None
            for j in slots:
                a = self._acc[j]
                m = msops.reshape(a, (a.shape[0], -1))
                s = msops.sum(m * m, 1)
                sq = s if sq is None else sq + s
            norm = msops.sqrt(sq)
            t = msops.cast(lam * root, ms.float32)
            scale = msops.clamp(norm - t, 0.0, None) / msops.clamp(norm, _TINY, None)
            for j, i in zip(slots, idx):
                a = self._acc[j]
                msops.assign(params[i], a * msops.reshape(scale, (a.shape[0],) + (1,) * (len(a.shape) - 1)))
        return True

    @property
    def lam(self) -> float:
        """The current threshold λ_n."""
        return float(self._lam.asnumpy())

    @property
    def n(self) -> int:
        """Steps taken."""
        return int(round(float(self._n.asnumpy())))

    def accumulator(self, param) -> ms.Tensor:
        """The gRDA accumulator of a managed parameter (after at least one step)."""
        for j, i in enumerate(self._managed):
            p = self._parameters[i]
            if p is param or p.name == param:
                return self._acc[j].value()
        raise KeyError(param)
