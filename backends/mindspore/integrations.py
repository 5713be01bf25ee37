"""Prune inside ``mindspore.train.Model.train``: the framework integrations of a
:class:`~prunekit.backends.mindspore.driver.PruningSession` (the PyTorch twin,
``backends/torch/integrations.py``, holds the Lightning callback).

Wrap the loss network in :class:`PruningTrainOneStepCell` (it transforms the gradients between
backward and the optimizer) and pass a :class:`PruningCallback` (it calls ``before_step`` /
``after_optimizer_step`` / ``finish``)::

    session = PruningSession(handle, algorithm, optimizer, total_steps)
    train_net = PruningTrainOneStepCell(nn.WithLossCell(net, loss_fn), optimizer, session)
    Model(train_net).train(epochs, dataset, callbacks=[PruningCallback(session)],
                           dataset_sink_mode=False)
"""
from __future__ import annotations

import logging

import mindspore as ms
import mindspore.nn as nn
from mindspore.train import Callback

from .driver import PruningSession

log = logging.getLogger(__name__)


class PruningTrainOneStepCell(nn.TrainOneStepCell):
    """``nn.TrainOneStepCell`` with the session's gradient transform before the optimizer.

    Runs its ``construct`` in PyNative mode (the algorithm is Python). With ``jit=True`` the
    forward+backward is compiled once with ``mindspore.jit``; if the network cannot be
    compiled it falls back to PyNative with a warning.
    """

    def __init__(self, network: nn.Cell, optimizer: nn.Optimizer, session: PruningSession, jit: bool = True):
        super().__init__(network, optimizer)
        self.session = session
        grad_fn = ms.value_and_grad(self.network, None, self.weights)
        self._eager_grad = grad_fn
        self._grad = ms.jit(grad_fn) if jit else grad_fn

    def construct(self, *inputs):
        try:
            loss, grads = self._grad(*inputs)
        except (RuntimeError, TypeError, ValueError) as e:
            if self._grad is self._eager_grad:
                raise
            log.warning("mindspore.jit failed on the train network (%s); running PyNative", e)
            self._grad = self._eager_grad
            loss, grads = self._grad(*inputs)
        grads = self.grad_reducer(grads)
        grads = self.session.transform_gradients(grads)
        if self.session.should_step():
            self.optimizer(grads)
        return loss


class PruningCallback(Callback):
    """Drives a :class:`PruningSession` from ``mindspore.train.Model.train`` (use it together
    with :class:`PruningTrainOneStepCell`). ``finish_on_end=False`` when one pruning run spans
    several ``train`` calls; then call ``session.finish()`` after the last one."""

    def __init__(self, session: PruningSession, finish_on_end: bool = True):
        super().__init__()
        self.session = session
        self.finish_on_end = finish_on_end

    def on_train_step_begin(self, run_context):
        self.session.before_step()

    def on_train_step_end(self, run_context):
        self.session.after_optimizer_step()

    def on_train_end(self, run_context):
        if self.finish_on_end:
            self.session.finish()
