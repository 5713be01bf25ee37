"""Compiled fast paths for the MindSpore :class:`~prunekit.backends.mindspore.driver.Trainer` (CPU above all).

In PyNative every small eager op costs on the order of a millisecond, so a driver that masks
each gradient, adds each regulariser term and writes each projected weight one op at a time
spends more on dispatch than on arithmetic (ResNet-56: ~170 such ops a step for RPG). These
helpers do the same arithmetic inside one ``mindspore.jit`` call each:

* :class:`FusedUpdate` — gradient masking, the algorithm's additive gradient terms
  (:meth:`prunekit.algorithms.base.Algorithm.gradient_terms`), the optimizer update and the
  masking of the weights after it as one compiled graph: ``g ← (g + term) · mask``,
  ``optimizer(g)``, ``w ← w · mask``. The same values as the generic path (``g·mask + term·mask``
  with a 0/1 mask is exactly ``(g + term)·mask``).
* :func:`mul_all_` — ``p *= m`` for several Parameters in one compiled call (the session's
  weight masking: on CPU about 30x faster than one eager multiply-and-copy per layer).
* :func:`assign_many` — several Parameters overwritten in one compiled call (TRP's projection,
  through :meth:`MindSporeModelHandle.set_weights`).

A compiled graph is built per layout (which gradients get a term, which are masked) and reused.

:class:`GraphUpdate` is the same step as a Cell for graphs the *user* compiles (``Model.train``
in GRAPH_MODE, a ``@mindspore.jit`` train step): there the masks and terms cannot be arguments,
so they are Parameters of the cell, written in place by the session between steps.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import mindspore as ms
import mindspore.nn as nn
from mindspore import ops as msops


@ms.jit
def _mul_all(params, masks):
    for p, m in zip(params, masks):
        msops.assign(p, p * m)
    return True


def mul_all_(params: Sequence[ms.Parameter], masks: Sequence[ms.Tensor]) -> None:
    """``p *= m`` for every pair, in place, as one compiled call."""
    if params:
        _mul_all(ms.mutable(tuple(params)), ms.mutable(tuple(masks)))


@ms.jit
def _assign_all(params, values):
    for p, v in zip(params, values):
        msops.assign(p, v)
    return True


def assign_many(params: Sequence[ms.Parameter], values: Sequence[ms.Tensor]) -> None:
    """``p ← v`` for every pair, as one compiled call (casts to each Parameter's dtype first)."""
    if not params:
        return
    values = [v if v.dtype == p.dtype else msops.cast(v, p.dtype) for p, v in zip(params, values)]
    _assign_all(ms.mutable(tuple(params)), ms.mutable(tuple(values)))


def _build(optimizer, plan: Tuple[Tuple[int, int], ...], n_masks: int):
    """A compiled ``(grads, terms, masks, weights)``: ``optimizer(new grads)``, then every masked
    weight multiplied by its mask (the driver's step 5). ``plan[i]`` = (index of gradient i's
    term in ``terms`` or -1, index of its mask in ``masks`` or -1); ``weights[j]`` is the
    Parameter ``masks[j]`` belongs to."""
    n = len(plan)

    def fused(grads, terms, masks, weights):
        out = ()
        for i in range(n):
            g = grads[i]
            t, m = plan[i]
            if t >= 0:
                g = g + terms[t]
            if m >= 0:
                g = g * masks[m]
            out = out + (g,)
        done = optimizer(out)
        for j in range(n_masks):  # after the update (side effects keep program order)
            msops.assign(weights[j], weights[j] * masks[j])
        return done

    return ms.jit(fused)


class FusedUpdate:
    """One compiled call for ``session.transform_gradients`` + ``optimizer(grads)``, used by the
    Trainer on the steps where that is the same computation (see :meth:`__call__`)."""

    def __init__(self, session, optimizer):
        self.session = session
        self.optimizer = optimizer
        self._compiled: Dict[tuple, object] = {}

    def __call__(self, grads: Sequence[ms.Tensor]) -> bool:
        """Apply this step's update fused (gradient transform, optimizer step, weights masked
        again) and return True, or return False (nothing done) where
        the generic path is needed: no algorithm, dense gradients to observe, a skipped optimizer
        step, an algorithm whose gradient transform is not purely additive (``gradient_terms``
        returns None), a ``transform_gradients`` replaced on the instance (e.g. a test spy), or a
        masked weight the optimizer does not hold. After True the driver skips its own masking
        of the weights (``after_optimizer_step(weights_masked=True)``). A fused step does not call
        ``session.transform_gradients``: a session subclass that changes gradients there must do
        it before (the data-parallel trainer averages them as they leave the backward pass)."""
        s = self.session
        algo, step = s.algorithm, s.step
        index = s._grad_index
        if algo is None or algo.needs_dense_gradients(step) or not algo.should_step_optimizer(step) \
                or any(n not in index for n in algo.masks):
            return False
        terms = s.additive_terms()
        if terms is None:
            return False
        term_items = sorted(((index[n], t) for n, t in terms.items() if n in index), key=lambda p: p[0])
        mask_items = sorted(((index[n], m) for n, m in algo.masks.items()), key=lambda p: p[0])  # all in index (above)
        tpos = {i: j for j, (i, _) in enumerate(term_items)}
        mpos = {i: j for j, (i, _) in enumerate(mask_items)}
        plan = tuple((tpos.get(i, -1), mpos.get(i, -1)) for i in range(len(grads)))
        fn = self._compiled.get(plan)
        if fn is None:
            fn = self._compiled[plan] = _build(self.optimizer, plan, len(mask_items))
        params = self.optimizer.parameters
        fn(ms.mutable(tuple(grads)), _tuple(t for _, t in term_items), _tuple(m for _, m in mask_items),
           _tuple(params[i] for i, _ in mask_items))
        return True


def _tuple(xs):
    """A run-time tuple argument (``mutable``: not compiled in as constants); empty stays ()."""
    xs = tuple(xs)
    return ms.mutable(xs) if xs else xs


class GraphUpdate(nn.Cell):
    """The session's gradient step as a Cell that runs *inside* a compiled graph (a
    ``mindspore.train.Model`` train cell in GRAPH_MODE, a user's ``@mindspore.jit`` train step).

    ``construct(grads)`` (the tuple aligned with ``optimizer.parameters``) does, for each prunable
    weight: copy the dense gradient into a buffer (``observe``: algorithms that read gradients
    after the step), ``g ← (g + term) · mask`` (``terms``: additive algorithms), then
    ``optimizer(grads)`` and ``w ← w · mask``; it returns the optimizer's result.
    Masks, terms and buffers are Parameters (``requires_grad=False``) held here, so the compiled
    graph reads their values at run time; the session writes them in place between steps
    (:meth:`PruningSession.before_step` in graph mode), never as compiled-in constants.
    A weight without a mask has a mask of ones (the product is exact).
    """

    def __init__(self, optimizer, weights: Dict[str, ms.Parameter], terms: bool, observe: bool):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        position = {id(p): i for i, p in enumerate(optimizer.parameters)}
        self.layers = [n for n, w in weights.items() if id(w) in position]
        slot = {position[id(weights[n])]: j for j, n in enumerate(self.layers)}
        self._plan = tuple(slot.get(i, -1) for i in range(len(optimizer.parameters)))
        self._n, self._k = len(self._plan), len(self.layers)
        self._terms, self._observe = bool(terms), bool(observe)
        ws = [weights[n] for n in self.layers]

        def params(prefix, fill):
            return ms.ParameterTuple([
                ms.Parameter(ms.Tensor(np.full(tuple(w.shape), fill, np.float32), w.dtype),
                             name=f"prunekit_{prefix}.{w.name}", requires_grad=False) for w in ws])

        self.masks = params("mask", 1.0)
        self.terms = params("term", 0.0) if self._terms else None
        self.dense = params("dense_grad", 0.0) if self._observe else None
        self.weights = ms.ParameterTuple(ws)

    @ms.jit  # compiled once when called eagerly (PyNative); inlined into a graph that calls it
    def construct(self, grads):
        out = ()
        for i in range(self._n):
            g = grads[i]
            j = self._plan[i]
            if j >= 0:
                if self._observe:
                    msops.assign(self.dense[j], g)
                if self._terms:
                    g = g + self.terms[j]
                g = g * self.masks[j]
            out = out + (g,)
        done = self.optimizer(out)
        for j in range(self._k):  # after the update (side effects keep program order)
            msops.assign(self.weights[j], self.weights[j] * self.masks[j])
        return done
