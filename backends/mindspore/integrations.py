"""Prune inside ``mindspore.train.Model.train`` and compiled (GRAPH_MODE, ``@mindspore.jit``) train
steps: the framework integrations of a :class:`~prunekit.backends.mindspore.driver.PruningSession`
(the PyTorch twin, ``backends/torch/integrations.py``, holds the Lightning callback).

Two ways in, the same machinery underneath (masks and terms are Parameters inside the compiled
graph, written in place by the session between steps: a compiled step never uses stale masks):

* :class:`Pruner`, the apply/convert idiom (MindSpore Golden Stick's)::

      pruner = Pruner("rpg", total_steps, input_shape=(3, 32, 32), sparsity=0.9)
      net = pruner.apply(net)                                # the network to train
      train_net = pruner.train_network(nn.CrossEntropyLoss(), optimizer)
      Model(train_net).train(epochs, dataset, callbacks=pruner.callbacks())
      pruned = pruner.convert()                              # compacted / decomposed / masked
      mindspore.export(pruned, x, file_name="pruned", file_format="MINDIR")

* the session API: :class:`PruningTrainOneStepCell` (the train-one-step cell, compiled whole in
  GRAPH_MODE) and :class:`PruningCallback` (calls ``before_step`` / ``after_optimizer_step`` /
  ``finish``)::

      session = PruningSession(handle, algorithm, optimizer, total_steps)
      train_net = PruningTrainOneStepCell(nn.WithLossCell(net, loss_fn), optimizer, session)
      Model(train_net).train(epochs, dataset, callbacks=[PruningCallback(session)])

A user's own ``@mindspore.jit`` train step calls ``session.graph_update()`` inside it in place
of ``optimizer(grads)``, with ``session.before_step()`` / ``session.after_optimizer_step()``
eagerly around it (``docs/BACKENDS.md``).

Dataset sinking: the algorithm's hooks run once per call of the train network, so a sink of
more than one step per call (GRAPH_MODE on a device, ``sink_size`` != 1) is refused at the
start of training, naming ``sink_size=1`` or ``dataset_sink_mode=False``. On CPU MindSpore
trains without sinking whatever ``dataset_sink_mode`` says.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence, Union

import mindspore as ms
import mindspore.nn as nn
from mindspore.train import Callback

from prunekit.algorithms.base import Algorithm
from prunekit.algorithms.registry import make_algorithm
from prunekit.errors import ConfigError

from .driver import PruningSession
from .layers import MindSporeModelHandle


class PruningTrainOneStepCell(nn.TrainOneStepCell):
    """``nn.TrainOneStepCell`` whose update is the session's :meth:`PruningSession.graph_update`
    (gradients masked, the algorithm's terms added, optimizer, weights masked), compiled whole
    in GRAPH_MODE. In PyNative the forward+backward is compiled with ``mindspore.jit`` (``jit=True``)."""

    def __init__(self, network: nn.Cell, optimizer: nn.Optimizer, session: PruningSession, jit: bool = True):
        super().__init__(network, optimizer)
        if session.optimizer is not optimizer:
            raise ConfigError("PruningTrainOneStepCell: the session was built around another optimizer")
        self.session = session
        self.update = session.graph_update()
        grad_fn = ms.value_and_grad(self.network, None, self.weights)
        self._grad = ms.jit(grad_fn) if jit and ms.get_context("mode") == ms.PYNATIVE_MODE else grad_fn

    def construct(self, *inputs):
        loss, grads = self._grad(*inputs)
        grads = self.grad_reducer(grads)
        # mutable: in PyNative a plain tuple reaches the compiled update as constants (a compile a step)
        return ms.ops.depend(loss, self.update(ms.mutable(grads)))


class PruningCallback(Callback):
    """Drives a :class:`PruningSession` from ``mindspore.train.Model.train`` (with
    :class:`PruningTrainOneStepCell` as the model's network). ``finish_on_end=False`` when one
    pruning run spans several ``train`` calls; then call ``session.finish()`` after the last one."""

    def __init__(self, session: PruningSession, finish_on_end: bool = True):
        super().__init__()
        self.session = session
        self.finish_on_end = finish_on_end
        self._last = None

    def on_train_begin(self, run_context):
        cb = run_context.original_args()
        net = _arg(cb, "train_network", None)
        if net is not None and not _drives(net, self.session):
            raise ConfigError(
                f"PruningCallback: Model.train's network is a {type(net).__name__}, not a PruningTrainOneStepCell "
                "of this session; Model(net, loss_fn, optimizer) builds MindSpore's own train cell, which cannot "
                "mask the update: pass Model(PruningTrainOneStepCell(...)) or Model(pruner.train_network(...))")
        sink = bool(_arg(cb, "dataset_sink_mode", False))
        size = int(_arg(cb, "sink_size", -1) or -1)
        if (sink and ms.get_context("mode") == ms.GRAPH_MODE and ms.get_context("device_target") != "CPU"
                and size != 1):
            raise ConfigError(
                f"dataset_sink_mode=True with sink_size={size} in GRAPH_MODE on "
                f"{ms.get_context('device_target')} runs several steps per call, while the pruning "
                "schedule must run between steps: pass sink_size=1 (and epochs x steps per epoch as "
                "epochs) or dataset_sink_mode=False")
        self._last = None

    def on_train_step_begin(self, run_context):
        self.session.before_step()

    def on_train_step_end(self, run_context):
        step = _arg(run_context.original_args(), "cur_step_num", None)
        if step is not None and self._last is not None and step - self._last != 1:
            raise ConfigError(f"Model.train ran {step - self._last} steps in one call (dataset sinking): "
                              "the pruning schedule needs one step per call; use sink_size=1")
        self._last = step
        self.session.after_optimizer_step()

    def on_train_end(self, run_context):
        if self.finish_on_end:
            self.session.finish()


def _arg(cb_params, key, default):
    """An entry of Model.train's callback parameters (a dict with attribute access), or ``default``."""
    try:
        return cb_params[key]
    except (KeyError, TypeError):
        return getattr(cb_params, key, default) if not isinstance(cb_params, dict) else default


def _drives(net, session) -> bool:
    return isinstance(net, PruningTrainOneStepCell) and net.session is session


class Pruner:
    """An algorithm applied to a MindSpore network, Golden Stick style: :meth:`apply`,
    :meth:`train_network` + :meth:`callbacks` for the user's own ``Model.train``, :meth:`convert`.

    ``algorithm``: a registered name (settings as keyword arguments, checked by
    :func:`~prunekit.algorithms.registry.make_algorithm`) or an Algorithm. ``total_steps``: the
    optimizer steps of the whole run (schedules depend on it). ``input_shape``: one sample's shape."""

    def __init__(self, algorithm: Union[str, Algorithm], total_steps: int, input_shape: Sequence[int],
                 model_name: str = "model", **settings):
        if isinstance(algorithm, Algorithm):
            if settings:
                raise ConfigError(f"Pruner: settings {sorted(settings)} given with an Algorithm instance; "
                                  "pass the algorithm's name instead, or configure the instance")
            self.algorithm = algorithm
        else:
            self.algorithm = make_algorithm(algorithm, **settings)
        if int(total_steps) < 1:
            raise ConfigError(f"Pruner: total_steps must be >= 1, got {total_steps!r}")
        self.total_steps = int(total_steps)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.model_name = model_name
        self.handle: Optional[MindSporeModelHandle] = None
        self.session: Optional[PruningSession] = None

    def apply(self, net: nn.Cell, batches=(), seed: int = 0) -> nn.Cell:
        """The network to train: ``net`` itself, or for an algorithm that prunes at
        initialisation (precrop) the network it returns (``batches``: ``(x, y)`` NumPy batches
        it scores on). Masks, terms and gates are set up by :meth:`train_network`."""
        handle = MindSporeModelHandle(net, self.input_shape, self.model_name)
        if self.algorithm.prunes_at_init:
            handle = self.algorithm.prepare(handle, _backend(), batches, seed)
        self.handle = handle
        self.session = None
        return handle.model

    def train_network(self, loss_fn: nn.Cell, optimizer: nn.Optimizer) -> PruningTrainOneStepCell:
        """The train-one-step cell for ``Model(...)``: the applied network with ``loss_fn``,
        stepped by ``optimizer`` (built on the applied network's parameters)."""
        if self.handle is None:
            raise ConfigError("Pruner.train_network: call apply(net) first")
        algorithm = self.algorithm.training_algorithm()
        self.session = PruningSession(self.handle, algorithm, optimizer, self.total_steps)
        return PruningTrainOneStepCell(nn.WithLossCell(self.handle.model, loss_fn), optimizer, self.session)

    def callbacks(self, finish_on_end: bool = True) -> list:
        """The callbacks to pass to ``Model.train`` with :meth:`train_network`'s cell."""
        if self.session is None:
            raise ConfigError("Pruner.callbacks: call train_network(loss_fn, optimizer) first")
        return [PruningCallback(self.session, finish_on_end)]

    def convert(self, decompose_threshold: float = 0.05) -> nn.Cell:
        """The pruned network after training: compacted (channel algorithms: narrower layers),
        decomposed (TRP: each low-rank conv split in two, singular values >= ``decompose_threshold``
        kept) or, for unstructured pruning, the trained network with its pruned weights at zero.
        A new network where one is built (the trained one is left as it is); ready for
        ``mindspore.export``."""
        if self.session is None or self.session.step == 0:
            raise ConfigError("Pruner.convert: train first (train_network, callbacks, Model.train)")
        algo, handle = self.algorithm, self.handle
        if type(algo).final_transform is not Algorithm.final_transform:
            # on a copy: the surgery replaces cells in place, and a network already compiled in
            # GRAPH_MODE would keep running its old graph
            copied = MindSporeModelHandle(copy.deepcopy(handle.model), handle.input_shape, handle.model_name)
            transform = algo.final_transform(copied, _backend(), float(decompose_threshold))
            if transform is not None:
                return transform.handle.model
        if algo.channel_keep and not algo.prunes_at_init:
            return _backend().compact(handle, algo.channel_keep).model
        return handle.model


def _backend():
    from prunekit.backends.mindspore import BACKEND  # the package's (built after this module is imported)
    return BACKEND
